"""Experiment trackers (`log.mlflow`, `log.wandb`): what MetricsLogger writes to metrics.jsonl and TensorBoard, sent
to a tracked run too, on rank 0 only.

A tracked run receives the step and epoch rows (as `step/loss`, `epoch/loss`, ... at the row's optimizer step), the
resolved config, the reconstruction pictures and, at the end, the paths of the final checkpoint and exported files
(paths, not uploads). Its id is kept in {output_dir}/trackers.json, so a resumed run continues the same tracked run;
the rows the interrupted run had already sent (metrics.jsonl says up to which step) are not sent again when the
resumed run replays their steps.

A tracker must not stop a training: its first error (a server that stopped answering, a full disk) prints one
warning line and turns that tracker off for the rest of the process; metrics.jsonl and TensorBoard keep every row.
A tracker's package is imported only when it is turned on (by `open_trackers`: fcmae.engine.mlflow_tracker,
fcmae.engine.wandb_tracker).
"""
from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, Protocol

from convnextv2.checkpoint.convert import write_json

if TYPE_CHECKING:
    from fcmae.engine.config import RunConfig

STATE = "trackers.json"  # {tracker: what reopens its run}, in output_dir


class Tracker(Protocol):
    label: str  # how warnings name it
    state: dict[str, Any]  # what reopens this tracked run (saved in trackers.json)
    reopened: bool  # True: it continues the run of an earlier process of this training

    def log(self, kind: str, step: int, numbers: dict[str, float], images: dict[str, str]) -> None:
        """A metrics row: numbers as `{kind}/{name}` at optimizer step `step`; images: name -> PNG path."""
    def log_outputs(self, paths: dict[str, str]) -> None:
        """The files the run leaves: name -> absolute path."""
    def close(self, status: str) -> None:
        """status: "finished", "failed" (an error stopped the training) or "killed" (interrupted)."""


def run_name(cfg: RunConfig) -> str:
    return cfg.log.run_name or os.path.basename(os.path.abspath(cfg.output_dir))


def describe_error(e: BaseException) -> str:
    """An exception as one short line (tracker errors can span pages)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


class Guarded:
    """One tracker as MetricsLogger uses it: rows its run already holds are skipped, and its first error prints one
    warning line and turns it off (the training goes on).

    skip_until: kind -> the last step of that kind the interrupted run logged (rows up to it are already in a
    reopened run)."""

    def __init__(self, label: str, tracker: Tracker | None, skip_until: dict[str, int]):
        self.label, self.tracker, self.skip_until = label, tracker, skip_until

    @classmethod
    def open(cls, label: str, opener: Callable[[], Tracker], skip_until: dict[str, int]) -> Guarded:
        guarded = cls(label, None, {})
        tracker = guarded.call(opener)
        if tracker is not None:
            guarded.tracker, guarded.skip_until = tracker, skip_until if tracker.reopened else {}
        return guarded

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:  # any error of the tracker's library: never the end of a training
            self.tracker = None
            print(f"fcmae: warning: {self.label} stopped ({describe_error(e)}); training goes on without it "
                  "(metrics.jsonl and TensorBoard keep every row)", file=sys.stderr, flush=True)
            return None

    def log(self, kind: str, step: int, numbers: dict[str, float], images: dict[str, str]) -> None:
        if self.tracker is not None and step > self.skip_until.get(kind, -1):
            self.call(self.tracker.log, kind, step, numbers, images)

    def log_outputs(self, paths: dict[str, str]) -> None:
        if self.tracker is not None:
            self.call(self.tracker.log_outputs, paths)

    def close(self, status: str) -> None:
        if self.tracker is not None:
            self.call(self.tracker.close, status)
            self.tracker = None


def read_state(output_dir: str) -> dict[str, Any]:
    try:
        with open(os.path.join(output_dir, STATE)) as f:
            state = json.load(f)
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):  # none yet, or unreadable: the trackers start new runs
        return {}


def write_state(output_dir: str, state: dict[str, Any]) -> None:
    write_json(os.path.join(output_dir, STATE), state)


def open_trackers(cfg: RunConfig, resumed: bool, logged_until: dict[str, int]) -> list[Guarded]:
    """The trackers `cfg.log` turns on (rank 0 only), each continuing its run from trackers.json when `resumed`.
    logged_until: kind -> last step metrics.jsonl held before the resume (see Guarded)."""
    kinds = [key for key, on in (("mlflow", cfg.log.mlflow), ("wandb", cfg.log.wandb)) if on]
    if not kinds:
        return []
    from fcmae.config import to_dict

    config, state, trackers = to_dict(cfg), read_state(cfg.output_dir) if resumed else {}, []
    for key in kinds:
        if key == "mlflow":
            from fcmae.engine.mlflow_tracker import MlflowTracker as cls
        else:
            from fcmae.engine.wandb_tracker import WandbTracker as cls
        guarded = Guarded.open(cls.label, lambda: cls(cfg, config, state.get(key)), logged_until)
        if guarded.tracker is not None:
            state[key] = guarded.tracker.state
        trackers.append(guarded)
    write_state(cfg.output_dir, state)
    return trackers
