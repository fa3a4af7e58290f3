"""`fcmae shards SRC DST`: pack a folder of images into webdataset tar shards (fcmae.data.write_shards)."""
from __future__ import annotations

import argparse

from fcmae.data.write_shards import write_shards
from fcmae.engine.config import check_seed, check_writable_dir


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "shards", help="write webdataset tar shards from a folder of images",
        description="Pack the images under SRC (recursive; ImageFolder class subfolders become labels in 'cls') "
        "into DST/shard-000000.tar, ... plus DST/sizes.json. Use them with data.path=DST data.format=webdataset. "
        "Unreadable images are skipped and counted. For 224-px training, --max-size 256 (or 320) makes decoding "
        "several times cheaper (see BENCHMARKS.md).",
    )
    p.add_argument("src", help="image folder or ImageFolder root")
    p.add_argument("dst", help="output folder (created; must be empty unless --overwrite)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--prefix", default="shard", help="shard file prefix (default 'shard')")
    p.add_argument("--no-shuffle", action="store_true", help="keep the sorted file order (default: shuffled)")
    p.add_argument("--seed", type=int, default=0, help="seed of the file-order shuffle")
    p.add_argument("--max-size", type=int, default=None, metavar="S",
                   help="re-encode images whose short side exceeds S pixels to short side S (default: store as is)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete DST's existing *.tar shards and sizes.json first (default: refuse a non-empty DST)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    check_seed("--seed", args.seed)
    check_writable_dir(args.dst, "DST")  # a file, or a folder that cannot be written: before any image is read
    skipped: list[str] = []
    sizes = write_shards(args.src, args.dst, args.shard_size, args.prefix, not args.no_shuffle, args.seed,
                         args.max_size, args.quality, args.overwrite, skipped)
    print(f"wrote {sum(sizes.values())} images in {len(sizes)} shards to {args.dst}"
          + (f"; skipped {len(skipped)} unreadable (first: {skipped[0]})" if skipped else ""))
