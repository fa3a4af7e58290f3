"""`fcmae shards SRC DST`: pack a folder of images (flat, recursive or ImageFolder) into webdataset tar shards.

The encoded bytes are stored as they are (no re-encoding); an ImageFolder's class index goes in `cls`.
DST/sizes.json maps each shard name to its sample count (the pretrain engine reads it for the epoch length).
"""
from __future__ import annotations

import argparse
import json
import os
import random

import webdataset as wds

from fcmae.data.folder import imagefolder_samples, is_imagefolder, list_images


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "shards", help="write webdataset tar shards from a folder of images",
        description="Pack the images under SRC (recursive; ImageFolder class subfolders become labels in 'cls') "
        "into DST/shard-000000.tar, ... plus DST/sizes.json. Use them with data.path=DST data.format=webdataset.",
    )
    p.add_argument("src", help="image folder or ImageFolder root")
    p.add_argument("dst", help="output folder (created)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--prefix", default="shard", help="shard file prefix (default 'shard')")
    p.add_argument("--no-shuffle", action="store_true", help="keep the sorted file order (default: shuffled)")
    p.add_argument("--seed", type=int, default=0, help="seed of the file-order shuffle")
    p.set_defaults(func=run)


def write_shards(src: str, dst: str, shard_size: int = 1000, prefix: str = "shard", shuffle: bool = True,
                 seed: int = 0) -> dict[str, int]:
    """Write the shards; -> {shard file name: sample count} (also saved as DST/sizes.json)."""
    if not os.path.isdir(src):
        raise ValueError(f"SRC {src!r} is not a folder")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    if is_imagefolder(src):
        files, labels, _ = imagefolder_samples(src)
    else:
        files = list_images(src)
        labels = [-1] * len(files)
    if not files:
        raise ValueError(f"no image files under {src!r}")
    order = list(range(len(files)))
    if shuffle:
        random.Random(seed).shuffle(order)
    os.makedirs(dst, exist_ok=True)
    sizes: dict[str, int] = {}
    pattern = os.path.join(dst, f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink:
        for n, i in enumerate(order):
            ext = os.path.splitext(files[i])[1].lower().lstrip(".")
            with open(files[i], "rb") as f:
                sample = {"__key__": f"{n:09d}", ext: f.read()}
            if labels[i] >= 0:
                sample["cls"] = labels[i]
            name = os.path.basename(pattern % (n // shard_size))
            sizes[name] = sizes.get(name, 0) + 1
            sink.write(sample)
    with open(os.path.join(dst, "sizes.json"), "w") as f:
        json.dump(sizes, f, indent=1)
    return sizes


def run(args: argparse.Namespace) -> None:
    if os.path.exists(args.dst) and not os.path.isdir(args.dst):
        raise ValueError(f"DST {args.dst!r} is an existing file; give a folder for the shards (created if absent)")
    sizes = write_shards(args.src, args.dst, args.shard_size, args.prefix, not args.no_shuffle, args.seed)
    print(f"wrote {sum(sizes.values())} images in {len(sizes)} shards to {args.dst}")
