"""Training checkpoints: atomic writes (temp file in the same folder + os.replace) and safe loading."""
from __future__ import annotations

import glob
import os
from typing import Any

import torch

LAST = "last.pt"
TMP_MARK = ".tmp-"


def save_atomic(obj: dict[str, Any], path: str) -> None:
    """torch.save to a temp file next to `path`, fsync, then os.replace: a crash leaves the old file intact."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temps(folder: str) -> list[str]:
    """Delete temp files left by a process that died while writing (they are never resumed from)."""
    stale = glob.glob(os.path.join(folder, f".*{TMP_MARK}*"))
    for f in stale:
        os.remove(f)
    return stale


def load_checkpoint(path: str) -> dict[str, Any]:
    """weights_only load (no code runs from the file); ValueError naming the file when it is not a checkpoint."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path!r} ({type(e).__name__}: {e}); give another file to resume=") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path!r} is not a training checkpoint (no 'model' entry)")
    return ckpt


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
