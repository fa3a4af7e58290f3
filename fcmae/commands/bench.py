"""`fcmae bench`: time the full FCMAE train step per sparse backend, side by side (fcmae.bench says how)."""
from __future__ import annotations

import argparse
from typing import Any

from convnextv2.encoder import PATCH_SIZES
from fcmae import bench as library
from fcmae.bench import DENSE, benchmark


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="time the FCMAE train step per sparse backend (img/s, memory, ratios to masked)",
        description=library.__doc__.split("\n\n")[0] + " Prints one line per backend (and with --json writes them as one "
        "JSON document); see BENCHMARKS.md for results.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="convnextv2_tiny", help="timm ConvNeXt V2 name")
    p.add_argument("--batch-size", type=int, default=8, help="images per step")
    p.add_argument("--image-size", type=int, default=224, help="square side in pixels, a multiple of --patch-size")
    p.add_argument("--patch-size", type=int, default=32, choices=PATCH_SIZES,
                   help="mask patch side = total stride (16 / 8: stem stride 2 / 1)")
    p.add_argument("--mask-ratio", type=float, default=0.6, help="fraction of mask patches masked")
    p.add_argument("--decoder-dim", type=int, default=512, help="FCMAE decoder width")
    p.add_argument("--backends", default="masked,packed,dense",
                   help=f"comma list of sparse backends and/or '{DENSE}'")
    p.add_argument("--steps", type=int, default=10,
                   help="timed steps per backend (interleaved; one backend after the other with --compile)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per backend first")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="fp32, or bf16 autocast (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each backend's loss function (backends then run one after the other, in "
                        "--backends order)")
    p.add_argument("--channels-last", action="store_true", help="model and images in channels_last memory format")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, images and masks")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after timing, profile 3 steps per backend with torch.profiler; write the top ops to "
                        "DIR/profile-<backend>.txt and .json (for bench/roofline.py; the folder must exist)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the results as one JSON document to PATH (atomically; rewritten as backends "
                        "are measured, so a run cut short keeps its figures; the folder must exist)")


def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    return benchmark(args)
