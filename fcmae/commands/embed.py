"""`fcmae embed FOLDER --checkpoint CKPT --out emb.safetensors`: pooled embeddings of a folder of images
(fcmae.embed says what the vector is and what the files hold)."""
from __future__ import annotations

import argparse
import os
from typing import Any

from fcmae.data.image_list import ImageList
from fcmae.embed import check_out, embed_files, list_path, write_embeddings


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "embed", help="pooled embeddings of a folder of images from any checkpoint",
        description="One embedding per image of FOLDER (recursive, as pretraining finds images), from the encoder of "
        "CKPT (any checkpoint fcmae reads): the last stage, globally average-pooled, before the head (the features of "
        "the kNN probe), float32. Writes --out (.safetensors with tensor 'embeddings', or .npy), rows in the order "
        "of the file list written next to it (OUT without suffix + .files.json: 'files' relative to FOLDER, "
        "'skipped' = unreadable files, left out). Images: resize the short side to --image-size / --crop-pct, "
        "center crop --image-size, normalise with the checkpoint run's data.mean/std (default ImageNet's). "
        "Example: fcmae embed /data/photos --checkpoint runs/pre/last.pt --out photos.safetensors --normalize",
    )
    p.add_argument("folder", help="folder of images (searched recursively)")
    p.add_argument("--checkpoint", required=True, help="checkpoint file (FCMAE run, fine-tune, timm, HF, reference)")
    p.add_argument("--out", required=True, help="output file: *.safetensors or *.npy")
    p.add_argument("--image-size", type=int, default=224,
                   help="crop side in px, a multiple of the checkpoint's patch size (32, or 16 / 8; default 224)")
    p.add_argument("--crop-pct", type=float, default=1.0,
                   help="resize the short side to image_size / crop_pct before the center crop (default 1.0)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward (default 64)")
    p.add_argument("--num-workers", type=int, default=4, help="DataLoader workers decoding images (default 4)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when present")
    p.add_argument("--normalize", action="store_true", help="L2-normalise each embedding (default: raw)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from convnextv2.checkpoint import load_file
    from fcmae.data.folder import list_images
    from fcmae.data.labeled import eval_transform
    from fcmae.data.transforms import default_stats
    from fcmae.engine.distributed import pick_device
    from fcmae.export import trained_data
    from fcmae.finetune import encoder_from_checkpoint

    # every check before the model runs: output, options, folder, images, checkpoint
    out = check_out(args.out)
    if not 0 < args.crop_pct <= 1 or args.batch_size < 1 or args.num_workers < 0:
        raise ValueError("--crop-pct must be in (0, 1], --batch-size >= 1 and --num-workers >= 0")
    if not os.path.isdir(args.folder):
        raise ValueError(f"folder {args.folder!r} does not exist (or is not a folder)")
    files = list_images(args.folder)
    if not files:
        from fcmae.data.decode import IMAGE_EXTENSIONS
        raise ValueError(f"no image files under {args.folder!r} (extensions: {' '.join(IMAGE_EXTENSIONS)})")
    if not os.path.isfile(args.checkpoint):
        raise ValueError(f"checkpoint {args.checkpoint!r} is not a file")
    raw = load_file(args.checkpoint)
    encoder, weights = encoder_from_checkpoint(raw, args.checkpoint)
    p = weights.arch.patch_size  # the encoder's total stride: 32, or 16 / 8 for a smaller stem
    if args.image_size < p or args.image_size % p:
        raise ValueError(f"--image-size {args.image_size} must be a positive multiple of {p}, the checkpoint's patch "
                         f"size (e.g. {max(p, args.image_size // p * p)})")
    device = pick_device(args.device, 0)
    in_chans = weights.arch.in_chans
    run_data = trained_data(raw, args.checkpoint, in_chans)
    d_mean, d_std = default_stats(in_chans)
    mean = run_data.get("mean") or d_mean
    std = run_data.get("std") or d_std
    tf = eval_transform(args.image_size, args.crop_pct, mean, std, in_chans)

    dataset = ImageList(files, tf, in_chans, args.image_size)
    emb, kept = embed_files(encoder.to(device), dataset, args.batch_size, args.num_workers, device, args.normalize,
                            progress=not args.no_progress)
    rel = [os.path.relpath(f, args.folder) for f in files]
    skipped = [rel[i] for i in sorted(set(range(len(files))) - set(kept))]
    if not kept:
        raise ValueError(f"none of the {len(files)} image files under {args.folder!r} could be decoded")
    meta = {"folder": os.path.abspath(args.folder), "checkpoint": os.path.abspath(args.checkpoint),
            "model": weights.arch.name, "dim": int(emb.shape[1]), "normalized": bool(args.normalize),
            "image_size": args.image_size, "crop_pct": args.crop_pct,
            "features": "forward_features(x).mean((H, W)): last stage, global average pool, before the head",
            "files": [rel[i] for i in kept], "skipped": skipped}
    write_embeddings(out, emb, meta)
    print(f"fcmae embed: {len(kept)} images -> {out} ({tuple(emb.shape)} float32"
          f"{', L2-normalised' if args.normalize else ''}), file list {list_path(out)}"
          + (f"; {len(skipped)} unreadable skipped (listed there)" if skipped else ""))
    return {"embeddings": str(out), "files": str(list_path(out)), "count": len(kept), "skipped": len(skipped)}
