"""The `fcmae pretrain` config schema (keys documented in README "Pretraining")."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from convnextv2.backends import BACKENDS
from convnextv2.encoder import MODEL_NAMES, PATCH_SIZES
from fcmae.config import NotSetError
from fcmae.engine.config import RunConfig, check_at_most, check_global_batch, world_size_from_env
from fcmae.finetune_config import (
    MAX_CHANNELS, MAX_IMAGE_SIZE, MAX_WORKERS, FinetuneDataConfig, check_digits_path, check_stats,
)
from fcmae.masking import num_visible

MIN_GRID = 4  # mask patches per side below which the pretext task is too coarse (BENCHMARKS.md: the digits study)


def auto_patch_size(image_size: int) -> int:
    """`model.patch_size=auto`: the largest of 32 / 16 / 8 that gives a mask grid of at least 4x4 at `image_size`
    (32 from 128 px up, 16 from 64 px, 8 from 32 px); ValueError (one line) below 32 px or off the pick's multiples."""
    for p in PATCH_SIZES:  # largest first
        if image_size >= MIN_GRID * p:
            if image_size % p:
                raise ValueError(f"data.image_size={image_size} must be a multiple of {p}, the patch size "
                                 f"model.patch_size=auto picks from {MIN_GRID * p} px up (e.g. {image_size // p * p}); "
                                 "change the image size or set model.patch_size")
            return p
    smallest = min(PATCH_SIZES)
    raise ValueError(f"data.image_size={image_size} is too small for model.patch_size=auto, which needs a mask grid of "
                     f"at least {MIN_GRID}x{MIN_GRID} patches of {smallest} px ({MIN_GRID * smallest} px); use larger "
                     f"images, or set model.patch_size={smallest} for a coarser grid")


@dataclass
class ModelConfig:
    name: str = "convnextv2_atto"
    init: str = "none"  # start from these weights (any format `fcmae convert` reads; an FCMAE file's decoder too)
    backend: str = "packed"
    in_chans: int = 3
    mask_ratio: float = 0.6
    decoder_dim: int = 512
    decoder_depth: int = 1
    norm_pix_loss: bool = True
    # mask patch side = encoder total stride (32 paper; 16 / 8 for small images: stem stride /8); auto: the largest
    # giving a mask grid of at least 4x4 at data.image_size (`auto_patch_size`), resolved by PretrainConfig.check
    patch_size: Union[int, Literal["auto"]] = "auto"
    patch_size_auto: bool = field(default=False, init=False)  # derived, not a key: patch_size was resolved from auto

    def check(self) -> None:
        if self.name not in MODEL_NAMES:
            raise ValueError(f"model.name={self.name!r} is not valid; choose one of: {', '.join(MODEL_NAMES)}")
        if not self.init:
            raise ValueError("model.init is empty; give a checkpoint file or 'none' (random initialisation)")
        if self.patch_size != "auto" and self.patch_size not in PATCH_SIZES:
            raise ValueError(f"model.patch_size={self.patch_size!r} is not valid; choose one of: "
                             f"{', '.join(map(str, PATCH_SIZES))}, auto (the mask patch side; auto, the default, picks "
                             f"the largest giving a {MIN_GRID}x{MIN_GRID} mask grid at data.image_size)")
        if self.backend not in BACKENDS:
            raise ValueError(f"model.backend={self.backend!r} is not valid; choose one of: {', '.join(sorted(BACKENDS))}")
        if self.backend == "minkowski":  # an optional library: its absence is a config error, found now
            from convnextv2.backends.minkowski import import_minkowski
            try:
                import_minkowski()
            except ImportError as e:
                raise ValueError(f"model.backend=minkowski: {e}; or use model.backend=packed") from None
        if self.in_chans < 1:
            raise ValueError(f"model.in_chans must be >= 1, got {self.in_chans}")
        check_at_most("model.in_chans", self.in_chans, MAX_CHANNELS, "input channels")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"model.mask_ratio must be in (0, 1) (0.6 recommended), got {self.mask_ratio}")
        if self.decoder_dim < 1 or self.decoder_depth < 0:
            raise ValueError("model.decoder_dim must be >= 1 and model.decoder_depth >= 0")
        check_at_most("model.decoder_dim", self.decoder_dim, 8192, "decoder width; 512 in the paper")
        check_at_most("model.decoder_depth", self.decoder_depth, 64, "decoder blocks; 1 in the paper")


