"""`masked`: the reference semantics (docs/method.md, "The sparse encoder") with dense ops and re-masking. Simplest, slowest, the oracle.

Submanifold sparse convolution equals dense convolution on a grid that is zero at masked positions, kept only at
visible positions. Everything else in a ConvNeXt V2 block is per position except GRN, whose spatial L2 norm must
see only visible positions: zeroing masked positions before it gives exactly that.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.convnext import ConvNeXt, ConvNeXtBlock

from convnextv2.backends import register_backend


def upsample_keep(keep: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 1, h, w) 0/1 map of visible patches -> (N, 1, *size) by repeating each patch (size a multiple of h, w)."""
    return F.interpolate(keep, size=size, mode="nearest")


def masked_block(block: ConvNeXtBlock, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """One ConvNeXt V2 block on x (N, C, h, w) that is zero where keep (N, 1, h, w) is 0; the output is too."""
    shortcut = x
    x = block.conv_dw(x)
    mlp = block.mlp
    if block.use_conv_mlp:
        x = mlp.act(mlp.fc1(block.norm(x)))
        x = mlp.grn(x * keep)
        x = mlp.fc2(x)
    else:
        keep_cl = keep.permute(0, 2, 3, 1)
        x = mlp.act(mlp.fc1(block.norm(x.permute(0, 2, 3, 1))))
        x = mlp.grn(x * keep_cl)
        x = mlp.fc2(x).permute(0, 3, 1, 2)
    if block.gamma is not None:
        x = x * block.gamma.reshape(1, -1, 1, 1)
    return (block.drop_path(x) + block.shortcut(shortcut)) * keep


@register_backend("masked")
def masked_forward(encoder: ConvNeXt, x: torch.Tensor, mask: torch.Tensor, visible: torch.Tensor | None = None
                   ) -> torch.Tensor:
    x = encoder.stem(x)
    # keep in the activations' dtype (bf16 under autocast): an fp32 keep would promote every `x * keep` and with it
    # the residual stream and GRN to fp32, i.e. ~1.3x the memory traffic of the dense model it is compared with.
    keep = (1 - mask).unsqueeze(1).to(x.dtype)  # (N, 1, H/p, W/p)
    x = x * upsample_keep(keep, x.shape[-2:])
    for stage in encoder.stages:
        x = stage.downsample(x)
        keep_s = upsample_keep(keep, x.shape[-2:]).to(x.dtype)
        x = x * keep_s
        for block in stage.blocks:
            x = masked_block(block, x, keep_s)
    return x
