"""Rank-0 outputs: metrics.jsonl rows, TensorBoard scalars, the experiment trackers, and the tqdm progress bar."""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from convnextv2.checkpoint.io import atomic_write, writing

if TYPE_CHECKING:
    from fcmae.engine.config import RunConfig


@dataclass(frozen=True)
class ImageFile:
    """A picture the run wrote, as a value of a metrics row (e.g. the reconstruction grid): metrics.jsonl records its
    path (relative to output_dir), the trackers receive the image."""
    path: str


class MetricsLogger:
    """Appends one JSON object per line to {output_dir}/metrics.jsonl and mirrors numbers to TensorBoard (tb/) and
    to the experiment trackers `config.log` turns on (fcmae.engine.trackers, which also get the resolved config).

    Rows carry `kind`: "step" (every log.every_steps optimizer steps) or "epoch" (end of each epoch).
    Disabled (no files) on ranks other than 0. resume_step: the run resumes after that optimizer step, so rows of
    later steps (written before the interruption, about to be replayed) are dropped: no step appears twice (-1: a
    fresh start, which drops the rows of an earlier attempt that left no checkpoint).
    A failed write (a full disk) raises a WriteError naming metrics.jsonl or tb/, TensorBoard's included: its writer
    thread's error comes back at the next add_scalar, flush or close.
    """

    def __init__(self, output_dir: str, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None, config: RunConfig | None = None):
        self.enabled = enabled
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.tb = None
        logged_until: dict[str, int] = {}
        if enabled and resume_step is not None:
            logged_until = self.truncate_after(resume_step)
        resumed = resume_step is not None and resume_step >= 0  # -1: a fresh start, whose trackers start new runs
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: slow, and only rank 0 needs it
            self.tb_dir = os.path.join(output_dir, "tb")
            with writing(self.tb_dir):  # purge_step hides the events logged after the checkpoint by the interrupted run
                self.tb = SummaryWriter(self.tb_dir, purge_step=resume_step + 1 if resume_step is not None else None)
            self.previous_excepthook = threading.excepthook
            threading.excepthook = self.thread_error
        self.trackers = []
        if enabled and config is not None:
            from fcmae.engine.trackers import open_trackers

            self.trackers = open_trackers(config, resumed, logged_until if resumed else {})

    def truncate_after(self, step: int) -> dict[str, int]:
        """Drop rows with a step after `step` (atomically: temp file + os.replace). -> kind -> the last step logged
        before (the rows the trackers already hold)."""
        if not os.path.isfile(self.path):
            return {}
        with open(self.path) as f:
            lines = f.readlines()
        keep, logged_until = [], {}
        for line in lines:
            try:
                row = json.loads(line)
                logged_until[row["kind"]] = max(row["step"], logged_until.get(row["kind"], row["step"]))
                if row["step"] > step:
                    continue
            except (ValueError, KeyError, TypeError):  # a line cut short by the interruption
                continue
            keep.append(line if line.endswith("\n") else line + "\n")
        if len(keep) != len(lines):
            atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(keep)))
        return logged_until

    def log(self, kind: str, step: int, **values: Any) -> None:
        """One row; values: numbers, and `ImageFile`s (pictures written for this row)."""
        if not self.enabled:
            return
        images = {k: v.path for k, v in values.items() if isinstance(v, ImageFile)}
        shown = {k: os.path.relpath(v, self.output_dir) for k, v in images.items()}
        row = {"kind": kind, "step": step, "time": round(time.time(), 3), **values, **shown}
        with writing(self.path), open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and k not in ("epoch", "step")}
        if self.tb is not None:
            with writing(self.tb_dir):
                for k, v in numbers.items():
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
        for tracker in self.trackers:
            tracker.log(kind, step, numbers, images)

    def log_outputs(self, paths: dict[str, str]) -> None:
        """The files a finished run leaves (name -> path), recorded with its tracked runs."""
        for tracker in self.trackers:
            tracker.log_outputs({k: os.path.abspath(v) for k, v in paths.items()})

    def thread_error(self, args: threading.ExceptHookArgs) -> None:
        """threading.excepthook while TensorBoard is open: its writer thread's error is not printed as a traceback
        (the next add_scalar / flush / close raises it here, as a WriteError); any other thread's goes on as before."""
        from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

        if not isinstance(args.thread, _AsyncWriterThread):
            self.previous_excepthook(args)

    def close(self, status: str = "finished", quiet: bool = False) -> None:
        """Flush and close TensorBoard, then end the tracked runs with `status` (finished | failed | killed): failed
        when TensorBoard cannot be flushed. quiet: ignore TensorBoard's errors (another error, in flight, says what
        went wrong)."""
        trackers, self.trackers = self.trackers, []
        tb, self.tb = self.tb, None
        try:
            if tb is not None:
                with writing(self.tb_dir):
                    tb.close()
        except OSError:
            status = "failed"
            if not quiet:
                raise
        finally:
            if tb is not None:
                threading.excepthook = self.previous_excepthook
            for tracker in trackers:
                tracker.close(status)


def progress_bar(total: int, initial: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
