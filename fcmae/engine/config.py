"""Config sections every training command shares (pretrain now, finetune later): optimizer, checkpoints, logs,
and the run-level keys. A command's schema embeds these next to its own `model` and `data` sections."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from fcmae.config import config_keys
from fcmae.engine.optim import scaled_lr


@dataclass
class OptimConfig:
    epochs: int = 800
    warmup_epochs: float = 40.0
    blr: float = 1.5e-4  # base lr; lr = blr * effective batch / 256 (unless `lr` is set)
    lr: Optional[float] = None  # absolute lr; overrides blr
    min_lr: float = 0.0  # cosine floor
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    accum_steps: int = 1  # gradient accumulation: micro-batches per optimizer step
    clip_grad: Optional[float] = None  # max grad norm; None = no clipping (the paper's recipe)

    def check(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"optim.epochs must be >= 1, got {self.epochs}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"optim.warmup_epochs must be in [0, optim.epochs={self.epochs}], got {self.warmup_epochs}")
        if self.blr <= 0 or (self.lr is not None and self.lr <= 0):
            raise ValueError("optim.blr and optim.lr must be > 0")
        if self.min_lr < 0 or self.weight_decay < 0:
            raise ValueError("optim.min_lr and optim.weight_decay must be >= 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.accum_steps < 1:
            raise ValueError(f"optim.accum_steps must be >= 1, got {self.accum_steps}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"optim.clip_grad must be > 0 or null, got {self.clip_grad}")

    def check_min_lr(self, global_batch: int) -> None:
        """optim.min_lr is the cosine's floor: it cannot be above the peak lr (optim.lr, else the scaled optim.blr)."""
        peak, given = (self.lr, "optim.lr") if self.lr is not None else (
            scaled_lr(self.blr, global_batch), f"optim.blr x data.batch_size / 256 = {self.blr} x {global_batch} / 256")
        if self.min_lr > peak:
            raise ValueError(f"optim.min_lr={self.min_lr} is above the peak lr {peak:.4g} ({given}), so the schedule "
                             "would rise instead of decay; lower optim.min_lr (0 is the usual floor)")


@dataclass
class CheckpointConfig:
    every_steps: int = 1000  # write `last.pt` every N optimizer steps (and at the end of every epoch)
    keep_every_epochs: int = 50  # also keep `checkpoint-epoch{N}.pt` every N epochs (0 = never)

    def check(self) -> None:
        if self.every_steps < 1 or self.keep_every_epochs < 0:
            raise ValueError("checkpoint.every_steps must be >= 1 and checkpoint.keep_every_epochs >= 0")


@dataclass
class LogConfig:
    every_steps: int = 20  # a metrics.jsonl / TensorBoard row every N optimizer steps
    progress: bool = True  # tqdm progress bar on rank 0
    tensorboard: bool = True
    vis_every_epochs: int = 20  # reconstruction grid PNG every N epochs (and after the last); 0 = never
    vis_images: int = 8  # images in the grid
    # experiment trackers (rank 0; fcmae.engine.trackers): the rows, config, pictures and final files
    mlflow: bool = False  # needs the mlflow extra: pip install 'fcmae[mlflow]'
    mlflow_uri: Optional[str] = None  # None: MLflow's own (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)
    wandb: bool = False  # needs the wandb extra; WANDB_MODE=offline writes {output_dir}/wandb/ without an account
    experiment: str = "fcmae"  # MLflow experiment / W&B project
    run_name: Optional[str] = None  # None: the name of output_dir's folder

    def check(self) -> None:
        if self.every_steps < 1 or self.vis_every_epochs < 0 or self.vis_images < 1:
            raise ValueError("log.every_steps >= 1, log.vis_every_epochs >= 0 and log.vis_images >= 1 are required")
        self.check_trackers()

    def check_trackers(self) -> None:
        """The tracker keys (fcmae.engine.trackers); a tracker turned on needs its package (looked up, not imported:
        nothing of it is loaded while it is off)."""
        if self.mlflow_uri is not None:
            if not self.mlflow:
                raise ValueError(f"log.mlflow_uri={self.mlflow_uri!r} is set but log.mlflow is false; add "
                                 "log.mlflow=true (or leave log.mlflow_uri unset)")
            if "://" not in self.mlflow_uri and not self.mlflow_uri.startswith("file:") \
                    and self.mlflow_uri != "databricks":
                raise ValueError(f"log.mlflow_uri={self.mlflow_uri!r} is not a tracking URI; give e.g. "
                                 "sqlite:///mlflow.db or http://HOST:5000")
        if not self.experiment.strip():
            raise ValueError("log.experiment is empty; give the MLflow experiment / W&B project name (default fcmae)")
        if self.wandb and any(c in self.experiment for c in "/\\#?%:"):
            raise ValueError(f"log.experiment={self.experiment!r} cannot name a W&B project (no / \\ # ? % :); "
                             "choose another log.experiment")
        for key, on in (("mlflow", self.mlflow), ("wandb", self.wandb)):
            if on and importlib.util.find_spec(key) is None:
                raise ValueError(f"log.{key}=true needs the {key} package: pip install 'fcmae[{key}]'")


