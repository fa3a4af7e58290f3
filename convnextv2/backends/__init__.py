"""Backends: forward functions that run a timm ConvNeXt V2 on the visible patches of a masked image.

A backend is `fn(encoder, x, mask, visible) -> features` with
    encoder  the timm `ConvNeXt` (its weights are never copied or renamed),
    x        (N, in_chans, H, W), H and W multiples of the patch size p,
    mask     (N, H/p, W/p) float, 1 = masked, 0 = visible,
    visible  (N, V) long, the visible patch indices of `mask` (`visible_patches(mask)`), or None: a backend that
             needs them computes them (a host sync on a GPU; the training loop passes them, drawn on the CPU),
    features (N, C_last, H/p, W/p), zero at masked positions.
Inputs are validated once, in `SparseEncoder`, before a backend runs.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Backend = Callable[[nn.Module, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]

BACKENDS: dict[str, Backend] = {}


def register_backend(name: str) -> Callable[[Backend], Backend]:
    def wrap(fn: Backend) -> Backend:
        BACKENDS[name] = fn
        return fn
    return wrap


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name]


# Importing a backend module registers it.
from convnextv2.backends import masked  # noqa: E402,F401
from convnextv2.backends import packed  # noqa: E402,F401
from convnextv2.backends import minkowski  # noqa: E402,F401  (imports MinkowskiEngine lazily, at the first call)
