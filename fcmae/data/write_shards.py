"""Pack a folder of images (flat, recursive or ImageFolder) into webdataset tar shards (the `fcmae shards SRC DST`
command: fcmae.commands.shards).

Every image is decoded once to check it: unreadable ones (corrupt, truncated, zero-byte) are skipped and counted.
By default the encoded bytes are stored as they are; `--max-size S` re-encodes images whose short side is larger
than S down to S (JPEG, or PNG for modes JPEG cannot hold), which makes every later decode cheap. An ImageFolder's
class index goes in `cls`. DST/sizes.json maps each shard name to its sample count (read for the epoch length).
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import os
import random
from pathlib import Path

import webdataset as wds
from PIL import Image

from convnextv2.checkpoint.io import atomic_write, writing
from fcmae.data.folder import imagefolder_samples, is_imagefolder, list_images

log = logging.getLogger(__name__)


def prepare_image(data: bytes, max_size: int | None = None, quality: int = 90) -> tuple[bytes, str | None] | None:
    """Check that `data` decodes; -> (bytes to store, new extension or None when stored as is), or None when it
    cannot be read. With `max_size`, an image whose short side is larger is resized (bicubic, after a reduced-scale
    JPEG decode) to short side `max_size` and re-encoded: JPEG `quality` for RGB/L/CMYK, else PNG."""
    try:
        if not data:
            raise OSError("zero-byte image")
        img = Image.open(io.BytesIO(data))
        W, H = img.size
        shrink = max_size is not None and min(W, H) > max_size
        if img.format == "JPEG":  # libjpeg decodes (and so checks) every coefficient at any DCT scale
            target = max_size if shrink else 1
            img.draft(img.mode, (max(1, W * target // min(W, H)), max(1, H * target // min(W, H))))
        img.load()
        if not shrink:
            return data, None
        w, h = (max_size, round(H * max_size / W)) if W <= H else (round(W * max_size / H), max_size)
        img = img.resize((w, h), Image.BICUBIC)
        out = io.BytesIO()
        if img.mode in ("RGB", "L", "CMYK"):
            img.save(out, format="JPEG", quality=quality)
            return out.getvalue(), "jpg"
        img.save(out, format="PNG")
        return out.getvalue(), "png"
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        log.debug("unreadable image: %s", e)
        return None


def readable(path: str) -> bool:
    with open(path, "rb") as f:
        return prepare_image(f.read()) is not None


def clear_destination(dst: str, overwrite: bool) -> None:
    """ValueError for a non-empty `dst` (stale shards of another run would be read with the new ones), unless
    `overwrite`: then its *.tar files and sizes.json are deleted (nothing else)."""
    if not os.path.isdir(dst) or not os.listdir(dst):
        return
    if not overwrite:
        raise ValueError(f"DST {dst!r} is not empty ({len(os.listdir(dst))} entries); give an empty or new folder, "
                         "or pass --overwrite to delete its *.tar shards and sizes.json first")
    for path in glob.glob(os.path.join(dst, "*.tar")) + glob.glob(os.path.join(dst, "sizes.json")):
        os.remove(path)


def write_shards(src: str, dst: str, shard_size: int = 1000, prefix: str = "shard", shuffle: bool = True,
                 seed: int = 0, max_size: int | None = None, quality: int = 90, overwrite: bool = False,
                 skipped: list[str] | None = None) -> dict[str, int]:
    """Write the shards; -> {shard file name: sample count} (also saved as DST/sizes.json). The unreadable files
    that were left out are appended to `skipped` when given."""
    if not os.path.isdir(src):
        raise ValueError(f"SRC {src!r} is not a folder")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    if max_size is not None and max_size < 1:
        raise ValueError(f"--max-size must be >= 1, got {max_size}")
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality must be in 1..100, got {quality}")
    if is_imagefolder(src):
        files, labels, _ = imagefolder_samples(src)
    else:
        files = list_images(src)
        labels = [-1] * len(files)
    if not files:
        raise ValueError(f"no image files under {src!r}")
    if not any(readable(f) for f in files):  # stops at the first image that decodes: DST is not touched otherwise
        raise ValueError(f"none of the {len(files)} image files under {src!r} could be decoded (all corrupt or not "
                         "images)")
    clear_destination(dst, overwrite)
    order = list(range(len(files)))
    if shuffle:
        random.Random(seed).shuffle(order)
    created = not os.path.isdir(dst)
    pattern = os.path.join(dst, f"{prefix}-%06d.tar")
    try:
        with writing(dst):
            os.makedirs(dst, exist_ok=True)
        sizes = pack(files, labels, order, pattern, shard_size, max_size, quality,
                     skipped if skipped is not None else [])
        atomic_write(os.path.join(dst, "sizes.json"), lambda tmp: Path(tmp).write_text(json.dumps(sizes, indent=1)))
    except BaseException:  # a full disk, Ctrl-C...: no tar set without its sizes.json is left behind
        remove_shards(pattern)
        if created and os.path.isdir(dst) and not os.listdir(dst):
            os.rmdir(dst)
        raise
    return sizes


def pack(files: list[str], labels: list[int], order: list[int], pattern: str, shard_size: int,
         max_size: int | None, quality: int, skipped: list[str]) -> dict[str, int]:
    """Write files[order] as samples into the tars `pattern % 0, 1, ...`, shard_size each -> {tar name: samples}.
    Unreadable files are appended to `skipped`. A failed write raises a WriteError naming the tar."""
    sizes: dict[str, int] = {}
    n = 0
    with writing(pattern % 0):  # ShardWriter opens the first tar at once; no byte limit: shard_size samples each
        sink = wds.ShardWriter(pattern, maxcount=shard_size, maxsize=float("inf"), verbose=0)
    try:
        for i in order:
            with open(files[i], "rb") as f:
                got = prepare_image(f.read(), max_size, quality)
            if got is None:
                log.warning("skipping unreadable image %s", files[i])
                skipped.append(files[i])
                continue
            ext = got[1] or os.path.splitext(files[i])[1].lower().lstrip(".")
            sample = {"__key__": f"{n:09d}", ext: got[0]}
            if labels[i] >= 0:
                sample["cls"] = labels[i]
            tar = pattern % (n // shard_size)
            sizes[os.path.basename(tar)] = sizes.get(os.path.basename(tar), 0) + 1
            with writing(tar):
                sink.write(sample)
            n += 1
        with writing(sink.fname):
            sink.close()
    except BaseException:
        with contextlib.suppress(Exception):  # the error in flight says what failed
            sink.close()
        raise
    return sizes


def remove_shards(pattern: str) -> None:
    """Delete the tars `pattern % 0, 1, ...` (consecutive, as `pack` writes them)."""
    k = 0
    while os.path.exists(pattern % k):
        os.remove(pattern % k)
        k += 1