@dataclass
class RunConfig:
    """Run-level keys; a command's schema inherits these and adds its sections."""
    output_dir: str = "runs/pretrain"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    resume: Optional[str] = None  # None: resume from {output_dir}/last.pt if it exists; else this checkpoint file
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the model
    channels_last: bool = False
    # keys whose change from the checkpoint's config a resumed run accepts on purpose (e.g. [optim.lr, seed]; a
    # section accepts its keys): fcmae.engine.changes
    accept_changes: list[str] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def check(self) -> None:
        if not self.output_dir:
            raise ValueError("output_dir must be set (the run directory)")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63) (torch's seed range), got {self.seed}")
        check_writable_dir(self.output_dir, "output_dir")
        if self.resume is not None and not os.path.isfile(self.resume):
            raise ValueError(f"resume={self.resume!r} is not a file; give a checkpoint path or leave resume unset")
        self.check_accept_changes()
        self.optim.check()
        self.checkpoint.check()
        self.log.check()

    def check_accept_changes(self) -> None:
        unknown = [k for k in self.accept_changes if k not in config_keys(type(self))]
        if unknown:
            raise ValueError(f"accept_changes names {unknown[0]!r}, which is not a config key; list the dotted keys "
                             "whose change a resumed run accepts, e.g. accept_changes=[optim.lr,seed]")

    def resuming(self) -> bool:
        """True when the run continues a checkpoint (`resume`, or {output_dir}/last.pt): model.init is then unused."""
        return bool(self.resume) or os.path.isfile(os.path.join(self.output_dir, "last.pt"))


def check_at_most(key: str, value: int | None, limit: int, why: str) -> None:
    """An upper bound for a size that has no natural one (how many channels, workers, pixels...): a typo such as
    an extra zero is refused here, not met as an out-of-memory crash in the run."""
    if value is not None and value > limit:
        raise ValueError(f"{key}={value} is more than {limit} ({why}); give a smaller value")


def check_at_least(option: str, value: int | float | None, minimum: int) -> None:
    """A command-line number's lower bound (None: not given), refused in one line naming the option."""
    if value is not None and value < minimum:
        raise ValueError(f"{option} must be >= {minimum}, got {value}")


def check_seed(option: str, value: int) -> None:
    """A seed option: torch's seed range, as the configs' `seed` key."""
    if not 0 <= value < 2**63:
        raise ValueError(f"{option} must be in [0, 2**63) (torch's seed range), got {value}")


def check_fraction(option: str, value: float | None) -> None:
    """A ratio that must be strictly between 0 and 1 (a mask ratio), None: not given."""
    if value is not None and not 0 < value < 1:
        raise ValueError(f"{option} must be in (0, 1), got {value}")


def unwritable(folder: str) -> str | None:
    """Why files cannot be written in `folder` (created with its missing parents if need be), or None if they can.
    Nothing is created: this runs before any data, file or device is touched."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        return "is an existing file, not a folder"
    parent = os.path.abspath(folder)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"cannot be created: {parent!r} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):  # also False on a read-only file system
        return f"is not writable (no write permission in {parent!r}, or a read-only file system)"
    return None


def check_writable_dir(path: str, key: str) -> None:
    """ValueError unless `path` is a folder we can write in, or can be created (see `unwritable`)."""
    why = unwritable(path)
    if why:
        raise ValueError(f"{key}={path!r} {why}; choose another {key}")


def check_writable_file(path: str, name: str) -> None:
    """ValueError unless a file can be written at `path` (its folder is created if missing): `name` is how the
    user gave it (e.g. DST, --out)."""
    if os.path.isdir(path):
        raise ValueError(f"{name} {path!r} is a folder; give a file name, e.g. "
                         f"{os.path.join(path, 'model' + (os.path.splitext(path)[1] or '.safetensors'))}")
    why = unwritable(os.path.dirname(os.path.abspath(path)))
    if why:
        raise ValueError(f"{name} {path!r}: its folder {why}; choose another {name}")


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun / Slurm+submitit set it (1 when absent), read without touching torch.distributed."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_global_batch(batch_size: int, accum_steps: int, world_size: int, key: str = "data.batch_size") -> int:
    """The per-process micro-batch for a GLOBAL batch split over `world_size` processes and `accum_steps`."""
    if batch_size < world_size:
        raise ValueError(f"{key}={batch_size} (global) is smaller than the {world_size} processes; use >= {world_size}")
    if batch_size % (world_size * accum_steps):
        raise ValueError(
            f"{key}={batch_size} (global) must be divisible by processes x optim.accum_steps = "
            f"{world_size} x {accum_steps} = {world_size * accum_steps}"
        )
    return batch_size // (world_size * accum_steps)
