"""Decode only what a random crop needs: the crop box is drawn from the image's header size (RandomResizedCrop's own
sampler, same RNG draws as the plain path), then a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8 via
PIL's `draft`, i.e. libjpeg-turbo's scaled IDCT) that still gives the crop at least the output resolution, and the
box (mapped to the reduced image) is resized by torch's antialiased uint8 kernels (PIL's filters, several times
faster). RGB/grey JPEGs are decoded by libjpeg-turbo through simplejpeg (into an array, no PIL copy; measured
faster in bench/data_loading.py). Other formats and in-memory images take the same code with scale 1."""
from __future__ import annotations

import io
import logging
import os
from typing import Callable

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torch.nn import functional as F
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import pil_modes_mapping

from fcmae.data.decode import PIL_MODES, convert_image, target_mode

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # (top, left, height, width), torchvision's order


def open_image(src) -> Image.Image:
    """Open without decoding pixels (header only); an in-memory PIL image is returned as it is."""
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, (bytes, bytearray)):
        if not src:
            raise OSError("zero-byte image")
        return Image.open(io.BytesIO(src))
    return Image.open(src)


def dct_scale(crop_w: int, crop_h: int, out_w: int, out_h: int) -> int:
    """Largest JPEG DCT scale denominator in (8, 4, 2, 1) keeping the crop >= the output size on both sides."""
    for s in (8, 4, 2):
        if crop_w >= out_w * s and crop_h >= out_h * s:
            return s
    return 1


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """PIL image (L, RGB, RGBA) -> (C, H, W) uint8 (a view of HWC memory)."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8))
    return x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)


def uint8_to_pil(x: torch.Tensor) -> Image.Image:
    """(C, H, W) uint8 with C in (1, 3, 4) -> PIL image (L, RGB, RGBA)."""
    return Image.fromarray(x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy(), PIL_MODES[x.shape[0]])


def resize_box(x: torch.Tensor, box: tuple[float, float, float, float], size: tuple[int, int],
               interpolation: str = "bicubic") -> torch.Tensor:
    """Region `box` = (left, top, right, bottom) of `x` ((C, H, W) uint8, HWC memory) resized to `size` = (w, h)
    -> (C, h, w) uint8.

    Bicubic/bilinear run in torch's antialiased uint8 kernels (the filters of PIL's resize, within 1-2 grey levels,
    several times faster) on the box rounded to whole pixels; other filters use PIL's resize on the exact box."""
    if interpolation not in ("bicubic", "bilinear"):
        filt = pil_modes_mapping[InterpolationMode(interpolation)]
        return pil_to_uint8(uint8_to_pil(x).resize(size, filt, box=box))
    H, W = x.shape[-2:]
    left, top = min(max(round(box[0]), 0), W - 1), min(max(round(box[1]), 0), H - 1)
    right, bottom = max(min(round(box[2]), W), left + 1), max(min(round(box[3]), H), top + 1)
    x = x[None, :, top:bottom, left:right]
    if x.shape[1] > 1:  # channels-last, the layout of torch's fast uint8 kernels: copies only the box
        x = x.contiguous(memory_format=torch.channels_last)
    return F.interpolate(x, (size[1], size[0]), mode=interpolation, antialias=True, align_corners=False)[0]


def read_bytes(src) -> bytes:
    if isinstance(src, (bytes, bytearray)):
        return bytes(src)
    with open(src, "rb") as f:
        return f.read()