@dataclass
class DataConfig:
    path: str = ""  # folder, ImageFolder root, or webdataset shard pattern ("/d/train-{000000..000099}.tar")
    format: Literal["auto", "imagefolder", "folder", "webdataset", "digits"] = "auto"
    image_size: int = 224
    batch_size: int = 4096  # GLOBAL batch per optimizer step (split over processes and accum_steps)
    num_workers: int = 8  # DataLoader workers per process
    min_scale: float = 0.2  # RandomResizedCrop scale (min_scale, 1)
    hflip: float = 0.5
    fast_decode: bool = True  # JPEGs decoded at the smallest DCT scale the random crop allows
    mean: Optional[list[float]] = None  # None: ImageNet for 3 channels, else 0.449 per channel
    std: Optional[list[float]] = None  # None: ImageNet for 3 channels, else 0.226 per channel
    shuffle_buffer: int = 2000  # webdataset: samples in the shuffle buffer per worker
    num_samples: Optional[int] = None  # webdataset: samples per epoch (default: from sizes.json); else: use only the first N images
    digits_holdout: int = 0  # digits: leave out the N held-out digits fine-tuning evaluates on (its data.digits_val)

    def check(self) -> None:
        """Every value; a dataset still to be named is `check_path`'s (run last)."""
        check_digits_path(self.format, {"path": self.path})
        check_stats(self.mean, self.std)
        if self.num_workers < 0 or self.batch_size < 1:
            raise ValueError("data.num_workers must be >= 0 and data.batch_size >= 1")
        check_at_most("data.num_workers", self.num_workers, MAX_WORKERS, "DataLoader processes")
        if not 0 < self.min_scale <= 1 or not 0 <= self.hflip <= 1:
            raise ValueError("data.min_scale must be in (0, 1] and data.hflip in [0, 1]")
        if not 0 <= self.digits_holdout <= 1000:
            raise ValueError(f"data.digits_holdout must be in [0, 1000] (of the 1797 digits), got {self.digits_holdout}")
        if self.shuffle_buffer < 1 or (self.num_samples is not None and self.num_samples < 1):
            raise ValueError("data.shuffle_buffer and data.num_samples must be >= 1")

    def check_path(self) -> None:
        if self.format != "digits" and not self.path:
            raise NotSetError("data.path is not set; give an image folder, ImageFolder root or shard pattern "
                              "(or data.format=digits for the built-in demo set)")


@dataclass
class MonitorConfig:
    """kNN probe of the encoder on a labeled set during pretraining (docs/method.md). Off unless every_epochs > 0."""
    every_epochs: int = 0  # after every N epochs (and the last); also once before the first epoch. 0 = off
    k: int = 20  # neighbours that vote
    temperature: float = 0.07  # vote weight exp(cosine / temperature)
    # the labeled set, described as fine-tuning's `data` section (its eval keys: path or train_path + val_path, or
    # format=digits with digits_per_class / digits_val; image_size, crop_pct, mean, std, eval_batch_size, num_workers)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)

    def check(self) -> None:
        if self.every_epochs < 0:
            raise ValueError(f"monitor.every_epochs must be >= 0 (0 = off), got {self.every_epochs}")
        if self.k < 1 or self.temperature <= 0:
            raise ValueError(f"monitor.k must be >= 1 and monitor.temperature > 0, got {self.k}, {self.temperature}")
        if self.every_epochs:
            self.in_section(self.data.check)

    def check_path(self) -> None:
        if self.every_epochs:
            self.in_section(self.data.check_path)

    @staticmethod
    def in_section(check) -> None:
        """Run a `data` check, naming the keys where they live (monitor.data.*); the error keeps its class."""
        try:
            check()
        except ValueError as e:
            raise type(e)(str(e).replace("data.", "monitor.data.")) from None


