"""A run owns its output_dir: one live run per folder, and it touches only what is its own.

What a run writes there: RUN_NAMES, its task's `outputs` (reconstruction pictures, exports), the lock file and temp
files named with TMP_PREFIX; what it deletes: its own temp files, and a last.pt that a NaN stop rolls back. A folder
is a run's when it holds the lock file (every run leaves it) or the checkpoint being resumed. Any other folder may
hold the user's files (submitit's `logs/`, notes, a data set): they are left alone, and a fresh run there is refused
when a name it would write is taken.

Taking the folder has two steps, so that a run refused for any reason has written nothing:
- `claim`, before the data is read: rank 0 locks the folder if it has a lock file (refused with one line naming the
  live run that holds it) and checks the names; the config is compared with the checkpoint's (fcmae.engine.changes).
- `RunDir.start`, when training starts: rank 0 makes the folder, creates and takes the lock if there was none yet,
  records the holder, removes stale temps, writes config.yaml and appends this segment to config-history.jsonl.
"""
from __future__ import annotations

import json
import os
import socket
import time
from fnmatch import fnmatchcase
from typing import Any, Sequence

from convnextv2.checkpoint.io import writing
from fcmae.config import save_config, to_dict
from fcmae.engine import checkpoint as ckpt_io
from fcmae.engine.changes import Change, resume_changes
from fcmae.engine.distributed import DistInfo, on_main
from fcmae.engine.lock import LOCK_NAME, RunLock

HISTORY = "config-history.jsonl"  # one line per segment of the run: its start, its config, what changed
RUN_NAMES = ("config.yaml", HISTORY, "metrics.jsonl", "tb", ckpt_io.LAST, ckpt_io.PREVIOUS, "checkpoint-epoch*.pt",
             "trackers.json", "wandb")


def taken_names(folder: str, outputs: Sequence[str]) -> list[str]:
    """The entries of `folder` that have a name a run writes (RUN_NAMES or `outputs`, fnmatch patterns)."""
    if not os.path.isdir(folder):
        return []
    patterns = (*RUN_NAMES, *outputs)
    return sorted(n for n in os.listdir(folder) if any(fnmatchcase(n, p) for p in patterns))


def in_folder(path: str, folder: str) -> bool:
    return os.path.realpath(os.path.dirname(os.path.abspath(path))) == os.path.realpath(folder)


class RunDir:
    """This run's output_dir. Rank 0 holds its lock from `claim` (or `start`) until `release`."""

    def __init__(self, folder: str, info: DistInfo, lock: RunLock | None, changes: list[Change]) -> None:
        self.folder, self.info, self.lock, self.changes = folder, info, lock, changes

    def start(self, cfg: Any, resumed_from: str | None, step: int, epoch: int) -> None:
        """The run's first write (a collective; rank 0 writes): the folder, its lock, config.yaml, the history."""
        def first_touch() -> None:
            os.makedirs(self.folder, exist_ok=True)
            if self.lock is None:  # none at claim: make it now, refused if another run made it meanwhile
                self.lock = RunLock.take(self.folder, create=True)
            self.lock.record()
            ckpt_io.remove_stale_temps(self.folder)  # a checkpoint being written when a process died: never resumed
            save_config(cfg, os.path.join(self.folder, "config.yaml"))
            self.append_history(cfg, resumed_from, step, epoch)
            if self.changes:
                print(f"config changed on resume (recorded in {HISTORY}): "
                      + "; ".join(map(str, self.changes)), flush=True)

        on_main(first_touch, self.info)

    def append_history(self, cfg: Any, resumed_from: str | None, step: int, epoch: int) -> None:
        """One line for this segment: where it starts, what changed, its whole config. A segment's steps are those up
        to the next segment's start_step (a rerun replays the steps after the checkpoint it resumes from)."""
        path = os.path.join(self.folder, HISTORY)
        segment = 1
        if os.path.isfile(path):
            with open(path) as f:
                segment += sum(1 for line in f if line.strip())
        row = {"segment": segment, "start_step": step, "start_epoch": epoch, "resumed_from": resumed_from,
               "started": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname(), "pid": os.getpid(),
               "changes": {c.key: {"old": c.old, "new": c.new, "accepted": c.accepted} for c in self.changes},
               "config": to_dict(cfg)}
        with writing(path), open(path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def claim(cfg: Any, info: DistInfo, resume: tuple[str, dict[str, Any]] | None, header: dict[str, Any],
          outputs: Sequence[str]) -> RunDir:
    """Take cfg.output_dir for this run, writing nothing (a collective; the same refusal on every process): lock it
    when it holds a lock file, refuse a folder that is not a run's yet holds names this run writes, and compare the
    config with the checkpoint's. resume: (path, state) of the checkpoint the run resumes from; header: the one it
    writes; outputs: the task's own names (fnmatch patterns)."""
    folder = cfg.output_dir

    def take() -> RunLock | None:
        lock = RunLock.take(folder, create=False) if os.path.isdir(folder) else None
        if lock is None and not (resume is not None and in_folder(resume[0], folder)):
            taken = taken_names(folder, outputs)
            if taken:
                raise ValueError(
                    f"output_dir {folder!r} already holds {', '.join(taken[:6])}{' ...' if len(taken) > 6 else ''}, "
                    f"which this run would overwrite, and it is not an fcmae run's folder (no {LOCK_NAME}, no "
                    f"{ckpt_io.LAST}); move them away, or choose another output_dir")
        return lock

    lock = on_main(take, info)
    try:
        return RunDir(folder, info, lock, resume_changes(cfg, resume, header))
    except ValueError:
        if lock is not None:
            lock.release()
        raise
