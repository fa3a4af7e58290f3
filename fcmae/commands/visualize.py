"""`fcmae visualize CKPT IMAGES... --out grid.png`: FCMAE reconstruction pictures (fcmae.visualize) of image files."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from fcmae.model import FCMAE
from fcmae.visualize import save_grid


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
    from convnextv2.checkpoint import load_file
    from fcmae.data.decode import decode_image
    from fcmae.data.transforms import default_stats, eval_transform
    from fcmae.engine.config import check_at_least, check_fraction, check_seed, check_writable_file
    from fcmae.export import trained_data
    from fcmae.headers import FCMAE_FORMAT as FORMAT, MODEL_ARGS, check_model_state
    from fcmae.masking import random_mask

    out = Path(args.out)
    if out.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {args.out}: name the picture with an image extension, e.g. {out.stem or 'grid'}.png")
    check_at_least("--size", args.size, 1)
    check_fraction("--mask-ratio", args.mask_ratio)
    check_seed("--seed", args.seed)
    check_writable_file(args.out, "--out")
    ckpt = load_file(args.checkpoint)
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt != FORMAT or not isinstance(ckpt.get("model_args"), dict):
        what = "a fine-tuned classifier" if fmt == "fcmae-finetune" else "not an FCMAE checkpoint"
        raise ValueError(f"{args.checkpoint!r} is {what}; visualize draws reconstructions, which need the FCMAE "
                         "decoder: give a pretraining checkpoint (a `fcmae pretrain` run's last.pt)")
    check_model_state(ckpt.get("model"), FORMAT, ckpt["model_args"], repr(args.checkpoint))  # before any use
    margs = {k: v for k, v in ckpt["model_args"].items() if k in MODEL_ARGS[FORMAT]}
    if args.mask_ratio is not None:
        margs["mask_ratio"] = args.mask_ratio
    data_cfg = trained_data(ckpt, repr(args.checkpoint), margs.get("in_chans", 3))
    trained = data_cfg.get("image_size")
    size = args.size if args.size is not None else (trained if isinstance(trained, int) and trained > 0 else 224)
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
    save_grid(model, x, mask, mean, std, str(out))
    print(f"wrote {args.out} ({len(x)} rows: original | masked | prediction | prediction + visible)")
