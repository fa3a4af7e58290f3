"""Top-k classes of image files with a classifier checkpoint (the `fcmae predict CKPT PATH... --out FILE` command:
fcmae.commands.predict).

The model, its eval transform and its class names are `fcmae eval`'s (fcmae.evaluate.read_classifier,
classifier_transform), so an image gets the probabilities eval computes for it. Rows follow the PATHs in the order
given, a folder's images in the order pretraining's folder loader walks them (os.walk, sorted per folder); each row
names its file as it opens from where the command ran (PATH itself, or FOLDER/...).

OUT by suffix: `.csv` with timm inference.py's columns (its --results-separate-col layout): filename, index_0 ..
index_{k-1} (class indices), label_0 .. (class names), prob_0 .. (softmax probabilities, descending); `.jsonl`: one
object per image, {"filename", "index": [k], "label": [k], "prob": [k]} (timm's json-records). Unreadable files get
no row: they are listed, one per line, in OUT-without-suffix + `.skipped.txt` (written every run, empty when none).
Both written atomically.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from fcmae.data.image_list import ImageList, map_readable

OUT_SUFFIXES = (".csv", ".jsonl")


def check_out(out: str) -> Path:
    """ValueError unless `out` is a .csv / .jsonl file name in a folder that is, or can be made, writable."""
    from fcmae.engine.config import check_writable_file

    if Path(out).suffix not in OUT_SUFFIXES:
        raise ValueError(f"--out {out!r}: name it *.csv or *.jsonl (the format follows the suffix)")
    check_writable_file(out, "--out")
    return Path(out)


def skipped_path(out: Path) -> Path:
    return out.with_suffix(".skipped.txt")


def list_inputs(paths: list[str]) -> list[str]:
    """The image files PATHs name, in order: a file as given (whatever its suffix: it was named), a folder's images
    recursively (`list_images`: os.walk order, sorted per folder) as FOLDER/...; ValueError for a path that does not
    exist or a folder without images."""
    from fcmae.data.decode import IMAGE_EXTENSIONS
    from fcmae.data.folder import list_images

    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = list_images(path)
            if not found:
                raise ValueError(f"no image files under {path!r} (extensions: {' '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise ValueError(f"{path!r} does not exist; give image files or folders of images")
    return files


def predict_files(model: torch.nn.Module, dataset: ImageList, topk: int, batch_size: int, num_workers: int,
                  device: torch.device, dtype: torch.dtype | None = None, progress: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """-> (top-k softmax probabilities (n_ok, topk) float32, descending; their class indices (n_ok, topk) int64;
    the indices of the readable files, in row order). dtype: the autocast dtype (None: float32), as `fcmae eval`."""
    def forward(imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(imgs)
        prob, index = logits.float().softmax(dim=1).topk(topk, dim=1)
        return prob.cpu(), index.cpu()

    model.eval()
    batches, kept = map_readable(dataset, forward, batch_size, num_workers, device, progress, desc="predict")
    if not batches:
        return torch.zeros(0, topk), torch.zeros(0, topk, dtype=torch.long), kept
    return torch.cat([p for p, _ in batches]), torch.cat([i for _, i in batches]), kept


def prediction_rows(files: list[str], kept: list[int], prob: torch.Tensor, index: torch.Tensor,
                    classes: list[str]) -> list[dict[str, Any]]:
    """One {"filename", "index", "label", "prob"} per readable file, in row order."""
    return [{"filename": files[f], "index": idx, "label": [classes[c] for c in idx], "prob": p}
            for f, idx, p in zip(kept, index.tolist(), prob.tolist())]


def csv_text(rows: list[dict[str, Any]], k: int) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["filename", *(f"{col}_{i}" for col in ("index", "label", "prob") for i in range(k))])
    for r in rows:
        writer.writerow([r["filename"], *r["index"], *r["label"], *r["prob"]])
    return buf.getvalue()


def write_predictions(out: Path, rows: list[dict[str, Any]], k: int, skipped: list[str]) -> None:
    """The rows as CSV or JSONL (by out's suffix) and the skipped list, each written atomically."""
    from convnextv2.checkpoint.io import atomic_write

    if out.suffix == ".csv":
        text = csv_text(rows, k)
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    atomic_write(skipped_path(out), lambda tmp: Path(tmp).write_text("".join(f + "\n" for f in skipped),
                                                                     encoding="utf-8"))
