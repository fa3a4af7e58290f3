"""Resuming a run: read our own training checkpoint (one clean line for anything else), and check that it holds the
model the command is configured for, before any data, file or device is touched.

A training checkpoint (`last.pt`) carries a header (`format`, `model_args`) next to the model, optimizer and
counters; the command's config implies the header it would write. Values that define the model (architecture,
decoder, run kind) must agree; the rest of the config is compared by fcmae.engine.changes.
"""
from __future__ import annotations

import json
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

from fcmae.engine import checkpoint as ckpt_io
from fcmae.engine.distributed import DistInfo
from fcmae.engine.training_state import check_training_tensors, damage

TRAINING_KEYS = ("model", "optimizer", "epoch", "step")
KINDS = {"fcmae": "an FCMAE pretraining", "fcmae-finetune": "a fine-tuning"}
CONFIG_KEYS = {"encoder_name": "model.name"}  # header model_args name -> config key (others: model.<name>)


def where_from(path: str, explicit: bool, afresh: str | None = None) -> str:
    if explicit:
        return f"resume={path!r}"
    return repr(path) if afresh else f"output_dir={os.path.dirname(path) or '.'!r} (its {ckpt_io.LAST})"


def _afresh(afresh: str | None) -> str:
    """How to start afresh when {output_dir}/last.pt cannot be resumed: `afresh` (a command's own options) or
    pretrain / finetune's."""
    return afresh or ("to start afresh move it away, or resume from an earlier checkpoint with resume=PATH (e.g. a "
                      "checkpoint-epochN.pt)")


def read_training_checkpoint(path: str, explicit: bool, afresh: str | None = None) -> dict[str, Any]:
    """Load (weights_only / safetensors) a checkpoint to resume from; ValueError (one line) when it is unreadable or
    not an fcmae training checkpoint. explicit: it came from `resume=` (else it is {output_dir}/last.pt); afresh:
    what the command that runs offers to start afresh (default: pretrain / finetune's keys)."""
    from convnextv2.checkpoint import CheckpointError, load_file

    try:
        state = load_file(path)
    except CheckpointError as e:
        fix = "" if explicit else f"; {_afresh(afresh)}"
        raise ValueError(f"cannot resume: {e}{fix}") from None
    if not isinstance(state, dict) or any(k not in state for k in TRAINING_KEYS):
        fix = afresh if afresh and not explicit else (
            f"resume= continues such runs only: to start from these weights, use model.init={path} instead")
        raise ValueError(
            f"{where_from(path, explicit, afresh)} is not an fcmae training checkpoint (the last.pt of a pretrain or "
            f"finetune run, with optimizer state and counters); {fix}"
        )
    return state


def check_same_run(state: dict[str, Any], header: dict[str, Any], path: str, explicit: bool,
                   afresh: str | None = None) -> None:
    """ValueError (one line: what differs, what to do) unless `state` was written by a run of the same kind and model
    as `header` (the header this run writes; a None value in header['model_args'] is not known yet: not compared).
    afresh: what the command that runs offers to start afresh (default: pretrain / finetune's keys)."""
    where = where_from(path, explicit, afresh)
    have, want = state.get("format"), header.get("format")
    if have != want:
        what = KINDS.get(have, f"a {have!r}-format" if have else "an unknown")
        fix = "choose another output_dir for this run" if not explicit else "give a checkpoint of this kind of run"
        if afresh and not explicit:
            fix = afresh
        elif want == "fcmae-finetune" and have == "fcmae":
            fix += f" and start from the pretrained weights with model.init={path}"
        raise ValueError(f"{where} holds {what} run, but this is {KINDS.get(want, want)}: {fix}")
    found, wanted = state.get("model_args"), header.get("model_args") or {}
    found = found if isinstance(found, dict) else {}  # not a mapping: `damage` says so
    diffs = [f"{CONFIG_KEYS.get(k, 'model.' + k)}: {found[k]!r} in the existing run, {v!r} now"
             for k, v in wanted.items() if v is not None and k in found and found[k] != v]
    if diffs:
        fix = ("choose another output_dir for the new model, or rerun with the existing run's values to resume it"
               if not explicit else "resume with the checkpoint's values, or use model.init to start from its weights")
        fix = afresh if afresh and not explicit else fix
        raise ValueError(f"{where} holds a run of another model ({'; '.join(diffs)}): {fix}")


