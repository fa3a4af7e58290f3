"""Pooled embeddings of a folder of images (the `fcmae embed FOLDER --checkpoint CKPT --out emb.safetensors`
command: fcmae.commands.embed).

As lightly's `embed`: one vector per image, for retrieval, clustering or duplicate search. The vector is the one the
kNN probe uses (fcmae.knn.pooled_features): the encoder's last stage, globally average-pooled, before timm's head
(so not `forward_head(pre_logits=True)`, which adds head.norm: untrained in FCMAE pretraining). Raw by default;
`--normalize` L2-normalises it (cosine similarity becomes a dot product).

Writes PATH (.safetensors: tensor `embeddings`; .npy: the array), (N, D) float32, and PATH-without-suffix +
`.files.json`: the files in row order (relative to FOLDER) and the unreadable ones left out. Both atomically.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from fcmae.data.image_list import ImageList, map_readable

OUT_SUFFIXES = (".safetensors", ".npy")


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


def embed_files(encoder: torch.nn.Module, dataset: ImageList, batch_size: int, num_workers: int,
                device: torch.device, normalize: bool = False, progress: bool = True) -> tuple[torch.Tensor, list[int]]:
    """-> (embeddings (n_ok, D) float32 on CPU, indices of the readable files in row order)."""
    from fcmae.knn import pooled_features

    def forward(imgs: torch.Tensor) -> torch.Tensor:
        f = pooled_features(encoder, imgs)
        return (torch.nn.functional.normalize(f, dim=1) if normalize else f).cpu()

    encoder.eval()
    feats, kept = map_readable(dataset, forward, batch_size, num_workers, device, progress, desc="embed")
    return (torch.cat(feats) if feats else torch.zeros(0, encoder.num_features)), kept


def write_embeddings(out: Path, emb: torch.Tensor, meta: dict[str, Any]) -> None:
    """The (N, D) float32 array (safetensors or .npy by suffix) and the file list, both or neither: the list goes to a
    temp file, the array is written atomically, then the list replaces its file. A failed write (a full disk) raises
    a WriteError naming the file and leaves both files as they were."""
    from convnextv2.checkpoint.io import atomic_write

    emb = emb.float().contiguous()
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        info = {"checkpoint": str(meta["checkpoint"]), "normalized": str(meta["normalized"]).lower(),
                "image_size": str(meta["image_size"]), "files": list_path(out).name}

        def save_array(tmp: str) -> None:
            save_file({"embeddings": emb}, tmp, metadata=info)
    else:
        import numpy as np

        def save_array(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a name
                np.save(f, emb.numpy())

    def save_both(list_tmp: str) -> None:
        Path(list_tmp).write_text(json.dumps(meta, indent=1) + "\n")
        atomic_write(out, save_array)
    atomic_write(list_path(out), save_both)
