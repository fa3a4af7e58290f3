"""Fine-tuning train step: `fcmae finetune`'s against a plain timm one, same model, batch and dtype, side by side.

ours: FinetuneTask.loss as the training loop calls it (timm Mixup/CutMix with per-step seeds, SoftTargetCrossEntropy,
drop path under a per-step forked RNG), AdamW over the layer-decay parameter groups, then the EMA update.
timm: timm.create_model with the same drop path, Mixup + SoftTargetCrossEntropy, timm's create_optimizer_v2 AdamW
(no decay on norms and biases), ModelEmaV3: the step of timm's own train.py.
Both on one random batch, interleaved step by step after a warm-up; prints img/s, step ms, peak memory (CUDA) and
ours/timm. Settings (mixup, layer decay, EMA, drop path) come from configs/finetune/<size>.yaml.

    PYTHONPATH=. python bench/finetune_step.py --model convnextv2_base --batch-size 64 --device cuda [--json PATH]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fcmae.bench import check_json_path, environment, sync, write_json_atomic  # noqa: E402
from fcmae.config import load_config  # noqa: E402
from fcmae.engine.distributed import DistInfo  # noqa: E402
from fcmae.engine.optim import build_adamw  # noqa: E402
from fcmae.finetune import FinetuneTask  # noqa: E402
from fcmae.finetune_config import FinetuneConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_imagefolder(root: str, classes: int, per_class: int) -> None:
    """FinetuneTask builds its splits from files: a few 40-px images per class (the timed batch is random tensors)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 1)):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"class_{c}"), exist_ok=True)
            for i in range(n):
                Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(
                    os.path.join(root, split, f"class_{c}", f"{i}.png"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="convnextv2_base")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    if args.json:
        check_json_path(args.json)
    device = torch.device(args.device)
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    size_yaml = os.path.join(ROOT, "configs", "finetune", args.model.replace("convnextv2_", "") + ".yaml")
    n, k = args.batch_size, args.classes

    with tempfile.TemporaryDirectory() as data:
        tiny_imagefolder(data, k, -(-n // k))
        cfg = load_config(FinetuneConfig, size_yaml if os.path.isfile(size_yaml) else None, [
            f"model.name={args.model}", f"device={device.type}", f"data.path={data}", f"data.image_size={args.image_size}",
            f"data.batch_size={n}", "data.num_workers=0", f"amp={dtype}", f"channels_last={args.channels_last}",
            f"compile={args.compile}", "output_dir=" + os.path.join(data, "out")])
        task = FinetuneTask(cfg, DistInfo(device=device))  # one process
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    o, a = cfg.optim, cfg.aug
    ours_model = task.model.to(memory_format=memory_format)
    ours_opt = build_adamw(task.param_groups(o.weight_decay), 1e-4, o.betas)
    ours_fwd = torch.compile(ours_model) if args.compile else ours_model

    torch.manual_seed(0)
    timm_model = timm.create_model(args.model, num_classes=k, drop_path_rate=cfg.model.drop_path).to(
        device, memory_format=memory_format)
    timm_opt = create_optimizer_v2(timm_model, "adamw", lr=1e-4, weight_decay=o.weight_decay, betas=o.betas)
    timm_fwd = torch.compile(timm_model) if args.compile else timm_model
    timm_ema = ModelEmaV3(timm_model, decay=cfg.ema.decay, device=device) if cfg.ema.enabled else None
    mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.switch_prob,
                  mode="batch", label_smoothing=a.smoothing, num_classes=k) if a.mixing else None
    criterion = SoftTargetCrossEntropy() if mixup is not None else torch.nn.CrossEntropyLoss(label_smoothing=a.smoothing)

    imgs = torch.randn(n, 3, args.image_size, args.image_size, device=device)
    target = torch.randint(0, k, (n,), device=device)
    batch = (imgs, target, torch.zeros(n, dtype=torch.bool))

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()

    def ours(i: int) -> None:  # as fcmae.engine.loop.train's inner loop (no accumulation, no DDP)
        with autocast():
            loss = task.loss(ours_fwd, batch, 0, i)
        loss.backward()
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)
        task.after_step(i + 1)
        loss.item()

    def plain(i: int) -> None:  # as timm's train.py
        x, y = imgs.contiguous(memory_format=memory_format), target
        if mixup is not None:
            x, y = mixup(x, y)
        with autocast():
            loss = criterion(timm_fwd(x), y)
        loss.backward()
        timm_opt.step()
        timm_opt.zero_grad(set_to_none=True)
        if timm_ema is not None:
            timm_ema.update(timm_model, step=i + 1)
        loss.item()

    steps: dict[str, Callable[[int], None]] = {"ours": ours, "timm": plain}
    times: dict[str, list[float]] = {s: [] for s in steps}
    peak = {s: 0 for s in steps}
    for i in range(args.warmup + args.steps):
        for name, fn in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = time.perf_counter()
            fn(i)
            sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
                if device.type == "cuda":
                    peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device))
    results = {}
    for name in steps:
        med = statistics.median(times[name])
        results[name] = {"img_s": n / med, "step_ms": 1e3 * med, "step_ms_all": [1e3 * t for t in times[name]],
                         "peak_mem_gib": peak[name] / 2 ** 30 if device.type == "cuda" else None}
    ratio = results["ours"]["img_s"] / results["timm"]["img_s"]
    variant = f"{'compile' if args.compile else 'eager'}-{'channels_last' if args.channels_last else 'nchw'}"
    print(f"finetune step  {args.model}  batch {n}  {args.image_size}px  {dtype}  {variant}  {k} classes  "
          f"mixup {a.mixing}  EMA {cfg.ema.enabled}  layer decay {o.layer_decay}")
    print(f"{'step':<6}{'img/s':>10}{'step ms':>10}{'peak GiB':>10}")
    for name, r in results.items():
        mem = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
        print(f"{name:<6}{r['img_s']:>10.1f}{r['step_ms']:>10.1f}{mem:>10}")
    print(f"ours / timm img/s: {ratio:.2f}x")
    doc = {"schema": "fcmae-finetune-step/1", "name": f"finetune-step:{args.model}:{variant}:bs{n}:{dtype}",
           "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
           "command": "python bench/finetune_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
           **environment(device), "model": args.model, "batch_size": n, "image_size": args.image_size,
           "dtype": dtype, "variant": variant, "classes": k, "steps": args.steps, "warmup": args.warmup,
           "ours_x_timm_img_s": ratio, "steps_compared": results}
    if args.json:
        write_json_atomic(args.json, doc)
        print(f"wrote {args.json}")
    return doc


if __name__ == "__main__":
    main()
