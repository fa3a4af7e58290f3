"""Data loading speed per CPU core: the old pretraining pipeline against the new one, on the same generated JPEGs.

old: PIL full decode -> RandomResizedCrop(224, (0.2, 1), bicubic) -> flip -> ToTensor -> Normalize, per sample in
     float on the CPU, seeded per sample with torch.manual_seed (the code before this change, `OldImageFiles`).
plain: the same transforms with today's per-sample seeding (CPU generator only): what the seeding fix alone buys.
new: crop box first, JPEG decoded (libjpeg-turbo via simplejpeg) at the smallest DCT scale that keeps the crop
     >= 224 px, crop + resize in torch's uint8 kernels, flip, uint8 out (`transforms.train_transform`);
     normalisation happens batched on the device (its CPU cost, were it done on the CPU, is printed too).
new-pil: the same with PIL decoding the JPEG (`draft` for the DCT scale): what simplejpeg adds.
new+shards: the new pipeline on the same images pre-resized to short side --max-size (`fcmae shards --max-size`).

For ImageNet-like 500x375 JPEGs and 2000x1500 photos, each loader runs in-process (0 workers; images per CPU
second of this process, so other load on the machine matters less) in --rounds interleaved rounds (median), and
with --workers workers (wall img/s, and img per CPU second summed over the workers). The output ends with

    new/old per core at 500x375: N.NNx
    new/old per core at 2000x1500: N.NNx

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/data_loading.py --workers 2
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fcmae.data.crop_decode import CropDecode
from fcmae.data.decode import decode_image
from fcmae.data.device import to_device
from fcmae.data.folder import ImageFiles, list_images
from fcmae.data.transforms import IMAGENET_MEAN, IMAGENET_STD, plain_train_transform, train_transform
from fcmae.data.write_shards import prepare_image
from fcmae.engine.seeds import derive_seed


def make_jpegs(folder: str, n: int, size: tuple[int, int], seed: int = 0) -> None:
    """Photo-like JPEGs (smooth colours + noise texture, quality 90) of `size` = (w, h)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = (rng.random((12, 16, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(low).resize(size, Image.BICUBIC)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 20, (size[1], size[0], 3), dtype=np.int16)
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def pre_resize(src: str, dst: str, max_size: int) -> None:
    """The files of `src` as `fcmae shards --max-size` stores them (short side <= max_size)."""
    os.makedirs(dst, exist_ok=True)
    for f in list_images(src):
        data, ext = prepare_image(open(f, "rb").read(), max_size)
        with open(os.path.join(dst, os.path.splitext(os.path.basename(f))[0] + "." + (ext or "jpg")), "wb") as out:
            out.write(data)


class OldImageFiles(ImageFiles):
    """The loader as it was: full decode, then the float transforms under fork_rng + torch.manual_seed."""

    def __getitem__(self, i: int):
        img = decode_image(self.files[i], self.in_chans)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, self.epoch, i))
            return self.transform(img), -1, 0


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def time_loader(ds: ImageFiles, workers: int, batch: int) -> tuple[float, float]:
    """-> (img/s wall, img per CPU second of the loading processes)."""
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, shuffle=False, drop_last=False)
    c0, p0, t0, n = children_cpu(), time.process_time(), time.perf_counter(), 0
    for x, _, _ in loader:
        n += len(x)
    wall = time.perf_counter() - t0
    del loader  # joins the workers, so their CPU time is counted in RUSAGE_CHILDREN
    cpu = (children_cpu() - c0) if workers else (time.process_time() - p0)
    return n / wall, n / max(cpu, 1e-9)


