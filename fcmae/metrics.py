"""Classification metrics accumulated over an evaluation pass (top-k, per-class accuracy)."""
from __future__ import annotations

import torch


class ClassificationMeter:
    """Accumulates logits (N, K) and targets (N,) batch by batch; all counts, so summing across ranks is exact."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.correct_top1 = torch.zeros(num_classes, dtype=torch.long, device=device)
        self.correct_top5 = torch.zeros(num_classes, dtype=torch.long, device=device)
        self.total = torch.zeros(num_classes, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        k = min(5, self.num_classes)
        topk = logits.topk(k, dim=1).indices  # (N, k)
        hit = topk == target.unsqueeze(1)
        self.correct_top1.index_add_(0, target, hit[:, 0].long())
        self.correct_top5.index_add_(0, target, hit.any(1).long())
        self.total.index_add_(0, target, torch.ones_like(target))

    def all_reduce(self) -> None:
        """Sum the counts over torch.distributed ranks (a no-op without an initialised process group)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for t in (self.correct_top1, self.correct_top5, self.total):
                torch.distributed.all_reduce(t)

    def summary(self) -> dict[str, float]:
        n = self.total.sum().clamp_min(1).item()
        return {"top1": 100.0 * self.correct_top1.sum().item() / n, "top5": 100.0 * self.correct_top5.sum().item() / n,
                "count": int(self.total.sum().item())}

    def per_class(self) -> list[tuple[int, int, float]]:
        """(class index, number of samples, top-1 accuracy in %) for every class with samples."""
        return [(c, int(t), 100.0 * int(h) / int(t)) for c, (h, t) in enumerate(zip(self.correct_top1, self.total)) if t > 0]
