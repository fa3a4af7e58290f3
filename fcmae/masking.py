"""Random patch masks and the patch <-> image reshapes of docs/method.md."""
from __future__ import annotations

import torch
from einops import rearrange


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches kept visible per sample: int(L * (1 - ratio)), as in the reference (19 of 49 at 224 px, ratio 0.6)."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    if num_patches < 2:
        raise ValueError(f"{num_patches} patch per image cannot be both masked and visible, whatever the mask ratio; "
                         "use images of at least 2x2 patches")
    keep = int(num_patches * (1 - mask_ratio))
    if keep < 1:
        raise ValueError(
            f"mask_ratio {mask_ratio} leaves no visible patch out of {num_patches}; use a lower ratio or larger images"
        )
    return keep


def random_mask(
    batch: int, grid: tuple[int, int], mask_ratio: float, device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(batch, h, w) float mask, 1 = masked, 0 = visible; each sample keeps exactly `num_visible` random patches."""
    h, w = grid
    keep = num_visible(h * w, mask_ratio)
    noise = torch.rand(batch, h * w, device=device, generator=generator)
    rank = noise.argsort(dim=1).argsort(dim=1)  # rank of each patch's noise within its sample
    return (rank >= keep).float().reshape(batch, h, w)


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C); L = (H/p)*(W/p) row-major; vector order (row-in-patch, col-in-patch, channel)."""
    return rearrange(imgs, "n c (h p) (w q) -> n (h w) (p q c)", p=p, q=p)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int]) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, H, W), the inverse of `patchify` for a (H/p, W/p) = grid image."""
    h, w = grid
    return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=h, w=w, p=p, q=p)
