"""Map-style image sets: an ImageFolder tree (class subfolders) or a flat/recursive folder of unlabeled images."""
from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset

from fcmae.data.decode import IMAGE_EXTENSIONS, decode_image
from fcmae.data.transforms import load_sample
from fcmae.engine.seeds import derive_seed


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(root: str) -> list[str]:
    """Every image file under `root`, recursively, in a stable (sorted) order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if is_image(f))
    return out


def is_imagefolder(root: str) -> bool:
    """True for torchvision's layout: only class subfolders (no images) at the top level."""
    entries = os.listdir(root)
    has_dirs = any(os.path.isdir(os.path.join(root, e)) for e in entries)
    return has_dirs and not any(is_image(e) for e in entries)


def imagefolder_samples(root: str) -> tuple[list[str], list[int], list[str]]:
    """(files, labels, class names) for an ImageFolder tree; classes are the sorted subfolder names."""
    classes = sorted(e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e)))
    files, labels = [], []
    for label, cls in enumerate(classes):
        found = list_images(os.path.join(root, cls))
        files += found
        labels += [label] * len(found)
    return files, labels, classes


class ImageFiles(Dataset):
    """Images from a list of files; item i -> (image (C, H, W), label, failures).

    An unreadable file is replaced by the next readable one (so batches keep their size and every process runs the
    same number of steps) and counted in `failures`, which the training loop sums into the `skipped` metric.
    The augmentation of item i is seeded by (seed, epoch, i): see `transforms.seeded_call`. The transform gets the
    file itself when it decodes (crop-first decoding, `transforms.load_sample`), else the decoded image.
    """

    def __init__(self, files: list[str], transform, in_chans: int, labels: list[int] | None = None, seed: int = 0):
        if not files:
            raise ValueError("no image files found; check data.path (extensions: " + " ".join(IMAGE_EXTENSIONS) + ")")
        self.files, self.labels = files, labels
        self.transform, self.in_chans, self.seed = transform, in_chans, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int, warn: bool = True):
        """Image i fully decoded (mode-converted), or None (a warning names the file, if `warn`)."""
        return decode_image(self.files[i], self.in_chans, warn=warn)

    def source(self, i: int):
        """What the transform decodes for item i: the file path (subclasses: an in-memory PIL image)."""
        return self.files[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        for failures in range(len(self.files)):
            j = (i + failures) % len(self.files)
            x = load_sample(self.transform, self.source(j), self.in_chans, derive_seed(self.seed, self.epoch, i))
            if x is not None:
                return x, (self.labels[j] if self.labels else -1), failures
        raise RuntimeError(f"none of the {len(self.files)} images could be decoded")

    def check_readable(self) -> None:
        """ValueError unless at least one image decodes (tries files in order, stops at the first good one)."""
        for i in range(len(self.files)):
            if self.load(i, warn=False) is not None:  # the files skipped here are reported when training reads them
                return
        raise ValueError(f"none of the {len(self.files)} image files could be decoded (all corrupt or not images)")
