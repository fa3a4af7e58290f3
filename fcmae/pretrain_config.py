"""The `fcmae pretrain` config schema (keys documented in README "Pretraining")."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from convnextv2.backends import BACKENDS
from convnextv2.encoder import MODEL_NAMES
from fcmae.engine.config import RunConfig, check_global_batch, world_size_from_env

PATCH = 32  # mask patch side of the standard ConvNeXt V2 (total stride)


@dataclass
class ModelConfig:
    name: str = "convnextv2_atto"
    backend: str = "packed"
    in_chans: int = 3
    mask_ratio: float = 0.6
    decoder_dim: int = 512
    decoder_depth: int = 1
    norm_pix_loss: bool = True

    def check(self) -> None:
        if self.name not in MODEL_NAMES:
            raise ValueError(f"model.name={self.name!r} is not valid; choose one of: {', '.join(MODEL_NAMES)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"model.backend={self.backend!r} is not valid; choose one of: {', '.join(sorted(BACKENDS))}")
        if self.in_chans < 1:
            raise ValueError(f"model.in_chans must be >= 1, got {self.in_chans}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"model.mask_ratio must be in (0, 1) (0.6 recommended), got {self.mask_ratio}")
        if self.decoder_dim < 1 or self.decoder_depth < 0:
            raise ValueError("model.decoder_dim must be >= 1 and model.decoder_depth >= 0")


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

    def check(self) -> None:
        if self.format != "digits" and not self.path:
            raise ValueError("data.path is not set; give an image folder, ImageFolder root or shard pattern "
                             "(or data.format=digits for the built-in demo set)")
        if self.image_size < PATCH or self.image_size % PATCH:
            raise ValueError(f"data.image_size={self.image_size} must be a positive multiple of {PATCH} (e.g. 224)")
        if self.num_workers < 0 or self.batch_size < 1:
            raise ValueError("data.num_workers must be >= 0 and data.batch_size >= 1")
        if not 0 < self.min_scale <= 1 or not 0 <= self.hflip <= 1:
            raise ValueError("data.min_scale must be in (0, 1] and data.hflip in [0, 1]")
        if self.shuffle_buffer < 1 or (self.num_samples is not None and self.num_samples < 1):
            raise ValueError("data.shuffle_buffer and data.num_samples must be >= 1")


@dataclass
class PretrainConfig(RunConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def check(self) -> None:
        super().check()
        self.model.check()
        self.data.check()
        for key, stats in (("data.mean", self.data.mean), ("data.std", self.data.std)):
            if stats is not None and len(stats) != self.model.in_chans:
                raise ValueError(f"{key} has {len(stats)} values but model.in_chans={self.model.in_chans}")
        check_global_batch(self.data.batch_size, self.optim.accum_steps, world_size_from_env())
