"""`fcmae eval CKPT [key=value ...]`: top-1 / top-5 and per-class accuracy of a classifier checkpoint (fcmae.evaluate).

CKPT: a fine-tune checkpoint (best.pt, best-ema.pt, last.pt; `ema=true` takes last.pt's EMA weights) or an exported
timm classifier (model.safetensors). The data settings default to the ones the checkpoint was trained with.
"""
from __future__ import annotations

import argparse
import os

from fcmae.config import add_config_arguments, config_from, merge, user_config
from fcmae.evaluate import DATA_KEYS, EvalConfig, evaluate, exported_preprocessing, format_report, load_classifier
from fcmae.export import trained_data
from fcmae.finetune_config import inherit_data


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="top-1/top-5 and per-class accuracy of a classifier checkpoint",
        description="Evaluate CKPT (best.pt / best-ema.pt / last.pt of `fcmae finetune`, or an exported "
        "model.safetensors) on a val split. Example: fcmae eval runs/ft/best-ema.pt data.path=/data/imagenet "
        "(uses data.path/val when it exists). Data settings default to the checkpoint's own.",
    )
    p.add_argument("ckpt", help="checkpoint file")
    add_config_arguments(p, "YAML file with eval keys (device, ema, data.*)", "data.path=/data data.image_size=224")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    given = user_config(args.config, args.overrides)  # a bad file or key fails before the checkpoint is read
    if not os.path.isfile(args.ckpt):
        raise ValueError(f"checkpoint {args.ckpt!r} is not a file")
    model, meta = load_classifier(args.ckpt, ema=False)
    trained = {k: v for k, v in trained_data(meta, args.ckpt).items() if k in DATA_KEYS}
    if not meta:  # an exported file: the preprocessing and class names it carries (metadata or config.json)
        trained, meta, said = exported_preprocessing(args.ckpt, model)
        print(f"fcmae eval: {said}", flush=True)
    cfg = config_from(EvalConfig, merge({"data": inherit_data(trained, given.get("data") or {})}, given),
                      args.overrides)
    if cfg.ema:
        model, meta = load_classifier(args.ckpt, ema=True)
    meter, classes = evaluate(args.ckpt, cfg, meta, model)
    print(f"fcmae eval: {args.ckpt}{' (EMA)' if cfg.ema else ''}")
    print(format_report(meter, classes))
