"""`fcmae demo`: a short FCMAE pretraining of ConvNeXt V2 atto on the built-in digits, on CPU, printing the loss.

It is `fcmae pretrain --config configs/pretrain/demo.yaml` in a fresh run directory: the same engine, checkpoints,
metrics and reconstruction pictures as a real run.
"""
from __future__ import annotations

import argparse
import os
import time

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "pretrain", "demo.yaml")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="short FCMAE pretraining on the built-in digits (CPU, a couple of minutes)",
        description="Pretrain ConvNeXt V2 atto with FCMAE on scikit-learn's handwritten digits (upscaled to 64 px) "
        "with configs/pretrain/demo.yaml and print the loss per epoch. Nothing is downloaded.",
    )
    p.add_argument("--epochs", type=int, default=None, help="passes over the 1797 digits (default: demo.yaml's, 4)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels, a multiple of 32 (default 64)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default 64)")
    p.add_argument("--lr", type=float, default=None, help="absolute learning rate (default: blr x batch / 256 = 1.5e-3)")
    p.add_argument("--backend", default=None, help="sparse backend (default: demo.yaml's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run directory (default: a new runs/demo/<time>)")
    p.add_argument("overrides", nargs="*", help="more key=value overrides of demo.yaml")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    from fcmae.config import load_config
    from fcmae.pretrain import pretrain
    from fcmae.pretrain_config import PretrainConfig

    if not os.path.isfile(DEMO_CONFIG):
        raise ValueError(f"{DEMO_CONFIG} is missing; run the demo from a source checkout (pip install -e .)")
    out = args.out or os.path.join("runs", "demo", time.strftime("%Y%m%d-%H%M%S"))
    overrides = [f"output_dir={out}", f"seed={args.seed}"]
    if args.epochs is not None:
        overrides.append(f"optim.epochs={args.epochs}")
    if args.size is not None:
        overrides.append(f"data.image_size={args.size}")
    if args.batch_size is not None:
        overrides.append(f"data.batch_size={args.batch_size}")
    if args.lr is not None:
        overrides.append(f"optim.lr={args.lr}")
    if args.backend is not None:
        overrides.append(f"model.backend={args.backend}")
    cfg = load_config(PretrainConfig, DEMO_CONFIG, overrides + list(args.overrides))
    summary = pretrain(cfg)
    print(f"run directory: {out} (last.pt, metrics.jsonl, reconstruction-epoch*.png)")
    return summary
