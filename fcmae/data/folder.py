"""Map-style image sets: an ImageFolder tree (class subfolders) or a flat/recursive folder of unlabeled images."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset

from fcmae.data.decode import IMAGE_EXTENSIONS, decode_image
from fcmae.data.transforms import load_sample
from fcmae.engine.seeds import derive_seed

log = logging.getLogger(__name__)


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(root: str, visited: set[str] | None = None) -> list[str]:
    """Every image file under `root`, recursively and through links, in os.walk's order (a folder's files sorted,
    then its subfolders sorted), each file once by its real path: a link to a file listed from its own folder is left
    out. A folder reached again through a link (a loop such as `loop -> .`, or a second link to one folder) is not
    walked again: one warning names it. visited: real paths of folders already walked or to be (shared by the
    classes of an ImageFolder), updated."""
    visited = set() if visited is None else visited
    visited.add(os.path.realpath(root))
    out, link_targets = [], set()  # real paths of the linked files listed
    for entry, real_folder in _walk(root, visited):
        if entry.is_symlink():
            target = os.path.realpath(entry.path)
            in_a_listed_folder = (os.path.dirname(target) in visited and is_image(os.path.basename(target))
                                  and os.path.isfile(target))
            if in_a_listed_folder or target in link_targets:
                continue
            link_targets.add(target)
        elif os.path.join(real_folder, entry.name) in link_targets:  # listed already, through a link
            continue
        out.append(entry.path)
    return out


def _walk(folder: str, visited: set[str]) -> Iterator[tuple[os.DirEntry, str]]:
    """(entry, real path of its folder) of each image file under `folder`; its subfolders whose real path is in
    `visited` are skipped with a warning, the others added to it (all of a folder's before walking any of them, so a
    link inside one to its sibling yields to the sibling). Unreadable folders are skipped, as os.walk does."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        return
    real_folder, subfolders = os.path.realpath(folder), []
    for entry in entries:
        if _is_dir(entry):
            real = os.path.realpath(entry.path)
            if real in visited:
                log.warning("%s leads back to %s, a folder already listed (a link loop, or a second link to it): "
                            "its images are counted once", entry.path, real)
                continue
            visited.add(real)
            subfolders.append(entry.path)
        elif is_image(entry.name):
            yield entry, real_folder
    for sub in subfolders:
        yield from _walk(sub, visited)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links
    except OSError:
        return False


def is_imagefolder(root: str) -> bool:
    """True for torchvision's layout: only class subfolders (no images) at the top level."""
    entries = os.listdir(root)
    has_dirs = any(os.path.isdir(os.path.join(root, e)) for e in entries)
    return has_dirs and not any(is_image(e) for e in entries)


def imagefolder_samples(root: str) -> tuple[list[str], list[int], list[str]]:
    """(files, labels, class names) for an ImageFolder tree; classes are the sorted subfolder names. A class folder
    that is a link to the root or to another class is left out with a warning; every image counts once (see
    `list_images`), in the first class that holds it."""
    visited, classes = {os.path.realpath(root)}, []
    for name in sorted(e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e))):
        real = os.path.realpath(os.path.join(root, name))
        if real in visited:
            log.warning("class folder %s leads back to %s (the root or another class): left out",
                        os.path.join(root, name), real)
            continue
        visited.add(real)
        classes.append(name)
    files, labels = [], []
    for label, cls in enumerate(classes):
        found = list_images(os.path.join(root, cls), visited)
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
