"""`fcmae bench`: time the full FCMAE train step (forward, backward, AdamW step) per sparse backend, side by side.

All backends run the same model (one FCMAE, one AdamW: the weights keep training, so every backend times the same
shapes and the same resident memory), the same batch and the same masks, interleaved step by step after a warm-up,
so drift on a shared machine hits them alike. `dense` is the yardstick: timm's own `forward_features` on the unmasked
image (every position computed), followed by the same decoder and masked-patch loss.

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
import platform
import statistics
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from convnextv2.backends import BACKENDS
from convnextv2.sparse import sparse_forward
from fcmae.model import FCMAE

DENSE = "dense"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="time the FCMAE train step per sparse backend (img/s, memory, ratios to masked)",
        description=__doc__.split("\n\n")[0] + " Prints one line per backend; see BENCHMARKS.md for results.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="convnextv2_tiny", help="timm ConvNeXt V2 name (default convnextv2_tiny)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step (default 8)")
    p.add_argument("--image-size", type=int, default=224, help="square side in pixels, a multiple of 32 (default 224)")
    p.add_argument("--mask-ratio", type=float, default=0.6, help="fraction of patches masked (default 0.6)")
    p.add_argument("--decoder-dim", type=int, default=512, help="FCMAE decoder width (default 512)")
    p.add_argument("--backends", default="masked,packed,dense",
                   help=f"comma list of sparse backends and/or '{DENSE}' (default masked,packed,dense)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per backend, interleaved (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per backend first (default 2)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="fp32, or bf16 autocast (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile each backend's loss function")
    p.add_argument("--channels-last", action="store_true", help="model and images in channels_last memory format")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, images and masks (default 0)")


def check_args(args: argparse.Namespace) -> tuple[list[str], torch.device, str]:
    """Fail fast on bad options, before building a model. -> (backends, device, dtype)."""
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    valid = sorted(BACKENDS) + [DENSE]
    bad = [b for b in backends if b not in valid]
    if not backends or bad:
        raise ValueError(f"unknown backend(s) {bad or args.backends!r} in --backends; valid: {', '.join(valid)}")
    if args.image_size <= 0 or args.image_size % 32:
        raise ValueError(f"--image-size {args.image_size} is not a positive multiple of the patch size 32")
    for name in ("batch_size", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda[:N] or auto, got {args.device!r}")
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return backends, device, dtype


def loss_fn(model: FCMAE, backend: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The FCMAE loss with the encoder run by `backend` (or densely by timm on the unmasked image for `dense`)."""
    def fn(imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if backend == DENSE:
            features = model.encoder.forward_features(imgs)
        else:
            features = sparse_forward(model.encoder, imgs, mask, backend)
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


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured FLOP/s of a large square matmul: the practical peak the MFU is relative to."""
    n, reps = (8192, 20) if device.type == "cuda" else (1024, 5)
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


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    backends, device, dtype = check_args(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = FCMAE(args.model, mask_ratio=args.mask_ratio, decoder_dim=args.decoder_dim).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    # foreach: the multi-tensor AdamW (torch's default on CUDA) also on CPU, where it is ~2x faster than per-tensor.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1.5e-4, betas=(0.9, 0.95),
                            weight_decay=0.05, foreach=True)
    n, size = args.batch_size, args.image_size
    imgs = torch.randn(n, 3, size, size, device=device).contiguous(memory_format=memory_format)
    masks = [model.random_mask(imgs) for _ in range(args.warmup + args.steps)]

    def autocast():
        if dtype == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    fns = {b: loss_fn(model, b) for b in backends}
    if args.compile:
        fns = {b: torch.compile(fn) for b, fn in fns.items()}

    def step(backend: str, mask: torch.Tensor) -> tuple[float, float]:
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast():
            loss = fns[backend](imgs, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        return time.perf_counter() - t0, time.process_time() - c0

    print(f"fcmae bench  {datetime.date.today()}  torch {torch.__version__}  "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}"
          f"  threads {torch.get_num_threads()}")
    print(f"model {args.model}  batch {n}  image {size}px  mask ratio {args.mask_ratio}  {dtype}  "
          f"compile {args.compile}  channels_last {args.channels_last}  warmup {args.warmup}  steps {args.steps}")
    times: dict[str, list[float]] = {b: [] for b in backends}
    cpu_times: dict[str, list[float]] = {b: [] for b in backends}  # CPU seconds of this process: on a shared CPU,
    # less sensitive than wall time to other jobs (with 1 thread it is the step's own compute time)
    peak: dict[str, int] = {b: 0 for b in backends}
    for i in range(args.warmup):  # interleaved warm-up (compiles, allocator, caches)
        for b in backends:
            step(b, masks[i])
    for i in range(args.warmup, args.warmup + args.steps):  # interleaved timing: drift hits every backend alike
        for b in backends:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            wall, cpu = step(b, masks[i])
            times[b].append(wall)
            cpu_times[b].append(cpu)
            if device.type == "cuda":
                peak[b] = max(peak[b], torch.cuda.max_memory_allocated(device))

    flops = useful_flops(model, imgs, masks[0], autocast)
    peak_flops = matmul_peak(device, torch.bfloat16 if dtype == "bf16" else torch.float32)
    print(f"useful work {flops / n / 1e9:.2f} GFLOP/img (fwd+bwd)  measured matmul peak "
          f"{peak_flops / 1e12:.2f} TFLOP/s ({dtype})")
    results: dict[str, dict[str, float]] = {}
    for b in backends:
        med = statistics.median(times[b])
        results[b] = {"step_s": med, "img_s": n / med, "min_s": min(times[b]), "max_s": max(times[b]),
                      "cpu_s": statistics.median(cpu_times[b]), "mfu": flops / med / peak_flops}
        if device.type == "cuda":
            results[b]["peak_mem_gib"] = peak[b] / 2 ** 30
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
    return results
