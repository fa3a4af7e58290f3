"""`fcmae demo`: a short FCMAE pretraining of ConvNeXt V2 atto on the built-in digits, on CPU, printing the loss."""
from __future__ import annotations

import argparse
import time

import torch

from fcmae.demo_data import load_digits
from fcmae.model import FCMAE


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="short FCMAE pretraining on the built-in digits (CPU, about a minute)",
        description="Pretrain ConvNeXt V2 atto with FCMAE on scikit-learn's handwritten digits (upscaled to 64 px) "
        "and print the loss per epoch. Nothing is downloaded.",
    )
    p.add_argument("--epochs", type=int, default=4, help="passes over the 1797 digits (default 4)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--size", type=int, default=64, help="image side in pixels, a multiple of 32 (default 64)")
    p.add_argument("--backend", default="packed", help="sparse backend: packed (default, fast) or masked (reference)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(args.seed)
    imgs, _ = load_digits(args.size)
    imgs = (imgs - 0.5) / 0.5
    model = FCMAE("convnextv2_atto", in_chans=3, mask_ratio=0.5, decoder_dim=128, backend=args.backend)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=0.05)
    losses = {}
    print(f"FCMAE demo: convnextv2_atto on {len(imgs)} digits at {args.size}px, backend {args.backend}")
    for epoch in range(args.epochs):
        t0, total, steps = time.time(), 0.0, 0
        for batch in torch.randperm(len(imgs)).split(args.batch_size):
            loss, _, _ = model(imgs[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        losses[epoch] = total / steps
        print(f"epoch {epoch + 1}/{args.epochs}  loss {losses[epoch]:.4f}  ({time.time() - t0:.1f}s)", flush=True)
    return losses
