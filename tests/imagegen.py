"""Small generated image sets for the data and pretraining tests (no network, no stored fixtures)."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image


def smooth_image(rng: np.random.Generator, size: int = 80) -> Image.Image:
    """A smooth random RGB picture (low-res colours upsampled), so reconstructions are learnable."""
    low = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
    return Image.fromarray(low, "RGB").resize((size, size), Image.BICUBIC)


def make_imagefolder(root: str, classes: int = 2, per_class: int = 12, seed: int = 0, size: int = 80) -> list[str]:
    """root/class_k/img_i.jpg; returns the files."""
    rng = np.random.default_rng(seed)
    files = []
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class_{c}"), exist_ok=True)
        for i in range(per_class):
            path = os.path.join(root, f"class_{c}", f"img_{i:03d}.jpg")
            smooth_image(rng, size).save(path, quality=95)
            files.append(path)
    return files


def write_broken(path: str, kind: str, seed: int = 0) -> None:
    """Unreadable files: 'zero' (zero bytes), 'truncated' (half a JPEG), 'text' (not an image)."""
    if kind == "zero":
        open(path, "wb").close()
    elif kind == "truncated":
        smooth_image(np.random.default_rng(seed)).save(path, format="JPEG")
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif kind == "text":
        open(path, "w").write("not an image")
    else:
        raise ValueError(kind)


def write_odd(path: str, mode: str, seed: int = 0) -> Image.Image:
    """Readable images in odd modes: CMYK (JPEG), P (palette PNG), I;16 (16-bit PNG), RGBA (PNG). Returns the RGB
    picture they were made from."""
    rgb = smooth_image(np.random.default_rng(seed))
    if mode == "CMYK":
        rgb.convert("CMYK").save(path, format="JPEG", quality=95)
    elif mode == "P":
        rgb.convert("P", palette=Image.ADAPTIVE, colors=64).save(path, format="PNG")
    elif mode == "I;16":
        grey = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(grey).save(path, format="PNG")
    elif mode == "RGBA":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(128)
        rgba.save(path, format="PNG")
    else:
        raise ValueError(mode)
    return rgb
