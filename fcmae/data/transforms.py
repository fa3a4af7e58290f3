"""Pretraining transforms (docs/method.md) for any in_chans: RandomResizedCrop(scale (min_scale, 1), bicubic) + flip + normalise.

Training uses `train_transform` (crop-first decode to uint8, normalised on the device); `plain_train_transform` is
the float all-on-CPU pipeline it replaces, kept as the reference for tests and bench/data_loading.py."""
from __future__ import annotations

import functools

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY_MEAN, GREY_STD = 0.449, 0.226  # ImageNet's statistics averaged over RGB (timm's choice for 1 channel)


def default_stats(in_chans: int) -> tuple[list[float], list[float]]:
    """ImageNet mean/std for 3 channels; for any other count the grey (channel-averaged) ImageNet values."""
    if in_chans == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return [GREY_MEAN] * in_chans, [GREY_STD] * in_chans


class RepeatChannels:
    """(1, H, W) -> (in_chans, H, W) for channel counts that have no PIL mode (2, 5, ...)."""

    def __init__(self, in_chans: int):
        self.in_chans = in_chans

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.shape[0] == self.in_chans else x.expand(self.in_chans, -1, -1).contiguous()


def train_transform(size: int, in_chans: int, min_scale: float = 0.2, hflip: float = 0.5, fast: bool = True):
    """Encoded image (path, bytes) or PIL image -> (in_chans, size, size) uint8, None when undecodable; JPEGs are
    decoded at reduced scale when `fast`. Normalise on the device with `fcmae.data.device.to_device`."""
    from fcmae.data.crop_decode import CropDecode

    return CropDecode(size, in_chans, min_scale, hflip, fast=fast)


def plain_train_transform(
    size: int, in_chans: int, min_scale: float = 0.2, hflip: float = 0.5,
    mean: list[float] | None = None, std: list[float] | None = None,
) -> T.Compose:
    """PIL image (mode from `decode.target_mode`) -> normalised (in_chans, size, size) float tensor, all on the CPU
    (the pipeline before crop-first decoding; same RNG draws as `train_transform`)."""
    d_mean, d_std = default_stats(in_chans)
    return T.Compose([
        T.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(hflip),
        T.ToTensor(),
        RepeatChannels(in_chans),
        T.Normalize(mean or d_mean, std or d_std),
    ])


def eval_transform(size: int, in_chans: int, mean: list[float] | None = None, std: list[float] | None = None) -> T.Compose:
    """Resize the short side to `size`, center crop, normalise: the deterministic view used for pictures."""
    d_mean, d_std = default_stats(in_chans)
    return T.Compose([
        T.Resize(size, interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        RepeatChannels(in_chans),
        T.Normalize(mean or d_mean, std or d_std),
    ])


def seeded_call(transform, img, seed: int) -> torch.Tensor:
    """Apply a torchvision transform with torch's RNG seeded by `seed`, leaving the caller's RNG untouched.

    Each sample's augmentation is then a pure function of (seed, epoch, index): independent of workers, of the
    number of processes and of where a run was resumed, which makes resume and DDP exactly reproducible.
    """
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only: torch.manual_seed would also queue a CUDA/XPU/MTIA re-seed, with a formatted
        # stack trace, on every call in a process without CUDA initialised (0.15 ms, and a list that grows forever)
        torch.default_generator.manual_seed(seed)
        return transform(img)


def load_sample(transform, src, in_chans: int, seed: int, name: str | None = None) -> torch.Tensor | None:
    """Decode + augment one sample under `seeded_call(seed)`; None when it cannot be decoded (warned, naming `name`
    or the file). `src`: a path, encoded bytes or a PIL image. Transforms with `decodes = True` (crop-first decoding)
    take the source itself; others get the fully decoded, mode-converted image."""
    if getattr(transform, "decodes", False):
        return seeded_call(functools.partial(transform, name=name), src, seed)
    from PIL import Image

    from fcmae.data.decode import convert_image, decode_image

    img = convert_image(src, in_chans) if isinstance(src, Image.Image) else decode_image(src, in_chans, name)
    return None if img is None else seeded_call(transform, img, seed)
