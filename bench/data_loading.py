"""Data loading speed: decoded + augmented images/s per DataLoader worker for JPEGs (SPEC §2 transforms).

Generates N JPEGs (default 256, 500x375 like an average ImageNet picture), then times the pretraining pipeline
(decode -> RandomResizedCrop(224, 0.2-1, bicubic) -> flip -> normalise) with 0 workers (in-process) and with W
workers, and prints img/s and img/s per worker side by side.

    PYTHONPATH=. python bench/data_loading.py --images 256 --workers 2
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fcmae.data.folder import ImageFiles, list_images
from fcmae.data.transforms import train_transform


def make_jpegs(folder: str, n: int, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        low = (rng.random((12, 16, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(low).resize(size, Image.BICUBIC)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 20, (size[1], size[0], 3))  # texture: realistic size
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def time_loader(ds: ImageFiles, workers: int, batch: int) -> float:
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, shuffle=False, drop_last=False)
    t0, n = time.perf_counter(), 0
    for x, _, _ in loader:
        n += len(x)
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(1)  # one core per loader process, as in training
    with tempfile.TemporaryDirectory() as d:
        make_jpegs(d, args.images, (500, 375))
        ds = ImageFiles(list_images(d), train_transform(args.size, 3), 3)
        kb = sum(os.path.getsize(f) for f in ds.files) / len(ds.files) / 1024
        time_loader(ds, 0, args.batch)  # warm the page cache
        single = time_loader(ds, 0, args.batch)
        multi = time_loader(ds, args.workers, args.batch) if args.workers else float("nan")
    print(f"{args.images} JPEGs 500x375 (~{kb:.0f} KiB) -> RandomResizedCrop {args.size} bicubic + flip + normalise")
    print(f"{'loader':<22}{'img/s':>10}{'img/s/worker':>15}")
    print(f"{'in-process (0 workers)':<22}{single:>10.1f}{single:>15.1f}")
    if args.workers:
        print(f"{f'{args.workers} workers':<22}{multi:>10.1f}{multi / args.workers:>15.1f}")
        print(f"speedup {args.workers} workers / in-process: {multi / single:.2f}x")


if __name__ == "__main__":
    main()
