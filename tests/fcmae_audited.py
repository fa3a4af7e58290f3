"""Run `fcmae ARGS` in this process and record what it writes in a folder: which process of a multi-node job
writes the run's files (tests/test_nodes.py).

    python tests/fcmae_audited.py WATCH_DIR RECORD_DIR ARGS...

RECORD_DIR/rank{RANK}-{pid}.jsonl gets one line [event, path relative to WATCH_DIR] for every write-like operation
this process makes under WATCH_DIR (open for writing, appending or creating; rename/replace, link, remove, mkdir),
as Python's audit hooks (PEP 578) report them, flushed at once: a process killed by SIGKILL leaves its record too.
Every file the project writes goes through one of these (torch.save and safetensors write to a temp file that is
then renamed).
"""
from __future__ import annotations

import json
import os
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATH_EVENTS = ("os.rename", "os.link", "os.symlink", "os.remove", "os.rmdir", "os.mkdir", "os.truncate")


def audit_writes(watch: str, record) -> None:
    """From now on, write [event, path relative to `watch`] to the open text file `record` for writes under `watch`."""
    watch = os.path.abspath(watch) + os.sep

    def inside(path) -> str | None:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return None  # a file descriptor
        path = os.path.abspath(os.fsdecode(path))
        return path[len(watch):] if path.startswith(watch) else None

    def hook(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[2], int) and args[2] & WRITE_FLAGS:
            paths = args[:1]
        elif event in PATH_EVENTS:
            paths = args[:2] if event in ("os.rename", "os.link", "os.symlink") else args[:1]
        else:
            return
        for path in paths:
            rel = inside(path)
            if rel is not None:
                record.write(json.dumps([event, rel]) + "\n")
                record.flush()

    sys.addaudithook(hook)


def main() -> int:
    watch, record, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    audit_writes(watch, open(os.path.join(record, f"rank{os.environ.get('RANK', '0')}-{os.getpid()}.jsonl"), "w"))
    from fcmae.cli import main as fcmae_main

    return fcmae_main(argv)


if __name__ == "__main__":
    sys.exit(main())
