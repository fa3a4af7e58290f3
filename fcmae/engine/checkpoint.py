"""Training checkpoints: atomic writes (temp file in the same folder + os.replace), previous.pt and its rollback.

(Reading one is convnextv2.checkpoint.load_file, checked by fcmae.engine.resume.)"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
from typing import Any

import torch

from convnextv2.checkpoint.io import TMP_PREFIX, load_file, save_torch, temp_path, writing

LAST = "last.pt"
PREVIOUS = "previous.pt"  # the last.pt before the newest: what a NaN stop rolls back to


def save_atomic(obj: dict[str, Any], path: str) -> None:
    """torch.save to a temp file next to `path`, fsync, then os.replace (`save_torch`): a crash leaves the old file
    intact. A failed write (a full disk...) raises a WriteError naming `path` and the cause."""
    save_torch(obj, path)


def save_last(obj: dict[str, Any], path: str) -> None:
    """save_atomic onto {folder}/last.pt, first keeping the file it replaces as previous.pt (a hard link where the
    filesystem has them, else a copy)."""
    folder = os.path.dirname(os.path.abspath(path))
    previous = os.path.join(folder, PREVIOUS)
    # already one file (a run killed while writing the last.pt after this link): os.replace of two links to one
    # file does nothing, which would leave the temp link behind
    if os.path.isfile(path) and not (os.path.isfile(previous) and os.path.samefile(path, previous)):
        tmp = temp_path(previous)
        try:
            with writing(previous):
                try:
                    os.link(path, tmp)
                except OSError:  # a filesystem without hard links: copy
                    shutil.copyfile(path, tmp)
                os.replace(tmp, previous)
        finally:  # a failed copy or rename leaves no temp behind
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
    save_atomic(obj, path)


def rollback_last(folder: str) -> int | None:
    """Replace last.pt by previous.pt (its step is returned), or remove last.pt when there is no previous one."""
    last, prev = os.path.join(folder, LAST), os.path.join(folder, PREVIOUS)
    if not os.path.isfile(prev):
        if os.path.exists(last):
            os.remove(last)
        return None
    try:  # only this run wrote it, but it is read as any file is: safely, and a damaged one is no place to resume
        step = int(load_file(prev)["step"])
    except (ValueError, KeyError, TypeError):
        os.remove(last)
        return None
    os.replace(prev, last)
    return step


def remove_stale_temps(folder: str) -> list[str]:
    """Delete temp files left by a process that died while writing (they are never resumed from): only names with
    fcmae's TMP_PREFIX, so a user's own `.draft.tmp-1` stays. Called by the run that holds the folder's lock."""
    stale = glob.glob(os.path.join(glob.escape(folder), f"{TMP_PREFIX}*"))
    for f in stale:
        if os.path.isdir(f) and not os.path.islink(f):  # a folder output being assembled (atomic_folder)
            shutil.rmtree(f, ignore_errors=True)
        else:
            os.remove(f)
    return stale


def resume_path(output_dir: str, resume: str | None) -> str | None:
    """The file to resume from: `resume` if given, else {output_dir}/last.pt if it exists, else None."""
    if resume:
        return resume
    last = os.path.join(output_dir, LAST)
    return last if os.path.isfile(last) else None


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
