"""Robust image decoding: every odd mode PIL can open becomes an 8-bit image with the wanted channels; anything
that cannot be decoded (corrupt, truncated, zero-byte, not an image) gives None, never an exception."""
from __future__ import annotations

import io
import logging
import os

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # channel counts that decode to their own PIL mode


def target_mode(in_chans: int) -> str:
    """PIL mode decoded for `in_chans`: 1 -> L, 3 -> RGB, 4 -> RGBA, else L (replicated to in_chans later)."""
    return PIL_MODES.get(in_chans, "L")


def to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float images -> 8-bit L by scaling, not clipping (PIL's convert would saturate)."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        elif img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 0..65535 -> 0..255
        return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "L")
    if img.mode in ("P", "PA"):  # palette (maybe with transparency) -> expand through RGBA
        return img.convert("RGBA")
    if img.mode == "1":
        return img.convert("L")
    return img


def convert_image(img: Image.Image, in_chans: int) -> Image.Image:
    """Any PIL image -> 8-bit image in `target_mode(in_chans)` (CMYK, YCbCr, LAB... via PIL's converters)."""
    img = to_8bit(img)
    mode = target_mode(in_chans)
    return img if img.mode == mode else img.convert(mode)


def decode_image(src: bytes | str | os.PathLike, in_chans: int = 3, name: str | None = None,
                 warn: bool = True) -> Image.Image | None:
    """Decode a file path or encoded bytes; None (with a warning naming `name` or the file, unless not `warn`) when
    it cannot be read."""
    try:
        if isinstance(src, (bytes, bytearray)):
            if not src:
                raise OSError("zero-byte image")
            img = Image.open(io.BytesIO(src))
        else:
            img = Image.open(src)
        with img:
            img.load()  # force the full decode now: truncated files fail here, not later in a transform
            return convert_image(img, in_chans)
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        if warn:
            name = name or ("<bytes>" if isinstance(src, (bytes, bytearray)) else os.fspath(src))
            log.warning("skipping unreadable image %s: %s", name, e)
        return None
