"""The kNN probe of docs/method.md (the usual SSL protocol, as in DINO and lightly) on frozen encoder features.

features: the encoder's globally average-pooled last stage, `forward_features(x).mean((H, W))` (before timm's head,
    so before head.norm, which FCMAE pretraining never trains), L2-normalised;
vote: each val image's k = 20 most cosine-similar train images vote for their class with weight exp(sim / T),
    T = 0.07; the prediction is the class with the largest summed vote (ties: the lowest class index).

Nothing here draws random numbers, so the probe can run inside a training run without changing what it computes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

K, TEMPERATURE = 20, 0.07


def pooled_features(encoder: nn.Module, imgs: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images -> (N, D) float32: global average pool of a timm ConvNeXt's last stage (before the head)."""
    return encoder.forward_features(imgs).float().mean(dim=(-2, -1))


@torch.no_grad()
def extract_features(encoder: nn.Module, loader, device: torch.device, dtype: torch.dtype | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Pooled features of every batch (images, labels, failures) of `loader` -> (feats (N, D) float32 on CPU, labels
    (N,), skipped). Items whose own image was unreadable (failures > 0: `ImageFiles` stood in the next readable
    image) are left out and counted. The encoder is put back in its previous mode."""
    was_training = encoder.training
    encoder.eval()
    feats, labels, skipped = [], [], 0
    try:
        for batch in loader:
            imgs, target, failures = batch[0], batch[1], batch[2]
            keep = failures == 0
            skipped += int((~keep).sum())
            if not keep.any():
                continue
            imgs = imgs[keep].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                feats.append(pooled_features(encoder, imgs).cpu())
            labels.append(target[keep].long())
    finally:
        encoder.train(was_training)
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), skipped
    return torch.cat(feats), torch.cat(labels), skipped


@torch.no_grad()
def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor, num_classes: int,
               k: int = K, temperature: float = TEMPERATURE, chunk: int = 1024) -> torch.Tensor:
    """Summed weighted votes (M, num_classes) for val_feats (M, D) from train_feats (N, D) with labels (N,).

    Features are L2-normalised here (cosine similarity); the (M, N) similarity matrix is built `chunk` val rows at a
    time, so memory is chunk x N. k is capped at N.
    """
    if train_feats.ndim != 2 or val_feats.ndim != 2 or train_feats.shape[1] != val_feats.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D) with the same D, got {tuple(train_feats.shape)} and "
                         f"{tuple(val_feats.shape)}")
    if len(train_feats) != len(train_labels) or len(train_feats) == 0:
        raise ValueError(f"need one label per train feature and at least one, got {len(train_feats)} features, "
                         f"{len(train_labels)} labels")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and the temperature > 0, got k={k}, T={temperature}")
    train = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.to(train.device).long()
    k = min(k, len(train))
    out = []
    for start in range(0, len(val_feats), chunk):
        val = F.normalize(val_feats[start:start + chunk].float().to(train.device), dim=1)
        sim, idx = (val @ train.T).topk(k, dim=1)  # (c, k) each
        votes = torch.zeros(len(val), num_classes, device=train.device)
        out.append(votes.scatter_add_(1, labels[idx], (sim / temperature).exp()))
    return torch.cat(out) if out else torch.zeros(0, num_classes, device=train.device)


def knn_top1(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
             val_labels: torch.Tensor, num_classes: int, k: int = K, temperature: float = TEMPERATURE,
             chunk: int = 1024) -> float:
    """Top-1 accuracy in percent of the weighted kNN vote (see `knn_scores`); ties go to the lowest class index."""
    if len(val_feats) == 0:
        raise ValueError("no val features to classify")
    scores = knn_scores(train_feats, train_labels, val_feats, num_classes, k, temperature, chunk)
    correct = int((first_argmax(scores).cpu() == val_labels.cpu().long()).sum())
    return 100.0 * correct / len(val_feats)


def first_argmax(scores: torch.Tensor) -> torch.Tensor:
    """argmax over dim 1 that returns the lowest index among equal maxima (torch.argmax does not promise which)."""
    best = scores.max(dim=1, keepdim=True).values
    index = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    return torch.where(scores == best, index, scores.shape[1]).min(dim=1).values


@dataclass
class ProbeResult:
    top1: float
    train_images: int
    val_images: int
    skipped: int
    seconds: float

    def metrics(self, prefix: str = "knn_") -> dict[str, float]:
        return {f"{prefix}top1": self.top1}

    def describe(self) -> str:
        return (f"kNN top-1 {self.top1:.2f} ({self.train_images} train / {self.val_images} val images"
                + (f", {self.skipped} unreadable skipped" if self.skipped else "") + f", {self.seconds:.1f}s)")


def probe_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    """In order, no shuffling; its own generator, so iterating it never draws from torch's global RNG."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=device.type == "cuda", generator=torch.Generator())


def knn_probe(encoder: nn.Module, train: Dataset, val: Dataset, num_classes: int, device: torch.device,
              batch_size: int = 256, num_workers: int = 0, dtype: torch.dtype | None = None, k: int = K,
              temperature: float = TEMPERATURE) -> ProbeResult:
    """Features of the train and val sets (eval transforms: both must give (image, label, failures)) -> kNN top-1.

    Runs with torch's CPU (and current CUDA device's) RNG state saved and restored, so a training run that calls it
    draws the same random numbers afterwards as without it.
    """
    t0 = time.time()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        tr, tr_labels, tr_skip = extract_features(
            encoder, probe_loader(train, batch_size, num_workers, device), device, dtype)
        va, va_labels, va_skip = extract_features(
            encoder, probe_loader(val, batch_size, num_workers, device), device, dtype)
    if len(tr) == 0 or len(va) == 0:
        raise ValueError("the kNN probe's train or val split has no readable image")
    check_neighbours(k, len(tr), "readable ")
    top1 = knn_top1(tr.to(device), tr_labels, va.to(device), va_labels, num_classes, k, temperature)
    return ProbeResult(top1, len(tr), len(va), tr_skip + va_skip, time.time() - t0)


def check_neighbours(k: int, reference: int, what: str = "", key: str = "k") -> None:
    """ValueError when k neighbours cannot be found among `reference` train images (every one would vote, whatever
    its distance: not the probe's protocol)."""
    if k > reference:
        raise ValueError(f"{key}={k} is more neighbours than the {reference} {what}reference (train) images; lower "
                         f"{key} (at most {reference}; 20 is usual) or give more labeled images")


def probe_splits(data_cfg, in_chans: int):
    """The labeled splits of a `data` section (FinetuneDataConfig keys) for the probe: train AND val with the eval
    transform (resize to image_size / crop_pct, center crop), no augmentation -> `fcmae.data.labeled.Splits`."""
    from fcmae.data.labeled import build_splits

    splits = build_splits(data_cfg, 0, train=False, in_chans=in_chans)
    splits.train.transform = splits.val.transform
    return splits
