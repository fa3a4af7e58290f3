"""`fcmae knn CKPT [key=value ...]`: the kNN probe (docs/method.md) of any checkpoint fcmae reads, on a labeled set.

The same probe the pretraining monitor runs (fcmae.knn), standalone: to compare checkpoints, a released encoder and
random init, or epochs of a run after the fact.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from fcmae.config import add_config_arguments, config_from, merge, user_config
from fcmae.finetune_config import FinetuneDataConfig, inherit_data
from fcmae.knn import K, TEMPERATURE

DATA_KEYS = ("path", "train_path", "val_path", "format", "image_size", "crop_pct", "mean", "std", "digits_per_class",
             "digits_val", "eval_batch_size", "num_workers")


@dataclass
class KnnConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    k: int = K
    temperature: float = TEMPERATURE
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)

    def check(self) -> None:
        if self.k < 1 or self.temperature <= 0:
            raise ValueError(f"k must be >= 1 and temperature > 0, got k={self.k}, temperature={self.temperature}")
        self.data.check()
        self.data.check_path()


def checkpoint_data(raw: Any) -> dict[str, Any]:
    """Default data keys from a checkpoint's own config: a pretraining run's `monitor.data` (when its monitor was on),
    a fine-tuning run's `data`; {} otherwise."""
    config = (raw.get("config") if isinstance(raw, dict) else None) or {}
    if not isinstance(config, dict):
        return {}
    if raw.get("format") == "fcmae":
        monitor = config.get("monitor") if isinstance(config.get("monitor"), dict) else {}
        data = monitor.get("data") if monitor.get("every_epochs") else None
    else:
        data = config.get("data")
    # the values are checked as the command's own data.* keys are
    return {k: v for k, v in (data if isinstance(data, dict) else {}).items() if k in DATA_KEYS}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "knn", help="kNN top-1 of a checkpoint's frozen encoder features on a labeled set",
        description="The kNN probe (docs/method.md, the usual SSL protocol): pooled last-stage features of CKPT's encoder "
        "(globally average-pooled, before the head; L2-normalised), each val image's k=20 nearest train images by "
        "cosine similarity vote with weight exp(sim / 0.07); prints top-1. CKPT: any checkpoint fcmae reads (an "
        "FCMAE run's last.pt, a fine-tune checkpoint, timm / HF / reference files). Data: data.path with train/ "
        "and val/ class folders (or data.train_path + data.val_path), or data.format=digits; both splits get the "
        "eval transform (resize to data.image_size / data.crop_pct, center crop). A pretraining checkpoint whose "
        "kNN monitor was on defaults to the monitor's data. Example: fcmae knn runs/pre/last.pt "
        "data.format=digits data.image_size=64",
    )
    p.add_argument("ckpt", help="checkpoint file")
    add_config_arguments(p, "YAML file with knn keys (device, amp, k, temperature, data.*)",
                         "data.path=/data data.image_size=224 k=20")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from convnextv2.checkpoint import load_file
    from fcmae.engine.distributed import pick_device
    from fcmae.engine.loop import amp_dtype
    from fcmae.finetune import encoder_from_checkpoint
    from fcmae.knn import check_neighbours, knn_probe, probe_splits

    given = user_config(args.config, args.overrides)  # a bad file or key fails before the checkpoint is read
    if not os.path.isfile(args.ckpt):
        raise ValueError(f"checkpoint {args.ckpt!r} is not a file")
    raw = load_file(args.ckpt)
    trained = inherit_data(checkpoint_data(raw), given.get("data") or {})
    cfg = config_from(KnnConfig, merge({"data": trained}, given), args.overrides)
    encoder, weights = encoder_from_checkpoint(raw, args.ckpt)
    splits = probe_splits(cfg.data, weights.arch.in_chans)  # fails on bad data before any forward
    check_neighbours(cfg.k, len(splits.train))
    device = pick_device(cfg.device, 0)
    result = knn_probe(encoder.to(device), splits.train, splits.val, len(splits.classes), device,
                       cfg.data.eval_batch_size, cfg.data.num_workers, amp_dtype(cfg.amp, device), cfg.k,
                       cfg.temperature)
    print(f"fcmae knn: {args.ckpt} ({weights.describe()}) on {splits.where}")
    print(f"{result.describe()}; k={cfg.k}, T={cfg.temperature}, {cfg.data.image_size} px, {device}")
    return {"top1": result.top1, "train_images": result.train_images, "val_images": result.val_images,
            "skipped": result.skipped}
