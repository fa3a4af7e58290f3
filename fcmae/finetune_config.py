"""The `fcmae finetune` config schema (keys documented in README "Fine-tuning and evaluation")."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from convnextv2.encoder import MODEL_NAMES, PATCH_SIZES, stem_stride
from fcmae.config import NotSetError
from fcmae.engine.config import OptimConfig, RunConfig, check_at_most, check_global_batch, world_size_from_env
from fcmae.layer_decay import SCHEMES

MAX_IMAGE_SIZE = 8192  # px: one 8192-px image already takes GBs of activations in the smallest ConvNeXt
MAX_CHANNELS = 256  # input channels: beyond 4, images are decoded grey and repeated, so more only costs memory
MAX_WORKERS = 256  # DataLoader processes per training process

DATASET_KEYS = ("path", "train_path", "val_path", "format", "digits_per_class", "digits_val")  # which images


def check_stats(mean: list[float] | None, std: list[float] | None, section: str = "data") -> None:
    """data.mean / data.std: unset, or one value per channel; a std must be > 0 (images are divided by it)."""
    for key, stats in ((f"{section}.mean", mean), (f"{section}.std", std)):
        if stats is not None and not stats:
            raise ValueError(f"{key} is empty; give one value per input channel or leave it unset")
    if std is not None and not all(s > 0 for s in std):
        raise ValueError(f"{section}.std={std} must be > 0 for every channel (images are divided by it), e.g. 0.226")


def check_digits_path(fmt: str, paths: dict[str, str], section: str = "data") -> None:
    """The built-in digits read no folder: a path next to data.format=digits would be ignored, so refuse it."""
    given = [f"{section}.{k}" for k, v in paths.items() if v]
    if fmt == "digits" and given:
        raise ValueError(f"{section}.format=digits reads the built-in digits, so {', '.join(given)} would be ignored; "
                         f"drop {given[0]} or set {section}.format=auto to read the folder")


def inherit_data(trained: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's `data` keys as defaults under the user's: once the user names a dataset (path, train_path,
    val_path or format), none of the checkpoint's dataset keys (DATASET_KEYS) stay; its preprocessing keys do."""
    if any(k in given for k in ("path", "train_path", "val_path", "format")):
        trained = {k: v for k, v in trained.items() if k not in DATASET_KEYS}
    return trained


def check_auto_augment(spec: str | None) -> None:
    """data.auto_augment must be a spec timm's train transform parses (rand-..., augmix-..., an AutoAugment policy)."""
    if not spec:
        return
    from timm.data import create_transform

    try:  # timm's own dispatch on the spec; it reports a bad one with assert or ValueError/KeyError
        create_transform(32, is_training=True, auto_augment=spec)
    except Exception as e:  # noqa: BLE001 - whatever timm raises, the spec is the cause
        raise ValueError(f"data.auto_augment={spec!r} is not a timm augmentation spec ({e or type(e).__name__}); "
                         "e.g. rand-m9-mstd0.5-inc1, or null for none") from None


def check_image_size(image_size: int, patch_size: int, why: str = "") -> None:
    """ValueError unless image_size is a positive multiple of the model's patch size (its total stride)."""
    if image_size < patch_size or image_size % patch_size:
        raise ValueError(f"data.image_size={image_size} must be a positive multiple of the patch size {patch_size}"
                         f"{why} (e.g. {max(patch_size, image_size // patch_size * patch_size)})")
    check_at_most("data.image_size", image_size, MAX_IMAGE_SIZE, "pixels per side")


@dataclass
class FinetuneModelConfig:
    name: str = "convnextv2_atto"
    init: str = "none"  # FCMAE run checkpoint or any checkpoint `fcmae convert` reads; "none" = from scratch
    num_classes: Optional[int] = None  # None: the number of classes in the training data
    in_chans: Optional[int] = None  # input channels; None: the pretrained checkpoint's (3 from scratch)
    patch_size: Optional[int] = None  # total stride 32 / 16 / 8 (stem stride /8); None: the checkpoint's (32 from scratch)
    drop_path: float = 0.1  # stochastic depth rate (timm drop_path_rate)
    head_init_scale: float = 0.001  # fresh classifier weights are scaled by this (docs/method.md, "Fine-tuning recipes")

    def check(self) -> None:
        if self.name not in MODEL_NAMES:
            raise ValueError(f"model.name={self.name!r} is not valid; choose one of: {', '.join(MODEL_NAMES)}")
        if not self.init:
            raise ValueError("model.init is empty; give a checkpoint file or 'none' (train from scratch)")
        if self.patch_size is not None:
            stem_stride(self.patch_size, key="model.patch_size")
        if self.in_chans is not None and self.in_chans < 1:
            raise ValueError(f"model.in_chans must be >= 1 or null (the pretrained checkpoint's), got {self.in_chans}")
        check_at_most("model.in_chans", self.in_chans, MAX_CHANNELS, "input channels")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"model.num_classes must be >= 1 or null (from the data), got {self.num_classes}")
        if not 0 <= self.drop_path < 1 or not 0 < self.head_init_scale <= 1:
            raise ValueError("model.drop_path must be in [0, 1) and model.head_init_scale in (0, 1] (it scales timm's "
                             f"init of the fresh classifier; 0.001 in the recipes), got {self.drop_path}, "
                             f"{self.head_init_scale}")


