"""Reconstruction pictures: original | masked input | prediction | prediction with the visible patches pasted back.

`fcmae visualize CKPT IMAGES... --out grid.png` draws them for any FCMAE checkpoint; the pretrain engine writes
one every `log.vis_every_epochs` epochs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import save_image

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
    save_image(reconstruction_grid(model, imgs, mask, mean, std), path, nrow=4, padding=2, pad_value=1.0)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "visualize", help="draw FCMAE reconstructions of images with a checkpoint",
        description="One row per image: original | masked input (grey = masked) | prediction | prediction with the "
        "visible patches pasted back. Predictions are un-normalised per patch when the model uses norm_pix_loss.",
    )
    p.add_argument("checkpoint", help="FCMAE checkpoint (a run's last.pt, or `fcmae convert --to fcmae` output)")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", default="grid.png", help="output picture, .png or .jpg (default grid.png; its folder is "
                   "created)")
    p.add_argument("--size", type=int, default=None, help="image side, a multiple of the checkpoint's patch size "
                   "(default: the run's size, or 224)")
    p.add_argument("--mask-ratio", type=float, default=None, help="default: the checkpoint's")
    p.add_argument("--seed", type=int, default=0, help="seed of the random mask")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from fcmae.data.decode import decode_image
    from fcmae.data.transforms import default_stats, eval_transform
    from fcmae.engine.checkpoint import load_checkpoint
    from fcmae.masking import random_mask

    out = Path(args.out)
    if out.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {args.out}: name the picture with an image extension, e.g. {out.stem or 'grid'}.png")
    ckpt = load_checkpoint(args.checkpoint)
    if ckpt.get("format") != "fcmae" or "model_args" not in ckpt:
        what = "a fine-tuned classifier" if ckpt.get("format") == "fcmae-finetune" else "not an FCMAE checkpoint"
        raise ValueError(f"{args.checkpoint!r} is {what}; visualize draws reconstructions, which need the FCMAE "
                         "decoder: give a pretraining checkpoint (a `fcmae pretrain` run's last.pt)")
    margs = dict(ckpt["model_args"])
    if args.mask_ratio is not None:
        margs["mask_ratio"] = args.mask_ratio
    data_cfg = ckpt.get("config", {}).get("data", {})
    size = args.size or data_cfg.get("image_size", 224)
    model = FCMAE(**margs)  # checkpoints from before model.patch_size have none: 32
    model.load_state_dict(ckpt["model"])
    if size % model.patch_size:
        raise ValueError(f"--size {size} must be a multiple of {model.patch_size}, the checkpoint's patch size")
    c = model.in_chans
    d_mean, d_std = default_stats(c)
    mean, std = data_cfg.get("mean") or d_mean, data_cfg.get("std") or d_std
    tf = eval_transform(size, c, mean, std)
    imgs = []
    for path in args.images:
        img = decode_image(path, c)
        if img is None:
            raise ValueError(f"cannot read image {path!r}")
        imgs.append(tf(img))
    x = torch.stack(imgs)
    g = torch.Generator().manual_seed(args.seed)
    mask = random_mask(len(x), (size // model.patch_size,) * 2, model.mask_ratio, generator=g)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(model, x, mask, mean, std, str(out))
    print(f"wrote {args.out} ({len(x)} rows: original | masked | prediction | prediction + visible)")
