"""Webdataset tar shards: brace patterns, per-epoch shard shuffle, a seeded sample shuffle buffer, and the
multi-node / multi-worker split done by webdataset's own `split_by_node` / `split_by_worker`. Shards may live on a
local disk, behind `http(s)://` URLs (read with curl) or come out of `pipe:` commands (`pipe:aws s3 cp s3://... -`)."""
from __future__ import annotations

import glob
import json
import os
import random
import shutil
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from fcmae.data.decode import IMAGE_EXTENSIONS, decode_image
from fcmae.data.shard_stream import DataReadError, is_url, shard_samples
from fcmae.data.transforms import load_sample
from fcmae.engine.seeds import derive_seed

IMAGE_KEYS = tuple(e[1:] for e in IMAGE_EXTENSIONS)
PATTERN_HINT = "give a folder of .tar files or a brace pattern like /d/train-{000000..000099}.tar"


def expand_shards(path: str) -> list[str]:
    """A brace pattern ("d/train-{000..099}.tar", "https://host/d/train-{000..099}.tar", "pipe:cmd d/train-{0..9}.tar"),
    a list joined by "::", a glob, or a folder of *.tar files. Local files must exist; a URL or `pipe:` command is
    only expanded (webdataset opens it when it is read)."""
    if os.path.isdir(path):
        urls = sorted(glob.glob(os.path.join(path, "*.tar")))
    else:
        try:
            urls = [u for part in path.split("::") for u in braceexpand.braceexpand(part)]
        except braceexpand.UnbalancedBracesError:
            raise ValueError(f"data.path {path!r} has unbalanced braces; {PATTERN_HINT}") from None
        urls = [m for u in urls for m in (sorted(glob.glob(u)) if is_glob(u) else [u])]
    missing = [u for u in urls if not is_url(u) and not os.path.isfile(u)]
    if not urls or missing:
        raise ValueError(f"no webdataset shards at {path!r}" + (f" (missing: {missing[0]})" if missing else "")
                         + f"; {PATTERN_HINT}")
    check_openable(path, urls)
    return urls


def is_glob(path: str) -> bool:
    """A local glob pattern (in a URL, "?" starts the query)."""
    return not is_url(path) and any(c in path for c in "*?[")


def check_openable(path: str, urls: list[str]) -> None:
    """ValueError (one line) for a server folder (not listable), URLs webdataset has no reader for, or http(s) shards
    on a machine without curl."""
    folders = [u for u in urls if "://" in u and u.endswith("/")]
    if folders:
        raise ValueError(f"data.path {path!r} names a folder on a server ({folders[0]}), which cannot be listed; give "
                         "a brace pattern like https://host/d/train-{000000..000099}.tar")
    schemes = {urllib.parse.urlsplit(u).scheme for u in urls if "://" in u}
    unknown = sorted(schemes - set(wds.gopen_schemes) - {"file"})
    if unknown:
        raise ValueError(f"data.path {path!r}: webdataset cannot open {unknown[0]}:// URLs (it reads "
                         f"{', '.join(s + '://' for s in sorted(set(wds.gopen_schemes) - {'__default__'}))}); "
                         f"stream them with a pipe: command, e.g. data.path='pipe:aws s3 cp s3://bucket/train-"
                         "{000000..000127}.tar -' and data.num_samples=N")
    if schemes & {"http", "https"} and shutil.which("curl") is None:
        raise ValueError(f"data.path {path!r} names http(s) shards, which webdataset reads with curl, but curl is not "
                         "installed here; install it (e.g. apt-get install curl) or copy the shards to a local disk")


def count_samples(urls: list[str]) -> int | None:
    """Samples in `urls` according to the sizes.json that `fcmae shards` writes next to them (fetched from the same
    server for http(s) shards), if all are listed; None when there is none (or the shards come from `pipe:`).
    ValueError naming the sizes.json when it is not a {shard name: count} mapping."""
    sizes: dict[str, dict | None] = {}  # folder -> its sizes.json
    total = 0
    for url in urls:
        if url.startswith("pipe:") or ("://" in url and not url.startswith(("http://", "https://"))):
            return None
        folder, name = url.rsplit("/", 1) if "://" in url else (os.path.dirname(url), os.path.basename(url))
        if folder not in sizes:
            sizes[folder] = fetch_sizes(folder) if "://" in url else read_sizes(folder)
        listed = sizes[folder]
        if listed is None or name not in listed:
            return None
        total += listed[name]
    return total


SIZES_FIX = "rewrite the shards with `fcmae shards SRC DST --overwrite`, or set data.num_samples"


def checked_sizes(sizes: Any, where: str) -> dict[str, int]:
    """A sizes.json's content as `fcmae shards` writes it, {shard file name: sample count}; ValueError naming it else."""
    if not isinstance(sizes, dict) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                              for n in sizes.values()):
        raise ValueError(f"{where} must map each shard file name to its sample count (a number >= 0), got "
                         f"{json.dumps(sizes)[:80]}; {SIZES_FIX}")
    return sizes


def read_sizes(folder: str) -> dict[str, int] | None:
    """{folder}/sizes.json (None when there is none); ValueError naming the file when it is not what we write."""
    path = os.path.join(folder, "sizes.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            sizes = json.load(f)
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is not readable JSON ({e}); {SIZES_FIX}") from None
    return checked_sizes(sizes, path)


def fetch_sizes(folder_url: str, timeout: float = 30) -> dict[str, int] | None:
    """The sizes.json at folder_url (None when the server has none); DataReadError when the server cannot be read."""
    url = f"{folder_url}/sizes.json"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        reason = f"HTTP {e.code} {e.reason}"
    except (urllib.error.URLError, OSError) as e:
        reason = str(getattr(e, "reason", e))
    else:
        try:
            sizes = json.loads(raw)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise ValueError(f"{url} is not readable JSON ({e}); {SIZES_FIX}") from None
        return checked_sizes(sizes, url)
    raise DataReadError(f"cannot read {url} ({reason}); is the server up? (or set data.num_samples to skip it)")


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
    follows them. A shard that cannot be read (a server gone) ends the stream: see `__iter__`.
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
            samples = (s for url in wds.split_by_worker(wds.split_by_node(urls)) for s in shard_samples(url))
            rng = random.Random(derive_seed(self.seed, self.epoch, pass_, rank, worker))
            seen = False
            for sample in wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(samples):
                seen = True
                yield sample
            if not seen:
                raise RuntimeError(f"process {rank} worker {worker} received no samples from the {len(urls)} shards; "
                                   "use at least (processes x data.num_workers) shards")

    def __iter__(self):
        """This worker's batches; a shard that cannot be read ends them with its `DataReadError` as the last item.
        Raised in a DataLoader worker, it would reach the main process wrapped in the worker's traceback; as an item
        it arrives as it is, and `raise_read_errors` raises it there."""
        try:
            yield from self.worker_batches()
        except DataReadError as e:
            yield e

    def worker_batches(self):
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
        for sample in (s for url in self.urls for s in shard_samples(url)):
            img = decode_image(image_bytes(sample) or b"", self.in_chans, sample_name(sample))
            if img is not None:
                out.append(transform(img))
                if len(out) == n:
                    break
        if not out:
            raise ValueError(f"no readable image in the {len(self.urls)} shards (keys looked for: {', '.join(IMAGE_KEYS)})")
        return out


def raise_read_errors(items):
    """A ShardImages loader's batches; the `DataReadError` a stream ended with is raised here, in the main process."""
    for item in items:
        if isinstance(item, DataReadError):
            raise item
        yield item
