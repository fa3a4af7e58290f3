"""`fcmae embed FOLDER --checkpoint CKPT --out emb.safetensors`: pooled embeddings of a folder of images.

As lightly's `embed`: one vector per image, for retrieval, clustering or duplicate search. The vector is the one the
kNN probe uses (fcmae.knn.pooled_features): the encoder's last stage, globally average-pooled, before timm's head
(so not `forward_head(pre_logits=True)`, which adds head.norm: untrained in FCMAE pretraining). Raw by default;
`--normalize` L2-normalises it (cosine similarity becomes a dot product).

Writes PATH (.safetensors: tensor `embeddings`; .npy: the array), (N, D) float32, and PATH-without-suffix +
`.files.json`: the files in row order (relative to FOLDER) and the unreadable ones left out. Both atomically.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

OUT_SUFFIXES = (".safetensors", ".npy")


class ImageList(Dataset):
    """Files -> (image (C, H, W), ok): an unreadable file gives zeros and ok=False (left out of the output)."""

    def __init__(self, files: list[str], transform, in_chans: int, size: int):
        self.files, self.transform, self.in_chans, self.size = files, transform, in_chans, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        from fcmae.data.decode import decode_image

        img = decode_image(self.files[i], self.in_chans)
        if img is None:
            return torch.zeros(self.in_chans, self.size, self.size), False
        return self.transform(img), True


def check_out(out: str) -> Path:
    """ValueError unless `out` is a .safetensors/.npy path in a writable folder (created if missing)."""
    path = Path(out)
    if path.suffix not in OUT_SUFFIXES:
        raise ValueError(f"--out {out!r}: name it *.safetensors or *.npy")
    if path.is_dir():
        raise ValueError(f"--out {out!r} is a folder; give a file name such as {os.path.join(out, 'emb.safetensors')}")
    parent = path.parent if str(path.parent) else Path(".")
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out!r}: cannot write in {str(existing)!r} (not a writable folder)")
    return path


def list_path(out: Path) -> Path:
    return out.with_suffix(".files.json")


@torch.no_grad()
def embed_files(encoder: torch.nn.Module, dataset: ImageList, batch_size: int, num_workers: int,
                device: torch.device, normalize: bool = False, progress: bool = True) -> tuple[torch.Tensor, list[int]]:
    """-> (embeddings (n_ok, D) float32 on CPU, indices of the readable files in row order)."""
    from tqdm import tqdm

    from fcmae.knn import pooled_features

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    encoder.eval()
    feats, kept, seen = [], [], 0
    with tqdm(total=len(dataset), desc="embed", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for imgs, ok in loader:
            idx = torch.arange(seen, seen + len(ok))[ok]
            seen += len(ok)
            if ok.any():
                f = pooled_features(encoder, imgs[ok].to(device, non_blocking=True))
                feats.append((torch.nn.functional.normalize(f, dim=1) if normalize else f).cpu())
                kept += idx.tolist()
            bar.update(len(ok))
    dim = encoder.num_features
    return (torch.cat(feats) if feats else torch.zeros(0, dim)), kept


def write_embeddings(out: Path, emb: torch.Tensor, meta: dict[str, Any]) -> None:
    """The (N, D) float32 array (safetensors or .npy by suffix) and the file list, each written atomically."""
    from convnextv2.checkpoint.io import atomic_write

    emb = emb.float().contiguous()
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        info = {"checkpoint": str(meta["checkpoint"]), "normalized": str(meta["normalized"]).lower(),
                "image_size": str(meta["image_size"]), "files": list_path(out).name}
        atomic_write(out, lambda tmp: save_file({"embeddings": emb}, tmp, metadata=info))
    else:
        import numpy as np

        def save_npy(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a name
                np.save(f, emb.numpy())
        atomic_write(out, save_npy)
    atomic_write(list_path(out), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1) + "\n"))


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
    p.add_argument("--image-size", type=int, default=224, help="crop side in px, a multiple of 32 (default 224)")
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
    from fcmae.finetune import encoder_from_checkpoint

    # every check before the model runs: output, options, folder, images, checkpoint
    out = check_out(args.out)
    if args.image_size < 32 or args.image_size % 32:
        raise ValueError(f"--image-size {args.image_size} must be a positive multiple of 32 (e.g. 224)")
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
    encoder, weights = encoder_from_checkpoint(raw)
    device = pick_device(args.device, 0)
    in_chans = weights.arch.in_chans
    run_data = ((raw.get("config") or {}).get("data") or {}) if isinstance(raw, dict) else {}
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