def turbo_decode(data: bytes, mode: str, s: int, size: tuple[int, int]) -> torch.Tensor | None:
    """libjpeg-turbo (simplejpeg) decode at scale 1/s straight into an array -> (C, H, W) uint8 view, or None when
    it reports anything (corrupt data, even harmless): the caller then decodes with PIL, which decides, as always,
    whether the image is readable."""
    W, H = size
    want = (-(-H // s), -(-W // s))
    try:
        arr = simplejpeg.decode_jpeg(data, colorspace="GRAY" if mode == "L" else "RGB", min_height=want[0],
                                     min_width=want[1], strict=True)
    except ValueError:
        return None
    if arr.shape[:2] != want:  # another scale than 1/s: let PIL do it
        return None
    return torch.from_numpy(arr).permute(2, 0, 1)


def decode_crop(src, in_chans: int, box_fn: Callable[[Image.Image], Box], size: tuple[int, int],
                interpolation: str | Callable[[], str] = "bicubic", name: str | None = None,
                fast: bool = True, turbo: bool = True) -> tuple[torch.Tensor, Box] | None:
    """Open `src` (path, bytes or PIL image), draw the box with `box_fn(image)` (it sees the full-size header, not
    decoded pixels), decode (a JPEG at reduced scale when `fast`), convert to `target_mode(in_chans)` and resize the
    box to `size` = (w, h) with `interpolation` (an InterpolationMode value, or a callable returning one, called
    after `box_fn`: timm's random filter choice).

    With `fast` and `turbo`, RGB and grey JPEGs are decoded by libjpeg-turbo through simplejpeg (straight into an
    array, no PIL copy); CMYK, anything simplejpeg reports, and other formats go through PIL (`draft` for the
    reduced scale).
    -> ((C, h, w) uint8 with C the channels of `target_mode(in_chans)`, box in full-size pixels), or None (with a
    warning naming `name` or the file) when the image cannot be read: corrupt, truncated, zero-byte, not an image.
    """
    try:
        data = None if isinstance(src, Image.Image) else read_bytes(src)
        img = open_image(src if data is None else data)
        top, left, h, w = box = box_fn(img)
        interp = interpolation() if callable(interpolation) else interpolation
        mode = target_mode(in_chans)
        s = dct_scale(w, h, *size) if fast and img.format == "JPEG" else 1
        turbo = turbo and fast and data is not None and img.format == "JPEG"
        turbo = turbo and {img.mode, mode} <= {"RGB", "L"}  # CMYK/YCCK: PIL converts
        x = turbo_decode(data, mode, s, img.size) if turbo else None
        if x is None:
            if s > 1:
                W, H = img.size
                grey = mode == "L" and img.mode == "RGB"  # libjpeg then skips the chroma planes
                img.draft("L" if grey else img.mode, (W // s, H // s))  # Pillow picks exactly scale s for this size
                if img.size != (-(-W // s), -(-H // s)):
                    raise RuntimeError(f"PIL's draft gave {img.size} for scale 1/{s} of {(W, H)}")
            img.load()  # the (reduced) decode: truncated files fail here
            x = pil_to_uint8(convert_image(img, in_chans))
        # reduced pixel j covers full-size pixels [j*s, (j+1)*s): the box maps by 1/s
        return resize_box(x, (left / s, top / s, (left + w) / s, (top + h) / s), size, interp), box
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        where = name or ("<image>" if isinstance(src, Image.Image) else
                         "<bytes>" if isinstance(src, (bytes, bytearray)) else os.fspath(src))
        log.warning("skipping unreadable image %s: %s", where, e)
        return None


class CropDecode:
    """Pretraining augmentation (docs/method.md) from an encoded image: RandomResizedCrop(size, (min_scale, 1), 3/4-4/3,
    bicubic) + horizontal flip -> (in_chans, size, size) uint8. Normalisation happens batched on the device
    (`fcmae.data.device.to_device`).

    Draws from torch's RNG exactly as torchvision's RandomResizedCrop + RandomHorizontalFlip do (box, then flip),
    so under `transforms.seeded_call` a sample's crop and flip are those of the plain pipeline with the same seed.
    Called on a source (path, bytes or PIL image); returns None when it cannot be decoded.
    """

    decodes = True  # takes the encoded source, not a decoded image (see `transforms.load_sample`)

    def __init__(self, size: int, in_chans: int, min_scale: float = 0.2, hflip: float = 0.5,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), fast: bool = True, turbo: bool = True):
        self.size, self.in_chans, self.scale, self.ratio = size, in_chans, (min_scale, 1.0), ratio
        self.hflip, self.fast, self.turbo = hflip, fast, turbo  # turbo=False: PIL decodes (bench comparison)

    def box(self, img: Image.Image) -> Box:
        return T.RandomResizedCrop.get_params(img, self.scale, self.ratio)

    def __call__(self, src, name: str | None = None) -> torch.Tensor | None:
        got = decode_crop(src, self.in_chans, self.box, (self.size, self.size), name=name, fast=self.fast,
                          turbo=self.turbo)
        if got is None:
            return None
        x = got[0] if got[0].shape[0] == self.in_chans else got[0].expand(self.in_chans, -1, -1)  # grey -> C
        if torch.rand(1) < self.hflip:  # RandomHorizontalFlip's draw
            x = x.flip(-1)
        return x

    def __repr__(self) -> str:
        return (f"CropDecode(size={self.size}, in_chans={self.in_chans}, scale={self.scale}, hflip={self.hflip}, "
                f"fast={self.fast})")


class CropDecodeThen:
    """A timm train transform whose first step is RandomResizedCropAndInterpolation, run from the encoded image:
    the crop decoded at reduced scale (same `random` draws as timm's get_params), then the rest (flip, RandAugment,
    ToTensor, Normalize, random erasing) unchanged on the small crop. Returns None when undecodable."""

    decodes = True

    def __init__(self, crop, rest: Callable, in_chans: int, fast: bool = True):
        self.crop, self.rest, self.in_chans, self.fast = crop, rest, in_chans, fast

    def box(self, img: Image.Image) -> Box:
        return self.crop.get_params(img, self.crop.scale, self.crop.ratio)

    def interpolation(self) -> str:
        interp = self.crop.interpolation
        if isinstance(interp, (tuple, list)):  # timm's 'random' interpolation: its draw, after the box's
            import random

            interp = random.choice(interp)
        return InterpolationMode(interp).value

    def __call__(self, src, name: str | None = None):
        h, w = self.crop.size
        got = decode_crop(src, self.in_chans, self.box, (w, h), self.interpolation, name=name, fast=self.fast)
        return None if got is None else self.rest(uint8_to_pil(got[0]))

    def __repr__(self) -> str:
        return f"CropDecodeThen({self.crop!r}, fast={self.fast}, then {self.rest!r})"
