"""Resuming with a changed config is explicit: which keys may change between the segments of one run.

A training checkpoint stores the resolved config that trained it (`config`); a rerun that resumes from it compares
its own config with it, key by key, before any data is read. Keys that say where and how the run executes, how
long it goes and what it logs may change freely (FREE). Any other change (the seed, the data, the recipe) is
refused with one line listing each key, its old and new value, and the two ways out: another output_dir for a new
run, or `accept_changes=[KEY,...]` to continue this one with the change on purpose. Every change, free or accepted,
is printed and recorded with the segment's config (fcmae.engine.rundir). The keys that identify the model are the
header's (fcmae.engine.resume.check_same_run): a checkpoint cannot hold another model, accepted or not.
"""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from fcmae.config import flatten, show_value, to_dict
from fcmae.engine.resume import CONFIG_KEYS, where_from

FREE = (  # dotted keys (fnmatch patterns) that may differ from the checkpoint's config
    "output_dir", "resume", "accept_changes",  # where the run lives and resumes from; this key itself
    "device", "amp", "compile", "channels_last", "model.backend",  # how the same model is computed
    "optim.epochs",  # how long: a finished run goes on with more epochs
    "data.num_workers", "data.eval_batch_size", "data.eval_every_epochs",  # loading and evaluation, not training
    "checkpoint.*", "log.*", "monitor.*",  # cadence of checkpoints, logs, pictures and the kNN probe
    "model.init", "model.head_init_scale",  # read when a run starts from scratch, never on resume
)


@dataclass(frozen=True)
class Change:
    """A key whose value differs from the checkpoint's config. accepted: named in accept_changes (else FREE)."""
    key: str
    old: Any
    new: Any
    accepted: bool

    def __str__(self) -> str:
        accepted = " (accepted)" if self.accepted else ""
        return f"{self.key} {show_value(self.old)} -> {show_value(self.new)}{accepted}"


def is_free(key: str) -> bool:
    return any(fnmatchcase(key, pattern) for pattern in FREE)


def is_accepted(key: str, accept: list[str]) -> bool:
    """accept names the key or a section above it (`data` accepts data.path)."""
    return any(key == a or key.startswith(a + ".") for a in accept)


def differences(old: dict[str, Any], new: dict[str, Any], skip: set[str]) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every dotted key both configs hold with other values; a key the old config lacks (added
    to the schema since) is not a change."""
    before, after = flatten(old), flatten(new)
    return [(k, before[k], v) for k, v in after.items() if k in before and k not in skip and before[k] != v]


def resume_changes(cfg: Any, resume: tuple[str, dict[str, Any]] | None, header: dict[str, Any]) -> list[Change]:
    """The config changes a resume makes (none for a fresh run, or a checkpoint without a config). ValueError, one
    line, when a key outside FREE changed and accept_changes does not name it."""
    if resume is None or not isinstance(resume[1].get("config"), dict):
        return []
    path, state = resume
    skip = {"accept_changes"} | {CONFIG_KEYS.get(k, f"model.{k}") for k in header.get("model_args") or {}}
    diffs = differences(state["config"], to_dict(cfg), skip)
    refused = [(k, old, new) for k, old, new in diffs if not is_free(k) and not is_accepted(k, cfg.accept_changes)]
    if refused:
        listed = "; ".join(f"{k}: {show_value(old)} in the existing run, {show_value(new)} now"
                           for k, old, new in refused)
        accept = ",".join(cfg.accept_changes + [k for k, _, _ in refused])
        raise ValueError(f"{where_from(path, bool(cfg.resume))} was trained with another config ({listed}): for a "
                         "new run with these values choose another output_dir; to continue this run with them on "
                         f"purpose, rerun with 'accept_changes=[{accept}]' (the change is recorded)")
    return [Change(k, old, new, accepted=not is_free(k)) for k, old, new in diffs]
