"""The `fcmae` command. Each subcommand lives in its own module exposing `add_parser(subparsers)`."""
from __future__ import annotations

import argparse
import sys

from fcmae import bench, demo

COMMANDS = [demo, bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcmae", description="Pretrain ConvNeXt V2 encoders with FCMAE, convert and fine-tune them."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module in COMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"fcmae {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
