"""`fcmae pretrain --config FILE [key=value ...]`: FCMAE pretraining (fcmae.pretrain) with a recipe or YAML config."""
from __future__ import annotations

import argparse

from fcmae.config import add_config_arguments, describe_config, load_config
from fcmae.pretrain import pretrain
from fcmae.pretrain_config import PretrainConfig
from fcmae.recipes import find_config


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretrain", help="FCMAE pretraining (resumes automatically in the same output_dir)",
        description="Pretrain a ConvNeXt V2 encoder with FCMAE. Example: fcmae pretrain --config tiny "
        "(the recipe configs/pretrain/tiny.yaml) data.path=/data/train output_dir=runs/tiny. Multi-GPU: torchrun "
        "--nproc_per_node=8 -m fcmae pretrain ... (data.batch_size is the GLOBAL batch). Start from released weights "
        "with model.init=FILE (any format fcmae convert reads); rerunning resumes from output_dir/last.pt.",
    )
    add_config_arguments(p, "YAML file, or a recipe: pretrain/<size> or just <size> (atto ... huge, demo)",
                         "optim.epochs=100 data.path=/data", print_config=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    config = find_config(args.config, "pretrain") if args.config is not None else None
    if args.print_config:
        print(describe_config(PretrainConfig, config, args.overrides))
        return
    pretrain(load_config(PretrainConfig, config, args.overrides))
