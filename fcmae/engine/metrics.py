"""Rank-0 outputs: metrics.jsonl rows, TensorBoard scalars, and the tqdm progress bar."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from convnextv2.checkpoint.io import atomic_write, writing


class MetricsLogger:
    """Appends one JSON object per line to {output_dir}/metrics.jsonl and mirrors numbers to TensorBoard (tb/).

    Rows carry `kind`: "step" (every log.every_steps optimizer steps) or "epoch" (end of each epoch).
    Disabled (no files) on ranks other than 0. resume_step: the run resumes after that optimizer step, so rows of
    later steps (written before the interruption, about to be replayed) are dropped: no step appears twice.
    A failed write (a full disk) raises a WriteError naming metrics.jsonl or tb/, TensorBoard's included: its writer
    thread's error comes back at the next add_scalar, flush or close.
    """

    def __init__(self, output_dir: str, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.tb = None
        if enabled and resume_step is not None:
            self.truncate_after(resume_step)
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: slow, and only rank 0 needs it
            self.tb_dir = os.path.join(output_dir, "tb")
            with writing(self.tb_dir):  # purge_step hides the events logged after the checkpoint by the interrupted run
                self.tb = SummaryWriter(self.tb_dir, purge_step=resume_step + 1 if resume_step is not None else None)
            self.previous_excepthook = threading.excepthook
            threading.excepthook = self.thread_error

    def truncate_after(self, step: int) -> None:
        """Drop rows with a step after `step` (atomically: temp file + os.replace)."""
        if not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        keep = []
        for line in lines:
            try:
                if json.loads(line)["step"] > step:
                    continue
            except (ValueError, KeyError, TypeError):  # a line cut short by the interruption
                continue
            keep.append(line if line.endswith("\n") else line + "\n")
        if len(keep) != len(lines):
            atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(keep)))

    def log(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        row = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        with writing(self.path), open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            with writing(self.tb_dir):
                for k, v in values.items():
                    if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                        self.tb.add_scalar(f"{kind}/{k}", v, step)

    def thread_error(self, args: threading.ExceptHookArgs) -> None:
        """threading.excepthook while TensorBoard is open: its writer thread's error is not printed as a traceback
        (the next add_scalar / flush / close raises it here, as a WriteError); any other thread's goes on as before."""
        from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

        if not isinstance(args.thread, _AsyncWriterThread):
            self.previous_excepthook(args)

    def close(self, quiet: bool = False) -> None:
        """Flush and close TensorBoard. quiet: ignore its errors (another error, in flight, says what went wrong)."""
        if self.tb is None:
            return
        tb, self.tb = self.tb, None
        try:
            with writing(self.tb_dir):
                tb.close()
        except OSError:
            if not quiet:
                raise
        finally:
            threading.excepthook = self.previous_excepthook


def progress_bar(total: int, initial: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
