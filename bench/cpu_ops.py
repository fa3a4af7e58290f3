"""CPU cost of the packed backend's own depthwise conv and GRN norm against the aten ops they replace, per op and in
a whole FCMAE train step (by default the demo's shapes: atto, grey 64 px, 16-px mask patches, batch 32).

Part 1, per stage shape: the 7x7 depthwise conv forward + backward on the zero-filled channels_last grid
(nn.Conv2d autograd vs `depthwise_conv`) and GRN's token-axis L2 norm forward + backward (`x.norm` vs
`_TokenL2Norm`). Part 2: the packed train step (forward, backward, AdamW) with aten's ops and with ours, run
alternately; best of --repeat rounds (the machine is shared: the minimum is the least disturbed), ratio printed.

    PYTHONPATH=. python bench/cpu_ops.py
"""
from __future__ import annotations

import argparse
import contextlib
import time
from typing import Callable, Iterator

import torch

from convnextv2.backends import packed
from fcmae.masking import num_visible
from fcmae.model import FCMAE


def best_ms(fn: Callable[[], object], steps: int, repeat: int) -> float:
    """Best over `repeat` rounds of the mean time of `steps` calls, in ms (after two warm-up calls)."""
    fn(), fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, (time.perf_counter() - t0) / steps * 1000)
    return best


def aten_norm(x: torch.Tensor) -> torch.Tensor:
    return x.norm(p=2, dim=1, keepdim=True)


@contextlib.contextmanager
def aten_ops() -> Iterator[None]:
    """The packed backend as it was before its own ops: the conv_dw module's autograd and x.norm."""
    saved = packed.depthwise_conv, packed.token_l2_norm
    packed.depthwise_conv, packed.token_l2_norm = (lambda conv, x: conv(x)), aten_norm
    try:
        yield
    finally:
        packed.depthwise_conv, packed.token_l2_norm = saved


def forward_backward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor) -> Callable:
    def step() -> None:
        fn(x).backward(grad)
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="convnextv2_atto")
    p.add_argument("--in-chans", type=int, default=1)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--steps", type=int, default=10, help="train steps per timing round (part 2)")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = FCMAE(args.model, in_chans=args.in_chans, mask_ratio=args.mask_ratio, decoder_dim=128,
                  backend="packed", patch_size=args.patch_size)
    n, grid = args.batch_size, args.image_size // args.patch_size
    visible = num_visible(grid * grid, args.mask_ratio)
    print(f"{args.model}, {args.image_size} px, patch {args.patch_size}, batch {n}, {visible}/{grid * grid} patches "
          f"visible, {args.threads} threads; ms, best of {args.repeat}")

    print("\npart 1: per op, forward + backward")
    print(f"{'op':<10} {'C':>5} {'grid':>6} {'tokens':>7} {'aten ms':>8} {'ours ms':>8} {'ratio':>6}")
    side = args.image_size // (args.patch_size // 8)  # stage-0 resolution (stem stride = patch / 8)
    for i, stage in enumerate(model.encoder.stages):
        conv = stage.blocks[0].conv_dw
        c, s = conv.in_channels, side >> i
        x = torch.randn(n, c, s, s).to(memory_format=torch.channels_last).requires_grad_(True)
        grad = torch.randn(n, c, s, s).to(memory_format=torch.channels_last)
        aten = best_ms(forward_backward(conv, x, grad), args.steps, args.repeat)
        ours = best_ms(forward_backward(lambda t: packed.depthwise_conv(conv, t), x, grad), args.steps, args.repeat)
        print(f"{'dwconv':<10} {c:>5} {f'{s}x{s}':>6} {'':>7} {aten:8.2f} {ours:8.2f} {aten / ours:5.2f}x")
        tokens = visible * (s // grid) ** 2
        t = torch.randn(n, tokens, 4 * c, requires_grad=True)  # GRN sits after fc1: 4x the stage width
        g = torch.randn(n, 1, 4 * c)
        aten = best_ms(forward_backward(aten_norm, t, g), args.steps, args.repeat)
        ours = best_ms(forward_backward(packed._TokenL2Norm.apply, t, g), args.steps, args.repeat)
        print(f"{'grn norm':<10} {4 * c:>5} {'':>6} {tokens:>7} {aten:8.2f} {ours:8.2f} {aten / ours:5.2f}x")

    print("\npart 2: packed train step (forward, backward, AdamW)")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    imgs = torch.randn(n, args.in_chans, args.image_size, args.image_size)
    mask = model.random_mask(imgs)

    def train_step() -> None:
        loss, _, _ = model(imgs, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    best = {"aten": float("inf"), "ours": float("inf")}
    for _ in range(args.repeat):  # alternate, so both see the same disturbances
        with aten_ops():
            best["aten"] = min(best["aten"], best_ms(train_step, args.steps, 1))
        best["ours"] = min(best["ours"], best_ms(train_step, args.steps, 1))
    for name, ms in best.items():
        print(f"{name:<5} {ms:7.1f} ms/step  {n / ms * 1000:6.1f} img/s")
    print(f"ratio aten / ours: {best['aten'] / best['ours']:.2f}x")


if __name__ == "__main__":
    main()
