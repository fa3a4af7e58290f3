"""Reconstruction pictures: original | masked input | prediction | prediction with the visible patches pasted back.

`fcmae visualize CKPT IMAGES... --out grid.png` (fcmae.commands.visualize) draws them for any FCMAE checkpoint; the
pretrain engine writes one every `log.vis_every_epochs` epochs.
"""
from __future__ import annotations

import os

import torch
from PIL import Image
from torchvision.utils import save_image

from convnextv2.checkpoint.io import atomic_write
from fcmae.masking import patchify, unpatchify
from fcmae.model import FCMAE


def unnormalise_pred(pred: torch.Tensor, imgs: torch.Tensor, patch: int, norm_pix: bool) -> torch.Tensor:
    """pred (N, L, p*p*C) in the loss's target space -> (N, L, p*p*C) in the (mean/std-normalised) image space.

    With norm_pix_loss the model predicts each patch standardised by that patch's own mean and unbiased variance,
    so the picture uses the original patch's statistics (as the loss did) to put it back.
    """
    if not norm_pix:
        return pred
    target = patchify(imgs, patch)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True, unbiased=True)
    return pred * (var + 1e-6) ** 0.5 + mean


def to_display(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """(N, C, H, W) normalised -> (N, 3, H, W) in [0, 1]: grey for 1-2 channels, the first three otherwise."""
    x = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    x = x.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1) if x.shape[1] < 3 else x[:, :3]
    return x.clamp(0, 1)


@torch.no_grad()
def reconstruction_grid(model: FCMAE, imgs: torch.Tensor, mask: torch.Tensor, mean: list[float],
                        std: list[float]) -> torch.Tensor:
    """imgs (N, C, H, W) normalised, mask (N, H/p, W/p) -> (4N, 3, H, W) rows of the four panels, in [0, 1]."""
    was_training = model.training
    model.eval()
    _, pred, _ = model(imgs, mask)
    model.train(was_training)
    p, (h, w) = model.patch_size, mask.shape[-2:]
    pred = unnormalise_pred(pred.float(), imgs, p, model.norm_pix_loss)
    m = mask.flatten(1).unsqueeze(-1)  # (N, L, 1), 1 = masked
    patches = patchify(imgs, p)
    masked_input = unpatchify(patches * (1 - m), p, (h, w))
    prediction = unpatchify(pred, p, (h, w))
    pasted = unpatchify(patches * (1 - m) + pred * m, p, (h, w))
    panels = [to_display(x.cpu(), mean, std) for x in (imgs, masked_input, prediction, pasted)]
    keep = unpatchify((1 - m).expand_as(patches), p, (h, w)).cpu()[:, :1]  # (N, 1, H, W), 1 = visible
    panels[1] = panels[1] * keep + 0.5 * (1 - keep)  # masked patches shown grey, not black
    return torch.stack(panels, dim=1).flatten(0, 1)  # (N*4, 3, H, W), row-major: one image per row


def save_grid(model: FCMAE, imgs: torch.Tensor, mask: torch.Tensor, mean: list[float], std: list[float],
              path: str) -> None:
    """The grid as a picture at `path` (format from its suffix), atomically: a failed write (a full disk) raises a
    WriteError naming `path` and leaves no partial picture."""
    grid = reconstruction_grid(model, imgs, mask, mean, std)
    image_format = Image.registered_extensions()[os.path.splitext(path)[1].lower()]  # the temp file has no suffix
    atomic_write(path, lambda tmp: save_image(grid, tmp, format=image_format, nrow=4, padding=2, pad_value=1.0))
