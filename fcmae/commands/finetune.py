"""`fcmae finetune --config FILE [key=value ...]`: supervised fine-tuning (fcmae.finetune) with a recipe or YAML
config."""
from __future__ import annotations

import argparse

from fcmae.config import add_config_arguments, describe_config, load_config
from fcmae.finetune import finetune
from fcmae.finetune_config import FinetuneConfig
from fcmae.recipes import find_config


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune a (pretrained) ConvNeXt V2 classifier (resumes automatically)",
        description="Fine-tune with the recipes of configs/finetune/<size>.yaml. Example: fcmae finetune --config "
        "tiny model.init=runs/pretrain-tiny/last.pt data.path=/data/imagenet "
        "output_dir=runs/ft-tiny (data.path holds train/ and val/ class folders; model.init=none trains from "
        "scratch). Multi-GPU: torchrun --nproc_per_node=8 -m fcmae finetune ... (data.batch_size is GLOBAL).",
    )
    add_config_arguments(p, "YAML file, or a recipe: finetune/<size> or just <size> (atto ... huge, demo)",
                         "model.init=last.pt data.path=/data", print_config=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    config = find_config(args.config, "finetune") if args.config is not None else None
    if args.print_config:
        print(describe_config(FinetuneConfig, config, args.overrides))
        return
    finetune(load_config(FinetuneConfig, config, args.overrides))
