"""Inference over a list of image files (`fcmae embed`, `fcmae predict`): every file decoded as in pretraining (any
mode, the checkpoint's channel count), batched in file order; an unreadable file is left out, not fatal."""
from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset

T = TypeVar("T")


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


@torch.no_grad()
def map_readable(dataset: ImageList, forward: Callable[[torch.Tensor], T], batch_size: int, num_workers: int,
                 device: torch.device, progress: bool = True, desc: str = "images") -> tuple[list[T], list[int]]:
    """forward(the readable images of a batch, (n, C, H, W) on `device`) for every batch, in file order, under a tqdm
    bar -> (what it returned, per batch; the indices of the readable files, in row order)."""
    from tqdm import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    results, kept, seen = [], [], 0
    with tqdm(total=len(dataset), desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for imgs, ok in loader:
            idx = torch.arange(seen, seen + len(ok))[ok]
            seen += len(ok)
            if ok.any():
                results.append(forward(imgs[ok].to(device, non_blocking=True)))
                kept += idx.tolist()
            bar.update(len(ok))
    return results, kept
