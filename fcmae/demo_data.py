"""The built-in demo data set: scikit-learn's 1797 real handwritten digits (8x8, shipped inside the package, no
download), upscaled to a size the encoder can mask."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def load_digits(size: int = 64, in_chans: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """-> images (1797, in_chans, size, size) in [0, 1] (grey replicated over channels), labels (1797,) in 0..9."""
    from sklearn.datasets import load_digits as sk_load_digits

    digits = sk_load_digits()
    imgs = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # pixel values are 0..16
    imgs = F.interpolate(imgs, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    return imgs.expand(-1, in_chans, -1, -1).contiguous(), torch.from_numpy(digits.target).long()