def decode_floor(files: list[str], rounds: int) -> float:
    """Images per CPU second of simplejpeg decoding each whole file at 1/8 scale and nothing else: the ceiling of
    any loader that reads the whole compressed file (entropy decoding cannot be scaled down)."""
    data = [open(f, "rb").read() for f in files]
    h, w = simplejpeg.decode_jpeg_header(data[0])[:2]
    best = 0.0
    for _ in range(rounds):
        t0 = time.process_time()
        for d in data:
            simplejpeg.decode_jpeg(d, min_height=h // 8, min_width=w // 8)
        best = max(best, len(data) / (time.process_time() - t0))
    return best


def normalise_cost(size: int, batch: int) -> float:
    """CPU ms per image of the batched uint8 -> normalised float step, were it done on the CPU."""
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    to_device(x, torch.device("cpu"), list(IMAGENET_MEAN), list(IMAGENET_STD))
    t0 = time.process_time()
    for _ in range(5):
        to_device(x, torch.device("cpu"), list(IMAGENET_MEAN), list(IMAGENET_STD))
    return (time.process_time() - t0) / (5 * batch) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=128, help="500x375 JPEGs")
    p.add_argument("--large-images", type=int, default=32, help="2000x1500 JPEGs")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the second measurement (0: skip)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved in-process rounds (median)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--max-size", type=int, default=256, help="short side of the pre-resized copy")
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(1)  # one core per loader process, as in training
    ratios = {}
    with tempfile.TemporaryDirectory() as d:
        for (w, h), n in (((500, 375), args.images), ((2000, 1500), args.large_images)):
            src, small = os.path.join(d, f"{w}x{h}"), os.path.join(d, f"{w}x{h}-max{args.max_size}")
            make_jpegs(src, n, (w, h))
            pre_resize(src, small, args.max_size)
            files = list_images(src)
            kib = sum(os.path.getsize(f) for f in files) / len(files) / 1024
            loaders = {
                "old": OldImageFiles(files, plain_train_transform(args.size, 3), 3),
                "plain": ImageFiles(files, plain_train_transform(args.size, 3), 3),
                "new": ImageFiles(files, train_transform(args.size, 3), 3),
                "new-pil": ImageFiles(files, CropDecode(args.size, 3, turbo=False), 3),
                f"new+shards{args.max_size}": ImageFiles(list_images(small), train_transform(args.size, 3), 3),
            }
            for ds in loaders.values():
                time_loader(ds, 0, args.batch)  # warm the page cache and the code paths
            per_core: dict[str, list[float]] = {k: [] for k in loaders}
            wall: dict[str, list[float]] = {k: [] for k in loaders}
            for _ in range(args.rounds):
                for k, ds in loaders.items():
                    a, b = time_loader(ds, 0, args.batch)
                    wall[k].append(a)
                    per_core[k].append(b)
            print(f"\n{n} JPEGs {w}x{h} (~{kib:.0f} KiB) -> {args.size} px crop, flip, normalise; "
                  f"median of {args.rounds} in-process rounds")
            print(f"{'loader':<16}{'img/CPU-s':>11}{'x old':>8}{'img/s':>9}"
                  + (f"{f'{args.workers}w img/s':>12}{f'{args.workers}w img/CPU-s':>16}" if args.workers else ""))
            old = statistics.median(per_core["old"])
            for k in loaders:
                core = statistics.median(per_core[k])
                row = f"{k:<16}{core:>11.1f}{core / old:>7.2f}x{statistics.median(wall[k]):>9.1f}"
                if args.workers:
                    mw, mc = time_loader(loaders[k], args.workers, args.batch)
                    row += f"{mw:>12.1f}{mc:>16.1f}"
                print(row)
            floor = decode_floor(files, args.rounds)
            print(f"ceiling: decoding the whole file at 1/8 scale and nothing else: {floor:.1f} img/CPU-s "
                  f"= {floor / old:.2f}x old")
            ratios[f"{w}x{h}"] = statistics.median(per_core["new"]) / old
    print(f"\nbatched uint8 -> normalised float (on the device in training; here on the CPU): "
          f"{normalise_cost(args.size, args.batch):.3f} ms/img")
    for k, r in ratios.items():
        print(f"new/old per core at {k}: {r:.2f}x")


if __name__ == "__main__":
    main()
