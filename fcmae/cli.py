"""The `fcmae` command. Each subcommand lives in its own module of fcmae.commands exposing `add_parser(subparsers)`."""
from __future__ import annotations

import argparse
import signal
import sys
from importlib.metadata import PackageNotFoundError, entry_points, version

from fcmae.commands import bench, convert, demo, embed, evaluate, finetune, knn, predict, pretrain, shards, visualize
from fcmae.engine.loop import NonFiniteLossError
from fcmae.engine.stop import Interrupted, StopSignals

COMMANDS = [pretrain, finetune, evaluate, predict, knn, embed, convert, visualize, shards, demo, bench]


def plugin_commands() -> list:
    """Subcommand modules other packages declare in the `fcmae.commands` entry-point group (pyproject.toml),
    e.g. `submit` from jobs/: fcmae reaches them without importing them by name (jobs builds on fcmae, not the
    reverse). One that fails to import is reported and left out, so a broken plugin cannot break `fcmae`."""
    modules = []
    for ep in entry_points(group="fcmae.commands"):
        try:
            modules.append(ep.load())
        except Exception as e:  # noqa: BLE001 - any import failure of a plugin
            print(f"fcmae: warning: command {ep.name!r} ({ep.value}) failed to load and is left out: {e}",
                  file=sys.stderr)
    return modules


def installed_version() -> str:
    """The installed distribution's version (pyproject.toml's, as pip recorded it)."""
    try:
        return version("fcmae")
    except PackageNotFoundError:
        return "(not installed: run from a source tree)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcmae", description="Pretrain ConvNeXt V2 encoders with FCMAE, convert and fine-tune them."
    )
    parser.add_argument("--version", action="version", version=f"fcmae {installed_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module in COMMANDS + plugin_commands():
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with StopSignals():  # Ctrl-C / SIGTERM: training stops after its step, anything else at once; one line
        try:
            args.func(args)
        except ValueError as e:  # bad input: one clear line, no traceback
            print(f"fcmae {args.command}: error: {e}", file=sys.stderr)
            return 2
        except NonFiniteLossError as e:  # a diverged run: the last good checkpoint is kept, the message says what to do
            print(f"fcmae {args.command}: stopped: {e}", file=sys.stderr)
            return 3
        except OSError as e:  # the file system refused (read-only, full, gone): one line naming the file, no traceback
            print(f"fcmae {args.command}: error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as e:  # SIGINT / SIGTERM (Interrupted says where a training run stopped)
            stop = e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT)
            print(f"fcmae {args.command}: {stop if stop.where else f'{stop} before it finished'}", file=sys.stderr)
            return stop.exit_status
    return 0