@dataclass
class PretrainConfig(RunConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def check(self) -> None:
        super().check()
        self.model.check()
        self.data.check()
        self.monitor.check()
        self.resolve_patch_size()
        p = self.patch()
        if self.data.image_size < p or self.data.image_size % p:
            raise ValueError(f"data.image_size={self.data.image_size} must be a positive multiple of {p}, the mask patch "
                             f"size model.patch_size (e.g. {max(p, self.data.image_size // p * p)}); change one of them")
        check_at_most("data.image_size", self.data.image_size, MAX_IMAGE_SIZE, "pixels per side")
        for key, stats in (("data.mean", self.data.mean), ("data.std", self.data.std)):
            if stats is not None and len(stats) != self.model.in_chans:
                raise ValueError(f"{key} has {len(stats)} values but model.in_chans={self.model.in_chans}")
        check_global_batch(self.data.batch_size, self.optim.accum_steps, world_size_from_env())
        self.check_mask_grid()
        m = self.model
        if m.init != "none" and not os.path.isfile(m.init) and not self.resuming():
            raise ValueError(f"model.init={m.init!r} is not a file; give a checkpoint (fcmae convert reads its format) "
                             "or 'none'")
        self.optim.check_min_lr(self.data.batch_size)
        self.data.check_path()
        self.monitor.check_path()

    def resolve_patch_size(self) -> None:
        """model.patch_size=auto -> the number for data.image_size (`auto_patch_size`), so everything after the
        config (the model, the checkpoint header, config.yaml) sees an int; `patch_size_auto` remembers it."""
        if self.model.patch_size == "auto":
            self.model.patch_size = auto_patch_size(self.data.image_size)
            self.model.patch_size_auto = True

    def patch(self) -> int:
        """Side of a mask patch in pixels (the encoder's total stride): the one place the patch grid comes from."""
        self.resolve_patch_size()
        return self.model.patch_size

    def patch_summary(self) -> str:
        """The run's first line's words on the patch: 'patch size 16 (auto: 4x4 grid at 64 px)'."""
        p, size = self.patch(), self.data.image_size
        auto = "auto: " if self.model.patch_size_auto else ""
        return f"patch size {p} ({auto}{size // p}x{size // p} grid at {size} px)"

    def coarse_grid_warning(self) -> str | None:
        """A warning when an explicit model.patch_size leaves a mask grid under 4x4 (a setting the digits study found
        to make the encoder worse than random init); None otherwise."""
        p, size = self.patch(), self.data.image_size
        if size // p >= MIN_GRID:
            return None
        try:
            better = f"model.patch_size=auto picks {auto_patch_size(size)} here"
        except ValueError:
            better = f"use images of at least {MIN_GRID * min(PATCH_SIZES)} px"
        return (f"model.patch_size={p} gives a {size // p}x{size // p} mask grid at data.image_size={size}, too coarse "
                f"a pretext task (on the digits such an encoder ended worse than random init); {better}")

    def check_mask_grid(self) -> None:
        """model.mask_ratio must leave >= 1 visible and >= 1 masked patch of the (image_size / patch)^2 grid."""
        p, size, ratio = self.patch(), self.data.image_size, self.model.mask_ratio
        n = (size // p) ** 2
        if n < 2:
            raise ValueError(f"data.image_size={size} gives one {p}x{p} mask patch per image, which cannot be both "
                             f"masked and visible whatever model.mask_ratio; use data.image_size >= {2 * p} "
                             f"({7 * p} recommended)")
        try:
            keep = num_visible(n, ratio)
        except ValueError:
            keep = 0
        if keep < 1:
            best = math.floor((n - 1) / n * 100) / 100
            raise ValueError(f"model.mask_ratio={ratio} leaves no visible patch of the {n} ({size // p}x{size // p}) "
                             f"at data.image_size={size}; use model.mask_ratio <= {best:.2f} or larger images")