@dataclass
class FinetuneDataConfig:
    path: str = ""  # ImageFolder root holding train/ and val/ (or set train_path and val_path)
    train_path: str = ""
    val_path: str = ""
    format: Literal["auto", "imagefolder", "digits"] = "auto"
    image_size: int = 224
    batch_size: int = 1024  # GLOBAL batch per optimizer step (split over processes and accum_steps)
    eval_batch_size: int = 256  # per process
    eval_every_epochs: int = 1  # evaluate on the val split every N epochs and after the last
    num_workers: int = 8
    crop_pct: float = 0.875  # eval: resize to image_size / crop_pct, center crop image_size
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec; null = off
    reprob: float = 0.25  # random erasing probability
    min_scale: float = 0.08  # RandomResizedCrop scale (min_scale, 1)
    hflip: float = 0.5
    fast_decode: bool = True  # JPEGs decoded at the smallest DCT scale the random crop allows
    mean: Optional[list[float]] = None  # one value per input channel; None: ImageNet's (grey for in_chans != 3)
    std: Optional[list[float]] = None
    digits_per_class: int = 10  # digits: labeled training images per class (a small labeled subset)
    digits_val: int = 500  # digits: held-out validation images (never in the labeled subset)

    def check(self) -> None:
        """Every value; a dataset still to be named is `check_path`'s (run last)."""
        check_digits_path(self.format, {"path": self.path, "train_path": self.train_path, "val_path": self.val_path})
        check_image_size(self.image_size, min(PATCH_SIZES))  # the model's patch size is checked once it is known
        if self.batch_size < 1 or self.eval_batch_size < 1 or self.eval_every_epochs < 1 or self.num_workers < 0:
            raise ValueError("data.batch_size, data.eval_batch_size and data.eval_every_epochs must be >= 1, "
                             "data.num_workers >= 0")
        check_at_most("data.num_workers", self.num_workers, MAX_WORKERS, "DataLoader processes")
        check_auto_augment(self.auto_augment)
        if not 0 < self.crop_pct <= 1 or not 0 <= self.reprob <= 1 or not 0 < self.min_scale <= 1:
            raise ValueError("data.crop_pct and data.min_scale must be in (0, 1], data.reprob in [0, 1]")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"data.hflip must be in [0, 1], got {self.hflip}")
        check_stats(self.mean, self.std)
        if self.digits_per_class < 1 or not 10 <= self.digits_val <= 1797 - 10 * self.digits_per_class:
            raise ValueError("data.digits_per_class must be >= 1 and data.digits_val in [10, 1797 - 10 x per_class]")

    def check_path(self) -> None:
        if self.format != "digits" and not self.path and not (self.train_path and self.val_path):
            raise NotSetError("data.path is not set; give an ImageFolder root with train/ and val/ subfolders, or "
                              "data.train_path and data.val_path (or data.format=digits for the built-in set)")


@dataclass
class AugConfig:
    mixup: float = 0.8  # mixup alpha (0 = off)
    cutmix: float = 1.0  # cutmix alpha (0 = off)
    mixup_prob: float = 1.0  # probability of mixing a batch
    switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    smoothing: float = 0.1  # label smoothing

    def check(self) -> None:
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError("aug.mixup and aug.cutmix must be >= 0 (0 = off)")
        if not (0 <= self.mixup_prob <= 1 and 0 <= self.switch_prob <= 1 and 0 <= self.smoothing < 1):
            raise ValueError("aug.mixup_prob and aug.switch_prob must be in [0, 1], aug.smoothing in [0, 1)")

    @property
    def mixing(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0


@dataclass
class EmaConfig:
    enabled: bool = True
    decay: float = 0.9999

    def check(self) -> None:
        if not 0 <= self.decay < 1:
            raise ValueError(f"ema.decay must be in [0, 1) (0.9999 in the recipes), got {self.decay}")


@dataclass
class FinetuneOptimConfig(OptimConfig):
    epochs: int = 100
    warmup_epochs: float = 20.0
    blr: float = 6.25e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = 0.9  # lr scale = layer_decay ** (top id - layer id); 1 = off
    layer_decay_scheme: Literal["single", "group"] = "single"

    def check(self) -> None:
        super().check()
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"optim.layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.layer_decay_scheme not in SCHEMES:
            raise ValueError(f"optim.layer_decay_scheme must be one of {', '.join(SCHEMES)}")


@dataclass
class FinetuneConfig(RunConfig):
    output_dir: str = "runs/finetune"
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)

    def check(self) -> None:
        super().check()
        self.model.check()
        if self.model.init != "none" and not os.path.isfile(self.model.init) and not self.resuming():
            raise ValueError(f"model.init={self.model.init!r} is not a file; give a pretrained checkpoint or 'none'")
        self.data.check()
        if self.model.patch_size is not None:
            check_image_size(self.data.image_size, self.model.patch_size, " (model.patch_size)")
        elif self.model.init == "none":
            check_image_size(self.data.image_size, max(PATCH_SIZES), " (from scratch; or set model.patch_size)")
        self.aug.check()
        self.ema.check()
        micro = check_global_batch(self.data.batch_size, self.optim.accum_steps, world_size_from_env())
        if self.aug.mixing and micro % 2:
            raise ValueError(f"mixup/cutmix need an even per-process micro-batch, got {micro}; change data.batch_size")
        self.optim.check_min_lr(self.data.batch_size)
        self.data.check_path()
