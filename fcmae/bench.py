"""`fcmae bench`: time the full FCMAE train step (forward, backward, AdamW step) per sparse backend, side by side.

All backends run the same model (one FCMAE, one AdamW as the training loop builds it: the weights keep training, so
every backend times the same shapes and the same resident memory), the same batch and the same masks (their visible
patch indices made on the host, as in training), interleaved step by step after a warm-up, so drift on a shared
machine hits them alike (with --compile one backend after the other: each compiles just before its own steps).
`dense` is the yardstick: timm's own `forward_features` on the unmasked image (every position computed), followed by
the same decoder and masked-patch loss.

Reported per backend: median step time and img/s, median CPU seconds of this process per step (robust to other
jobs on a shared CPU when run with --threads 1), peak memory (CUDA: torch.cuda.max_memory_allocated over its steps;
n/a on CPU), ratio of img/s to `masked`, and the model FLOP utilisation: useful FLOPs (the dense encoder's FLOPs
scaled by the visible fraction, plus the decoder's, forward and backward, counted by torch.utils.flop_counter with
the depthwise-conv backward corrected) / step time / the measured throughput of a large matmul in the step's dtype on
the same device (8192^2 on CUDA, 1024^2 on CPU, so that the CPU figure takes a second, not minutes).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from convnextv2 import visible_patches
from convnextv2.backends import BACKENDS
from convnextv2.checkpoint.io import atomic_write
from convnextv2.sparse import sparse_forward
from fcmae.engine.config import check_at_least, check_fraction, check_seed
from fcmae.engine.optim import build_adamw
from fcmae.model import FCMAE

DENSE = "dense"


def check_args(args: argparse.Namespace) -> tuple[list[str], torch.device, str]:
    """Fail fast on bad options, before building a model. -> (backends, device, dtype)."""
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    valid = sorted(BACKENDS) + [DENSE]
    bad = [b for b in backends if b not in valid]
    if not backends or bad:
        raise ValueError(f"unknown backend(s) {bad or args.backends!r} in --backends; valid: {', '.join(valid)}")
    if args.image_size <= 0 or args.image_size % args.patch_size:
        raise ValueError(f"--image-size {args.image_size} is not a positive multiple of the patch size "
                         f"{args.patch_size}")
    for name in ("batch_size", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for option, value, minimum in (("--warmup", args.warmup, 0), ("--decoder-dim", args.decoder_dim, 1),
                                   ("--threads", args.threads, 0)):
        check_at_least(option, value, minimum)
    check_fraction("--mask-ratio", args.mask_ratio)
    check_seed("--seed", args.seed)
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda[:N] or auto, got {args.device!r}")
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if args.json is not None:
        check_json_path(args.json)
    if args.profile is not None and not (os.path.isdir(args.profile) and os.access(args.profile, os.W_OK)):
        raise ValueError(f"--profile {args.profile!r} is not a writable folder; create it first (mkdir -p)")
    return backends, device, dtype


def check_json_path(path: str) -> None:
    """--json must name a file in an existing, writable folder (checked before any model runs)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"--json {path!r} is a folder; give a file path such as {os.path.join(path, 'bench.json')}")
    if not os.path.isdir(folder):
        raise ValueError(f"--json {path!r}: folder {folder!r} does not exist; create it first (mkdir -p)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"--json {path!r}: folder {folder!r} is not writable; choose another path")


def write_json_atomic(path: str, document: dict[str, Any]) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a document (a failed write: a
    WriteError naming `path`)."""
    write_text_atomic(path, json.dumps(document, indent=1) + "\n")


def write_text_atomic(path: str, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def command_line(args: argparse.Namespace) -> str:
    """The `fcmae bench` command that reproduces this run, every option spelled out (--json left out)."""
    parts = ["fcmae", "bench"]
    for key, value in vars(args).items():
        if key in ("func", "command", "json", "profile"):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts += [flag] if value else []
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def environment(device: torch.device) -> dict[str, Any]:
    """Where the run happened: device name, library versions, host."""
    import timm  # noqa: PLC0415 - only for its version
    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "device_type": device.type,
        "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2 ** 30 if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }


def loss_fn(model: FCMAE, backend: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The FCMAE loss with the encoder run by `backend` (or densely by timm on the unmasked image for `dense`).
    fn(imgs, mask, visible): `visible` = the mask's visible patch indices, as the training loop passes them."""
    def fn(imgs: torch.Tensor, mask: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        if backend == DENSE:
            features = model.encoder.forward_features(imgs)
        else:
            features = sparse_forward(model.encoder, imgs, mask, backend, visible)
        pred = model.decoder(features, mask).flatten(2).transpose(1, 2)  # (N, L, p*p*C), as FCMAE.forward
        return model.loss(imgs, pred, mask)
    return fn


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def conv_backward_flops(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                        output_padding, groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of aten.convolution_backward: the forward's for each gradient asked for (input, weight).

    torch's own formula (2.14) ignores `groups` for the weight gradient, which counts a C-channel depthwise conv's
    weight gradient C times too high: atto's whole FCMAE step came out 2.4x too high at 96 px (tests/test_bench.py
    checks ours). The forward count is right (w_shape holds C_in/groups), and each gradient costs one forward.
    """
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def count_flops() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops})


def useful_flops(model: FCMAE, imgs: torch.Tensor, mask: torch.Tensor, autocast) -> float:
    """FLOPs of one train step's useful work (forward + backward): dense encoder x visible fraction + decoder."""
    visible = (1 - mask).mean().item()
    with torch.no_grad(), autocast():
        features = model.encoder.forward_features(imgs).requires_grad_()
    with count_flops() as enc_count, autocast():
        model.encoder.forward_features(imgs).float().sum().backward()
    with count_flops() as dec_count, autocast():
        pred = model.decoder(features, mask).flatten(2).transpose(1, 2)
        model.loss(imgs, pred, mask).backward()
    model.zero_grad(set_to_none=True)
    return enc_count.get_total_flops() * visible + dec_count.get_total_flops()


def matmul_size(device: torch.device) -> tuple[int, int]:
    """(side, repetitions) of the square matmul whose throughput is the MFU's denominator."""
    return (8192, 20) if device.type == "cuda" else (1024, 5)


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured FLOP/s of a large square matmul: the practical peak the MFU is relative to."""
    n, reps = matmul_size(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def write_profile(folder: str, backend: str, step: Callable[[], Any], device: torch.device, compiled: bool,
                  steps: int = 3) -> None:
    """torch.profiler over `steps` calls of `step`: the ops that take the most device (or CPU) time, as a text table
    (profile-<backend>.txt) and as JSON (profile-<backend>.json: every op's calls and self time per device, what
    bench/roofline.py reads to set the measured time per op class against its prediction)."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415 - only with --profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    write_text_atomic(os.path.join(folder, f"profile-{backend}.txt"), f"# {steps} steps, sorted by {sort}\n"
                      + averages.table(sort_by=sort, row_limit=40, max_name_column_width=60) + "\n")
    ops = [{"name": e.key, "calls": e.count, "self_cpu_us": e.self_cpu_time_total,
            "self_device_us": getattr(e, "self_device_time_total", 0.0)} for e in averages]
    write_json_atomic(os.path.join(folder, f"profile-{backend}.json"), {
        "schema": "fcmae-profile/1", "backend": backend, "device_type": device.type, "compile": compiled,
        "steps": steps, "ops": sorted(ops, key=lambda o: -(o["self_device_us"] or o["self_cpu_us"]))})


class Timings:
    """Per backend: wall and CPU seconds of each timed step, and the peak memory over them (CUDA)."""

    def __init__(self, backends: list[str]):
        self.wall: dict[str, list[float]] = {b: [] for b in backends}
        self.cpu: dict[str, list[float]] = {b: [] for b in backends}  # CPU seconds of this process: on a shared CPU,
        # less sensitive than wall time to other jobs (with 1 thread it is the step's own compute time)
        self.peak: dict[str, int] = {b: 0 for b in backends}

    def measure(self, backend: str, step: Callable[[str, int], tuple[float, float]], i: int,
                device: torch.device) -> None:
        """Time step(backend, i), and the peak memory it allocates (CUDA)."""
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        wall, cpu = step(backend, i)
        self.wall[backend].append(wall)
        self.cpu[backend].append(cpu)
        if device.type == "cuda":
            self.peak[backend] = max(self.peak[backend], torch.cuda.max_memory_allocated(device))

    def results(self, n: int, flops: float, peak_flops: float) -> dict[str, dict[str, float]]:
        """-> per backend measured so far: median step time, img/s, spread, CPU s, MFU (and peak memory on CUDA)."""
        results: dict[str, dict[str, float]] = {}
        for b, times in self.wall.items():
            if not times:
                continue
            med = statistics.median(times)
            results[b] = {"step_s": med, "img_s": n / med, "min_s": min(times), "max_s": max(times),
                          "cpu_s": statistics.median(self.cpu[b]), "mfu": flops / med / peak_flops,
                          "steps": len(times)}
            if self.peak[b]:
                results[b]["peak_mem_gib"] = self.peak[b] / 2 ** 30
        return results


def print_table(results: dict[str, dict[str, float]]) -> None:
    """One line per backend: img/s, step ms, peak memory, ratios to masked, MFU, CPU seconds."""
    ref = results.get("masked")
    print(f"{'backend':<8} {'img/s':>8} {'step ms (min-max)':>24} {'peak mem':>10} {'x masked':>9} "
          f"{'mem x masked':>13} {'MFU':>6} {'cpu s/step':>11} {'cpu x masked':>13}")
    for b, r in results.items():
        mem = f"{r['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in r else "n/a"
        ratio = f"{r['img_s'] / ref['img_s']:.2f}" if ref else "-"
        mem_ratio = f"{r['peak_mem_gib'] / ref['peak_mem_gib']:.2f}" if ref and "peak_mem_gib" in r else "-"
        mfu = f"{100 * r['mfu']:.1f}%"
        span = f"{1e3 * r['step_s']:.0f} ({1e3 * r['min_s']:.0f}-{1e3 * r['max_s']:.0f})"
        cpu_ratio = f"{ref['cpu_s'] / r['cpu_s']:.2f}" if ref else "-"
        print(f"{b:<8} {r['img_s']:>8.2f} {span:>24} {mem:>10} {ratio:>9} {mem_ratio:>13} {mfu:>6} "
              f"{r['cpu_s']:>11.2f} {cpu_ratio:>13}")


class TrainStep:
    """The timed work: one FCMAE train step (forward, backward, AdamW step) of a backend on a fixed batch, with mask i.

    One model and one optimizer for every backend, as the training loop builds them: the weights keep training, so
    every backend times the same shapes and the same resident memory.
    """

    def __init__(self, args: argparse.Namespace, backends: list[str], device: torch.device, dtype: str):
        torch.manual_seed(args.seed)
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.device, self.bf16 = device, dtype == "bf16"
        self.model = FCMAE(args.model, mask_ratio=args.mask_ratio, decoder_dim=args.decoder_dim,
                           patch_size=args.patch_size).to(device).to(memory_format=memory_format)
        # the training loop's optimizer: fused AdamW on CUDA, foreach on the CPU (~2x faster there than per-tensor)
        self.opt = build_adamw([{"params": [p for p in self.model.parameters() if p.requires_grad],
                                 "weight_decay": 0.05}], 1.5e-4, (0.9, 0.95), device)
        size = args.image_size
        self.imgs = torch.randn(args.batch_size, 3, size, size, device=device).contiguous(memory_format=memory_format)
        cpu_masks = [self.model.random_mask(self.imgs.cpu()) for _ in range(args.warmup + args.steps)]
        # as in training: the visible indices come from the host with the mask, so no step waits for them
        self.masks = [(m.to(device), visible_patches(m).to(device)) for m in cpu_masks]
        self.fns = {b: loss_fn(self.model, b) for b in backends}
        if args.compile:
            self.fns = {b: torch.compile(fn) for b, fn in self.fns.items()}

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def __call__(self, backend: str, i: int) -> tuple[float, float]:
        """-> (wall seconds, CPU seconds of this process) of one step, the device synchronised before and after."""
        sync(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        with self.autocast():
            loss = self.fns[backend](self.imgs, *self.masks[i])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        sync(self.device)
        return time.perf_counter() - t0, time.process_time() - c0


def print_header(args: argparse.Namespace, device: torch.device, dtype: str) -> None:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"fcmae bench  {datetime.date.today()}  torch {torch.__version__}  {where}  "
          f"threads {torch.get_num_threads()}")
    print(f"model {args.model}  batch {args.batch_size}  image {args.image_size}px  patch {args.patch_size}  "
          f"mask ratio {args.mask_ratio}  {dtype}  compile {args.compile}  channels_last {args.channels_last}  "
          f"warmup {args.warmup}  steps {args.steps}")


def benchmark(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Time the backends with the options of `fcmae bench` (fcmae.commands.bench) -> per backend img/s, step
    times, CPU seconds, MFU (and peak memory on CUDA); prints the table.

    Eager backends are timed interleaved, step by step, so that drift hits them alike; compiled ones one after the
    other (packed first, when listed so), each compiled just before its own steps. With --json the document is
    rewritten after every round (eager) or backend (compiled): a run cut short keeps every figure measured so far.
    """
    backends, device, dtype = check_args(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    step = TrainStep(args, backends, device, dtype)
    n = args.batch_size
    print_header(args, device, dtype)
    flops = useful_flops(step.model, step.imgs, step.masks[0][0], step.autocast)  # first: every record has its MFU
    peak_flops = matmul_peak(device, torch.bfloat16 if dtype == "bf16" else torch.float32)
    print(f"useful work {flops / n / 1e9:.2f} GFLOP/img (fwd+bwd)  measured matmul peak "
          f"{peak_flops / 1e12:.2f} TFLOP/s ({dtype})", flush=True)
    timings = Timings(backends)

    def save() -> None:
        if args.json is not None:
            write_json_atomic(args.json, json_document(args, device, dtype, timings.results(n, flops, peak_flops),
                                                       flops, peak_flops, timings.wall))

    def profile(b: str) -> None:
        if args.profile is not None:
            write_profile(args.profile, b, lambda: step(b, len(step.masks) - 1), device, args.compile)
            print(f"wrote {os.path.join(args.profile, f'profile-{b}.txt')} (and .json)", flush=True)

    warm, steps = range(args.warmup), range(args.warmup, args.warmup + args.steps)
    if args.compile:  # one backend at a time: compiling takes minutes, and a finished backend is already saved
        for b in backends:
            for i in warm:
                step(b, i)
            for i in steps:
                timings.measure(b, step, i, device)
            save()
            profile(b)
    else:
        for i in warm:  # interleaved warm-up (allocator, caches)
            for b in backends:
                step(b, i)
        for i in steps:  # interleaved timing: drift hits every backend alike
            for b in backends:
                timings.measure(b, step, i, device)
            save()
        for b in backends:
            profile(b)
    results = timings.results(n, flops, peak_flops)
    print_table(results)
    if args.json is not None:
        print(f"wrote {args.json}")
    return results


def json_document(args: argparse.Namespace, device: torch.device, dtype: str, results: dict[str, dict[str, float]],
                  flops: float, peak_flops: float, times: dict[str, list[float]]) -> dict[str, Any]:
    """The run as one JSON-ready dict: environment, settings, and per backend img/s, step ms, memory, MFU, ratios."""
    n_mm, reps = matmul_size(device)
    ref = results.get("masked")
    backends: dict[str, dict[str, Any]] = {}
    for b, r in results.items():
        mem = r.get("peak_mem_gib")
        backends[b] = {
            "img_s": r["img_s"],
            "step_ms": 1e3 * r["step_s"],  # median
            "step_ms_min": 1e3 * r["min_s"],
            "step_ms_max": 1e3 * r["max_s"],
            "step_ms_all": [1e3 * t for t in times[b]],
            "steps_done": r["steps"],
            "cpu_s_per_step": r["cpu_s"],
            "peak_mem_gib": mem,  # None on CPU
            "mfu": r["mfu"],
            "img_s_x_masked": r["img_s"] / ref["img_s"] if ref else None,
            "peak_mem_x_masked": mem / ref["peak_mem_gib"] if ref and mem is not None else None,
        }
    return {
        "schema": "fcmae-bench/1",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(args),
        "argv": shlex.join(sys.argv),  # as this process was started (pytest, python -m fcmae, ...)
        **environment(device),
        "model": args.model,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "mask_ratio": args.mask_ratio,
        "decoder_dim": args.decoder_dim,
        "patch_size": args.patch_size,
        "dtype": dtype,
        "compile": args.compile,
        "channels_last": args.channels_last,
        "variant": f"{'compile' if args.compile else 'eager'}-{'channels_last' if args.channels_last else 'nchw'}",
        "steps": args.steps,
        "warmup": args.warmup,
        "useful_gflop_per_img": flops / args.batch_size / 1e9,
        "matmul_peak_tflops": peak_flops / 1e12,
        "matmul_peak": {"shape": [n_mm, n_mm, n_mm], "dtype": "bf16" if dtype == "bf16" else "fp32", "reps": reps},
        "backends_asked": [b.strip() for b in args.backends.split(",") if b.strip()],
        "complete": all(r["steps"] == args.steps for r in results.values())
        and len(results) == len([b for b in args.backends.split(",") if b.strip()]),
        "backends": backends,
    }