def prepare_resume(output_dir: str, resume: str | None, header: dict[str, Any],
                   shapes: dict[str, torch.Size] | None = None, afresh: str | None = None
                   ) -> tuple[str, dict[str, Any]] | None:
    """The checkpoint to resume from, loaded and checked against `header` (the same kind of run and model) and
    its tensors checked (`check_training_tensors`; shapes: the live model's, when there is one), as (path, state);
    None for a fresh run. afresh: what the command that runs offers to start afresh, said when {output_dir}/last.pt
    cannot be resumed (default: pretrain / finetune's keys)."""
    path = ckpt_io.resume_path(output_dir, resume)
    if path is None:
        return None
    state = read_training_checkpoint(path, bool(resume), afresh)
    check_same_run(state, header, path, bool(resume), afresh)
    where = where_from(path, bool(resume), afresh)
    fix = "resume from an earlier checkpoint" if resume else _afresh(afresh)
    problem = damage(state)
    if problem is not None:
        raise ValueError(f"{where} is a damaged training checkpoint: {problem}; {fix}")
    check_training_tensors(state, header, where, shapes, fix)
    return path, state


def check_same_resume_everywhere(resume: tuple[str, dict[str, Any]] | None, info: DistInfo) -> None:
    """ValueError (the same line on every process) unless every process found the same checkpoint to resume from.

    Each process reads the checkpoint itself, so on several nodes `output_dir` (and `resume=`) must be on a filesystem
    every node sees: on a node-local disk, a rerun finds last.pt on the first node only and the other nodes would
    start afresh with the optimizer state and counters of a new run. A collective: every process must call it.
    """
    if not info.distributed:
        return
    mine = (socket.gethostname(), *((resume[0], int(resume[1]["step"])) if resume is not None else ()))
    views: list[Any] = [None] * info.world_size
    dist.all_gather_object(views, mine)
    if len({view[1:] for view in views}) == 1:
        return
    said = {}  # each distinct view, with the first process that has it
    for rank, (host, *found) in enumerate(views):
        said.setdefault(tuple(found), f"process {rank} (on {host}) " + (
            f"resumes from step {found[1]} of {found[0]}" if found else "finds no checkpoint and would start afresh"))
    raise ValueError(f"the {info.world_size} processes disagree on where to resume ({'; '.join(said.values())}): "
                     "output_dir (and resume=) must be on a filesystem every node sees, not a node-local disk")


def complete(state: dict[str, Any], epochs: int) -> bool:
    """True when the checkpoint has trained all `epochs` (a rerun has nothing to do)."""
    return int(state["epoch"]) >= epochs


def complete_message(output_dir: str, state: dict[str, Any], epochs: int, limit: int = 12) -> str:
    """What a rerun of a finished run says: that it is complete, where its outputs are, how to go on."""
    names = sorted(n for n in os.listdir(output_dir) if not n.startswith("."))
    listing = ", ".join(names[:limit]) + (f" ... ({len(names)} entries)" if len(names) > limit else "")
    return (f"nothing to train: the run in {output_dir} is complete ({state['epoch']} epochs, step {state['step']}; "
            f"optim.epochs={epochs}). Its outputs: {listing}. To train longer, rerun with a larger optim.epochs; "
            "for a new run, choose another output_dir.")


def finished_run(output_dir: str, state: dict[str, Any], epochs: int, main: bool) -> dict[str, Any]:
    """A rerun of a complete run: say so (rank 0; only temp files a killed process left are removed) and return
    its summary: the counters and the numbers of its last epoch row in metrics.jsonl (loss, top-1, ...)."""
    if main:
        ckpt_io.remove_stale_temps(output_dir)
        print(complete_message(output_dir, state, epochs), flush=True)
    last: dict[str, Any] = {}
    try:
        with open(os.path.join(output_dir, "metrics.jsonl")) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:  # a row cut short
                    continue
                if isinstance(row, dict) and row.get("kind") == "epoch":
                    last = row
    except OSError:
        pass
    numbers = {k: v for k, v in last.items() if isinstance(v, (int, float)) and k not in ("step", "epoch", "time")}
    return {**numbers, "epoch": int(state["epoch"]), "step": int(state["step"]), "skipped": 0, "complete": True}
