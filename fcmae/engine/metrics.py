"""Rank-0 outputs: metrics.jsonl rows, TensorBoard scalars, and the tqdm progress bar."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from convnextv2.checkpoint.io import atomic_write


class MetricsLogger:
    """Appends one JSON object per line to {output_dir}/metrics.jsonl and mirrors numbers to TensorBoard (tb/).

    Rows carry `kind`: "step" (every log.every_steps optimizer steps) or "epoch" (end of each epoch).
    Disabled (no files) on ranks other than 0. resume_step: the run resumes after that optimizer step, so rows of
    later steps (written before the interruption, about to be replayed) are dropped: no step appears twice (-1: a
    fresh start, which drops the rows of an earlier attempt that left no checkpoint).
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
            # purge_step hides the events logged after the checkpoint by the interrupted run
            self.tb = SummaryWriter(os.path.join(output_dir, "tb"),
                                    purge_step=resume_step + 1 if resume_step is not None else None)

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
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def progress_bar(total: int, initial: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
