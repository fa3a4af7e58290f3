"""Weight layouts of MinkowskiEngine convolutions vs torch's Conv2d (docs/checkpoints.md), as small public functions.

MinkowskiEngine stores a 2-D convolution kernel as (k*k, Cin, Cout) and a depthwise one as (k*k, C). Its kernel
offsets are ordered with the first spatial axis varying fastest:
    kernel[a + k*b, i, o] == W_torch[o, i, a, b]      (a = row offset, b = column offset)
    dw_kernel[a + k*b, c] == W_torch[c, 0, a, b]
(the reference repo's own sparse -> dense remap uses exactly this order). Biases are (1, C).
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def _side(volume: int) -> int:
    k = math.isqrt(volume)
    if k * k != volume:
        raise ValueError(f"kernel volume {volume} is not a square k*k; not a 2-D Minkowski kernel")
    return k


def timm_dw_to_minkowski(weight: torch.Tensor) -> torch.Tensor:
    """Depthwise Conv2d weight (C, 1, k, k) -> Minkowski depthwise kernel (k*k, C)."""
    if weight.ndim != 4 or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"expected a depthwise weight (C, 1, k, k), got {tuple(weight.shape)}")
    c, _, k, _ = weight.shape
    return weight[:, 0].permute(2, 1, 0).reshape(k * k, c).contiguous()  # (b, a, c): offset a + k*b


def minkowski_dw_to_timm(kernel: torch.Tensor) -> torch.Tensor:
    """Minkowski depthwise kernel (k*k, C) -> depthwise Conv2d weight (C, 1, k, k)."""
    if kernel.ndim != 2:
        raise ValueError(f"expected a Minkowski depthwise kernel (k*k, C), got {tuple(kernel.shape)}")
    vol, c = kernel.shape
    k = _side(vol)
    return kernel.reshape(k, k, c).permute(2, 1, 0).unsqueeze(1).contiguous()


def timm_conv_to_minkowski(weight: torch.Tensor) -> torch.Tensor:
    """Conv2d weight (Cout, Cin, k, k) -> Minkowski kernel (k*k, Cin, Cout)."""
    if weight.ndim != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"expected a square Conv2d weight (Cout, Cin, k, k), got {tuple(weight.shape)}")
    co, ci, k, _ = weight.shape
    return weight.permute(3, 2, 1, 0).reshape(k * k, ci, co).contiguous()


def minkowski_conv_to_timm(kernel: torch.Tensor) -> torch.Tensor:
    """Minkowski kernel (k*k, Cin, Cout) -> Conv2d weight (Cout, Cin, k, k)."""
    if kernel.ndim != 3:
        raise ValueError(f"expected a Minkowski kernel (k*k, Cin, Cout), got {tuple(kernel.shape)}")
    vol, ci, co = kernel.shape
    k = _side(vol)
    return kernel.reshape(k, k, ci, co).permute(3, 2, 1, 0).contiguous()


def timm_bias_to_minkowski(bias: torch.Tensor) -> torch.Tensor:
    """(C,) -> (1, C), the shape of Minkowski convolution biases and sparse GRN parameters."""
    return bias.reshape(1, -1).contiguous()


def minkowski_bias_to_timm(bias: torch.Tensor) -> torch.Tensor:
    """(1, C) -> (C,). ValueError for any other shape: a reshape would hide a wrong one."""
    if bias.ndim != 2 or bias.shape[0] != 1:
        raise ValueError(f"expected a Minkowski bias (1, C), got {tuple(bias.shape)}")
    return bias.reshape(-1).contiguous()


def grn_to_timm(param: torch.Tensor) -> torch.Tensor:
    """A dense GRN gamma / beta (1, 1, 1, C) (the reference repo's and Hugging Face's) -> timm's (C,). ValueError
    for any other shape: a reshape would hide a wrong one."""
    if param.ndim != 4 or tuple(param.shape[:3]) != (1, 1, 1):
        raise ValueError(f"expected a GRN parameter (1, 1, 1, C), got {tuple(param.shape)}")
    return param.reshape(-1)


def convert_tensor(key: str, convert: Callable[[torch.Tensor], torch.Tensor], tensor: torch.Tensor) -> torch.Tensor:
    """convert(tensor), its ValueError naming `key` (the file's own name for the tensor)."""
    try:
        return convert(tensor)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None
