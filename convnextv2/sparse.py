"""Run a timm ConvNeXt V2 on the visible patches only, by a backend chosen by name."""
from __future__ import annotations

import torch
from torch import nn

from convnextv2.backends import get_backend
from convnextv2.encoder import check_patch_local, encoder_patch_size


def check_sparse_inputs(encoder: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> None:
    """ValueError naming the problem unless x is (N, in_chans, H, W) with H, W multiples of p and mask (N, H/p, W/p)."""
    p = encoder_patch_size(encoder)
    if x.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if c != encoder.in_chans:
        raise ValueError(f"images have {c} channels but the encoder was built with in_chans={encoder.in_chans}")
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}; resize or crop to a multiple of {p}")
    if tuple(mask.shape) != (n, h // p, w // p):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}, expected (N, H/{p}, W/{p}) = {(n, h // p, w // p)} "
            f"for images {tuple(x.shape)}"
        )


def sparse_forward(encoder: nn.Module, x: torch.Tensor, mask: torch.Tensor, backend: str = "masked",
                   visible: torch.Tensor | None = None) -> torch.Tensor:
    """x (N, in_chans, H, W), mask (N, H/p, W/p) 1 = masked -> (N, C_last, H/p, W/p), zero at masked positions.

    visible: the mask's visible patch indices (N, V) (`convnextv2.visible_patches(mask)`, on x's device), when the
    caller has them: the `packed` backend then needs no host sync. They must describe `mask`; nothing checks it here.
    """
    check_sparse_inputs(encoder, x, mask)
    if visible is not None and (visible.ndim != 2 or visible.shape[0] != x.shape[0]):
        raise ValueError(f"visible has shape {tuple(visible.shape)}, expected (N, V) with N = {x.shape[0]}")
    return get_backend(backend)(encoder, x, mask, visible)


class SparseEncoder(nn.Module):
    """Wraps a timm `ConvNeXt` (kept as `.encoder`, weights untouched) and runs it on visible patches.

    forward(x, mask):
        x     (N, in_chans, H, W), H and W multiples of the patch size p (32 for the standard stem)
        mask  (N, H/p, W/p), 1 = masked, 0 = visible
        -> (N, C_last, H/p, W/p), zero at masked positions; values at visible positions depend only on visible pixels.
    """

    def __init__(self, encoder: nn.Module, backend: str = "masked"):
        super().__init__()
        check_patch_local(encoder)
        get_backend(backend)  # fail now on an unknown name
        self.encoder = encoder
        self.backend = backend
        self.patch_size = encoder_patch_size(encoder)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        return sparse_forward(self.encoder, x, mask, self.backend, visible)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, patch_size={self.patch_size}"
