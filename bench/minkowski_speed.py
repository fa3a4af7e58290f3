"""CPU speed of the sparse backends side by side: encoder forward + backward, `minkowski` vs `masked` (and any other).

    PYTHONPATH=. python bench/minkowski_speed.py [--model convnextv2_atto] [--batch 4] [--size 128] [--iters 10]

Backends are timed interleaved (one step of each per round) so load from other jobs hits them alike; the median
step time is reported with its ratio to `masked`. Needs MinkowskiEngine for `minkowski` (`make minkowski`).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from convnextv2 import BACKENDS, SparseEncoder, create_encoder
from fcmae.masking import random_mask


def step(sparse: SparseEncoder, x: torch.Tensor, mask: torch.Tensor) -> float:
    """Seconds for one forward + backward of the encoder (loss = mean of squared features)."""
    sparse.zero_grad(set_to_none=True)
    start = time.perf_counter()
    sparse(x, mask).square().mean().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="convnextv2_atto")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128, help="square image side, a multiple of 32")
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--backends", default=",".join(sorted(BACKENDS)), help="comma-separated; masked is the base")
    args = parser.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    unknown = set(backends) - set(BACKENDS)
    if unknown or "masked" not in backends:
        raise SystemExit(f"--backends must name registered backends including masked ({', '.join(sorted(BACKENDS))})")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    enc = create_encoder(args.model)
    x = torch.randn(args.batch, 3, args.size, args.size)
    mask = random_mask(args.batch, (args.size // 32, args.size // 32), args.mask_ratio)
    encoders = {b: SparseEncoder(enc, b) for b in backends}
    times: dict[str, list[float]] = {b: [] for b in backends}
    for i in range(args.warmup + args.iters):
        for b in backends:
            t = step(encoders[b], x, mask)
            if i >= args.warmup:
                times[b].append(t)

    print(f"{args.model}, batch {args.batch}, {args.size}x{args.size}, mask ratio {args.mask_ratio}, "
          f"fwd+bwd, {args.iters} iters, {args.threads} threads, torch {torch.__version__}, "
          f"{platform.machine()} {platform.processor() or ''}".rstrip())
    base = statistics.median(times["masked"])
    print(f"{'backend':<12}{'median ms':>12}{'min ms':>10}{'vs masked':>12}")
    for b in backends:
        med = statistics.median(times[b])
        print(f"{b:<12}{med * 1e3:>12.1f}{min(times[b]) * 1e3:>10.1f}{med / base:>11.2f}x")


if __name__ == "__main__":
    main()
