"""The YAML recipes (top-level configs/, shipped inside the package as `fcmae.configs`) and `--config` lookup.

`--config` takes a path, or a recipe name: `pretrain/tiny`, or `tiny` where the command says which kind
(`fcmae pretrain --config tiny`). The same lookup serves the commands, `fcmae demo`, `fcmae submit` and fcmae.api.
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def recipes_dir() -> Path:
    """configs/ of a source checkout (plain or `pip install -e`), else the copy installed as fcmae/configs/."""
    installed = PACKAGE / "configs"
    if installed.is_dir():
        return installed
    checkout = PACKAGE.parent
    if (checkout / "configs").is_dir() and (checkout / "pyproject.toml").is_file():
        return checkout / "configs"
    raise ValueError(f"the recipes are missing: neither {installed} nor a source checkout's configs/; reinstall fcmae")


def recipe_names(kind: str | None = None) -> list[str]:
    """['finetune/atto', ..., 'pretrain/tiny'] (only `kind/...` when kind is given)."""
    root = recipes_dir()
    names = sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.glob("*/*.yaml"))
    return [n for n in names if kind is None or n.startswith(f"{kind}/")]


def find_config(value: str | os.PathLike, kind: str | None = None) -> str:
    """A `--config` value -> the YAML file to read: an existing file as given, else the recipe it names.

    kind ('pretrain' | 'finetune'): lets a bare size name the command's recipe (`tiny` -> pretrain/tiny). A path
    like configs/pretrain/tiny.yaml given outside the source checkout (README commands) finds the shipped recipe.
    ValueError listing the recipes when it is neither.
    """
    text = os.fspath(value)
    if os.path.isfile(text):
        return text
    name = text[len("configs/"):] if text.startswith("configs/") else text
    name = name[:-len(".yaml")] if name.endswith(".yaml") else name
    candidates = [name] + ([f"{kind}/{name}"] if kind and "/" not in name else [])
    root = recipes_dir()
    for candidate in candidates:
        path = root / f"{candidate}.yaml"
        if path.is_file():
            return str(path)
    names = recipe_names(kind) if kind else recipe_names()
    shown = [n.split("/", 1)[1] for n in names] if kind else names
    raise ValueError(f"--config {text!r} is neither a file nor a recipe; give a YAML file's path or a recipe: "
                     f"{', '.join(shown)}" + (f" (or {kind}/<name>)" if kind else ""))
