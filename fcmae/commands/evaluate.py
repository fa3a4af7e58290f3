"""`fcmae eval CKPT [key=value ...]`: top-1 / top-5 and per-class accuracy of a classifier checkpoint (fcmae.evaluate).

CKPT: a fine-tune checkpoint (best.pt, best-ema.pt, last.pt; `ema=true` takes last.pt's EMA weights) or an exported
timm classifier (model.safetensors). The data settings default to the ones the checkpoint was trained with.
"""
from __future__ import annotations

import argparse

from fcmae.config import add_config_arguments, config_from, merge, user_config
from fcmae.evaluate import EvalConfig, checkpoint_path, evaluate, format_report, load_classifier, read_classifier
from fcmae.finetune_config import inherit_data


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="top-1/top-5 and per-class accuracy of a classifier checkpoint",
        description="Evaluate CKPT (best.pt / best-ema.pt / last.pt of `fcmae finetune`, or an exported "
        "model.safetensors) on a val split. Example: fcmae eval runs/ft/best-ema.pt data.path=/data/imagenet "
        "(uses data.path/val when it exists). Data settings default to the checkpoint's own.",
    )
    p.add_argument("ckpt", help="checkpoint file, or a folder holding an export's model.safetensors")
    add_config_arguments(p, "YAML file with eval keys (device, ema, data.*)", "data.path=/data data.image_size=224")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    given = user_config(args.config, args.overrides)  # a bad file or key fails before the checkpoint is read
    ckpt = checkpoint_path(args.ckpt)
    model, meta, trained, said = read_classifier(ckpt)
    if said:  # an exported file: the preprocessing and class names it carries (metadata or config.json)
        print(f"fcmae eval: {said}", flush=True)
    cfg = config_from(EvalConfig, merge({"data": inherit_data(trained, given.get("data") or {})}, given),
                      args.overrides)
    if cfg.ema:
        model, meta = load_classifier(ckpt, ema=True)
    meter, classes = evaluate(ckpt, cfg, meta, model)
    print(f"fcmae eval: {args.ckpt}{' (EMA)' if cfg.ema else ''}")
    print(format_report(meter, classes))
