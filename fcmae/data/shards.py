"""Webdataset tar shards: brace patterns, per-epoch shard shuffle, a seeded sample shuffle buffer, and the
multi-node / multi-worker split done by webdataset's own `split_by_node` / `split_by_worker`."""
from __future__ import annotations

import glob
import json
import os
import random

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from fcmae.data.decode import IMAGE_EXTENSIONS, decode_image
from fcmae.data.transforms import load_sample
from fcmae.engine.seeds import derive_seed

IMAGE_KEYS = tuple(e[1:] for e in IMAGE_EXTENSIONS)


def expand_shards(path: str) -> list[str]:
    """A brace pattern ("d/train-{000..099}.tar"), a list joined by "::", a glob, or a folder of *.tar files."""
    if os.path.isdir(path):
        urls = sorted(glob.glob(os.path.join(path, "*.tar")))
    else:
        urls = [u for part in path.split("::") for u in braceexpand.braceexpand(part)]
        urls = [m for u in urls for m in (sorted(glob.glob(u)) if any(c in u for c in "*?[") else [u])]
    missing = [u for u in urls if "://" not in u and not os.path.isfile(u)]
    if not urls or missing:
        raise ValueError(f"no webdataset shards at {path!r}" + (f" (missing: {missing[0]})" if missing else "")
                         + "; give a folder of .tar files or a brace pattern like /d/train-{000000..000099}.tar")
    return urls


def count_samples(urls: list[str]) -> int | None:
    """Samples in `urls` according to the sizes.json that `fcmae shards` writes next to them, if all are listed.
    ValueError naming the sizes.json when it is not a {shard name: count} mapping."""
    total, read = 0, {}
    for url in urls:
        sizes_file = os.path.join(os.path.dirname(url), "sizes.json")
        if not os.path.isfile(sizes_file):
            return None
        if sizes_file not in read:
            read[sizes_file] = read_sizes(sizes_file)
        count = read[sizes_file].get(os.path.basename(url))
        if count is None:
            return None
        total += count
    return total


def read_sizes(path: str) -> dict[str, int]:
    """A sizes.json as `fcmae shards` writes it: {shard file name: sample count}; ValueError naming the file else."""
    fix = "rewrite the shards with `fcmae shards SRC DST --overwrite`, or set data.num_samples"
    try:
        with open(path, encoding="utf-8") as f:
            sizes = json.load(f)
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is not readable JSON ({e}); {fix}") from None
    if not isinstance(sizes, dict) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                              for n in sizes.values()):
        raise ValueError(f"{path} must map each shard file name to its sample count (a number >= 0), got "
                         f"{json.dumps(sizes)[:80]}; {fix}")
    return sizes


def image_bytes(sample: dict) -> bytes | None:
    for key in IMAGE_KEYS:
        if key in sample:
            return sample[key]
    return None


def sample_name(sample: dict) -> str:
    """'shard.tar:key' for messages about a sample."""
    return f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"


class ShardImages(IterableDataset):
    """Yields ready batches (images (b, C, H, W), labels (b,) = -1, failures (b,)) from tar shards, forever.

    Epoch e visits the shards in an order seeded by (seed, e, pass); this process and this worker take their share
    with webdataset's split_by_node / split_by_worker; samples go through a shuffle buffer seeded by (seed, e, rank,
    worker). The DataLoader (batch_size=None) collects batches from its workers round-robin, so `skip_batches`
    (a resumed epoch) is honoured by each worker decoding and dropping its share of samples (decoded as in the
    original run, so exactly the same ones turn out unreadable).
    Unreadable images are skipped (with a warning naming shard and key) and counted in `failures` of the batch that
    follows them.
    """

    def __init__(self, urls: list[str], transform, in_chans: int, batch: int, seed: int = 0, shuffle_buffer: int = 2000):
        self.urls, self.transform, self.in_chans, self.batch = urls, transform, in_chans, batch
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def raw_samples(self, rank: int, worker: int):
        """Endless stream of this worker's raw (undecoded) samples for the current epoch."""
        for pass_ in range(2**62):
            urls = list(self.urls)
            random.Random(derive_seed(self.seed, self.epoch, pass_)).shuffle(urls)
            shards = wds.split_by_worker(wds.split_by_node([dict(url=u) for u in urls]))
            samples = wds.tarfile_to_samples(handler=wds.warn_and_continue)(shards)
            rng = random.Random(derive_seed(self.seed, self.epoch, pass_, rank, worker))
            seen = False
            for sample in wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(samples):
                seen = True
                yield sample
            if not seen:
                raise RuntimeError(f"process {rank} worker {worker} received no samples from the {len(urls)} shards; "
                                   "use at least (processes x data.num_workers) shards")

    def __iter__(self):
        rank, _, worker, num_workers = wds.utils.pytorch_worker_info()
        # this worker's share of the consumed batches, in readable samples (unreadable ones decode to None again)
        skip = max(0, -(-(self.skip_batches - worker) // num_workers)) * self.batch
        images, failures, pending, good = [], [], 0, 0
        for i, sample in enumerate(self.raw_samples(rank, worker)):
            x = load_sample(self.transform, image_bytes(sample) or b"", self.in_chans,
                            derive_seed(self.seed, self.epoch, rank, worker, i), sample_name(sample))
            if x is None:
                pending += 1
                if pending > 10000 and not images:
                    raise RuntimeError("more than 10000 unreadable images in a row in the shards; check data.path")
                continue
            good += 1
            if good <= skip:
                pending = 0
                continue
            images.append(x)
            failures.append(pending)
            pending = 0
            if len(images) == self.batch:
                yield torch.stack(images), torch.full((self.batch,), -1), torch.tensor(failures)
                images, failures = [], []

    def first_images(self, n: int, transform) -> list[torch.Tensor]:
        """The first n readable images of the first shard(s), through `transform` (pictures; readability check)."""
        out = []
        shards = [dict(url=u) for u in self.urls]
        for sample in wds.tarfile_to_samples(handler=wds.warn_and_continue)(iter(shards)):
            img = decode_image(image_bytes(sample) or b"", self.in_chans, sample_name(sample))
            if img is not None:
                out.append(transform(img))
                if len(out) == n:
                    break
        if not out:
            raise ValueError(f"no readable image in the {len(self.urls)} shards (keys looked for: {', '.join(IMAGE_KEYS)})")
        return out
