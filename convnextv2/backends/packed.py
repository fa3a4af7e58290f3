"""`packed`: per-position work on the visible positions only, packed into a regular tensor. The fast default.

Every sample has the same number V of visible patches, so at a stage whose resolution is r positions per patch side
the visible positions of a batch are a regular (N, V*r*r, C) tensor of "tokens", ordered (patch, row, col). On
those tokens run, at the visible fraction of the dense cost:
  - the stem (conv k x k / k == a Linear over k*k*in_chans pixels) on the gathered visible image patches,
  - LayerNorm, MLP fc1 -> GELU -> GRN -> fc2, layer scale, drop path, residual,
  - the 2x2/2 downsample (a Linear over 2x2 neighbours, which never leave their patch).
Only the 7x7 depthwise conv needs neighbours: tokens are scattered into a zero-filled (N, H_s, W_s, C) grid (a
channels_last view, which the depthwise conv kernels prefer) and its output gathered back. The scatter/gather
indices are built once per stage and reused by every block. GRN's L2 norm is taken over the token axis, i.e. per
sample over visible positions only (docs/method.md: the sparse encoder; departure 1). Same timm module and weights as `masked`, same numbers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.convnext import ConvNeXt, ConvNeXtBlock
from torch import nn

from convnextv2.backends import register_backend


@torch.compiler.disable  # data-dependent checks and shapes; a graph break here keeps the rest compilable
def visible_patches(mask: torch.Tensor) -> torch.Tensor:
    """mask (N, h, w), 1 = masked, 0 = visible -> (N, V) long, the visible patch indices (row-major) in order.

    ValueError unless the mask is binary and every sample has the same number V of visible patches. The checks and
    the data-dependent V read the mask on the host: call it where the mask is drawn (on the CPU) and pass the result
    to the backend, so that a GPU step never waits for it.
    """
    flat = mask.flatten(1)
    visible = flat == 0
    counts = visible.sum(1)
    lo, hi, non_binary = torch.stack([counts.min(), counts.max(), ((flat != 0) & (flat != 1)).sum()]).tolist()
    if non_binary:
        raise ValueError("the packed backend needs a binary mask (1 = masked, 0 = visible); got other values")
    if lo != hi:
        raise ValueError(
            f"the packed backend needs the same number of visible patches in every sample; got between {lo} and "
            f"{hi}. Draw masks with fcmae.masking.random_mask (a fixed count per sample) or use backend='masked'."
        )
    return visible.nonzero()[:, 1].reshape(mask.shape[0], lo)


def token_index(vis: torch.Tensor, grid: tuple[int, int], r: int) -> torch.Tensor:
    """Rows of the visible tokens in a flattened (N * h*r * w*r) grid at r positions per patch side.

    vis (N, V) visible patch indices on the (h, w) patch grid -> (N*V*r*r,) long, token order (n, patch, row, col).
    """
    n, _ = vis.shape
    h, w = grid
    ar = torch.arange(r, device=vis.device)
    rows = (vis // w)[:, :, None, None] * r + ar[:, None]  # (N, V, r, 1)
    cols = (vis % w)[:, :, None, None] * r + ar[None, :]  # (N, V, 1, r)
    batch = torch.arange(n, device=vis.device)[:, None, None, None] * (h * r)
    return (((batch + rows) * (w * r)) + cols).reshape(-1)


class _Scatter(torch.autograd.Function):
    """(T, C) rows -> (R, C) zeros with the rows at `index` (distinct). Backward: a gather (no scatter-add)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
        ctx.save_for_backward(index)
        return rows.new_zeros(size, rows.shape[1]).index_copy_(0, index, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


class _Gather(torch.autograd.Function):
    """(R, C) -> the (T, C) rows at `index`. Backward: a copy into zeros, not index_select's scatter-add, which is
    several times slower on CPU; valid because the indices are distinct."""

    @staticmethod
    def forward(ctx, grid: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.size = grid.shape[0]
        return grid.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.size, grad.shape[1]).index_copy_(0, index, grad.contiguous()), None


class _DepthwiseConv(torch.autograd.Function):
    """A depthwise conv (stride 1, dilation 1, 'same' zero padding) with a cheaper backward on CPU.

    There aten's depthwise backward costs ~20x the forward, and asking it for the weight gradient alone roughly halves
    that; the input gradient is the forward conv with the kernel flipped, the bias gradient a plain sum
    (bench/cpu_ops.py times both against aten).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        return F.conv2d(x, weight, bias, padding=padding, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        c, p = x.shape[1], ctx.padding
        grad = grad.contiguous(memory_format=torch.channels_last)
        w = weight.to(grad.dtype)  # under autocast the forward ran in grad's dtype
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad, w.flip(2, 3), padding=p, groups=c).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = torch.ops.aten.convolution_backward(
                grad, x.to(grad.dtype), w, None, [1, 1], [p, p], [1, 1], False, [0, 0], c, [False, True, False]
            )[1]
            # in the weight's own strides: aten's come out channels_last, which costs DDP a copy per step and a warning
            grad_w = torch.empty_like(weight).copy_(grad_w)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.permute(0, 2, 3, 1).reshape(-1, c).sum(0, dtype=torch.float32).to(weight.dtype)
        return grad_x, grad_w, grad_b, None


def depthwise_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """timm's conv_dw on x (N, C, H, W): `_DepthwiseConv` on CPU, the module itself elsewhere (cuDNN's backward is
    not the slow one)."""
    k = conv.kernel_size[0]
    plain = (conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == conv.in_channels == conv.out_channels
             and conv.kernel_size == (k, k) and conv.padding == (k // 2, k // 2) and k % 2 == 1
             and conv.padding_mode == "zeros")
    if x.device.type != "cpu" or not plain or not torch.is_grad_enabled():
        return conv(x)
    return _DepthwiseConv.apply(x, conv.weight, conv.bias, k // 2)


def to_grid(tokens: torch.Tensor, index: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """tokens (N, T, C) -> (N, C, H_s, W_s) zero-filled grid (channels_last memory), shape = (N, H_s, W_s)."""
    n, hs, ws = shape
    c = tokens.shape[-1]
    grid = _Scatter.apply(tokens.reshape(-1, c), index, n * hs * ws)
    return grid.view(n, hs, ws, c).permute(0, 3, 1, 2)


def from_grid(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(N, C, H_s, W_s) -> (N, T, C) tokens at `index`; a view plus a row gather when x is channels_last."""
    n, c = x.shape[:2]
    return _Gather.apply(x.permute(0, 2, 3, 1).reshape(-1, c), index).view(n, -1, c)


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear (out, in) or 1x1 nn.Conv2d (out, in, 1, 1) applied to the last dim of x."""
    return F.linear(x, layer.weight.reshape(layer.weight.shape[0], -1), layer.bias)


def layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """timm LayerNorm or LayerNorm2d (both nn.LayerNorm over channels) applied to the last dim of x."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def patch_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A conv with kernel == stride (k) on whole patches: x (B, r, r, C_in) -> (B, r/k, r/k, C_out).

    Each output position sees one k x k cell, so the conv is a Linear over the cell's (row, col, channel) values.
    """
    b, r, _, c = x.shape
    k = conv.stride[0]
    x = x.reshape(b, r // k, k, r // k, k, c).transpose(2, 3).reshape(b, r // k, r // k, k * k * c)
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)  # (out, k, k, in) like x
    return F.linear(x, weight, conv.bias)


class _TokenL2Norm(torch.autograd.Function):
    """x (N, T, C) -> (N, 1, C), the L2 norm over the token axis; fp32 for a bf16 / fp16 x, as autocast runs x.norm.

    The same number as `x.norm(p=2, dim=1, keepdim=True)`, several times faster forward and backward on CPU, where
    `linalg_vector_norm`'s reduction over a middle axis is slow (bench/cpu_ops.py). Backward: x * grad / norm (0
    where the norm is 0, as torch's).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        low = x.dtype in (torch.bfloat16, torch.float16)
        norm = (x * x).sum(1, keepdim=True, dtype=torch.float32 if low else None).sqrt_()
        ctx.save_for_backward(x, norm)
        return norm

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, norm = ctx.saved_tensors
        return x * torch.where(norm > 0, grad / norm, 0).to(x.dtype)


def token_l2_norm(x: torch.Tensor) -> torch.Tensor:
    """x (N, T, C) -> (N, 1, C), the L2 norm over tokens: `_TokenL2Norm` on CPU, x.norm elsewhere (not slow there)."""
    return _TokenL2Norm.apply(x) if x.device.type == "cpu" else x.norm(p=2, dim=1, keepdim=True)


def grn(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm GlobalResponseNorm on tokens x (N, T, C): the L2 norm per sample and channel over the T visible tokens."""
    gx = token_l2_norm(x)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + layer.eps)
    # x + bias + weight * (x * nx) with a single full-size op: the (N, 1, C) factor is cheap to build. Under autocast
    # the norm is fp32; casting the small factors keeps the big output in x's dtype (fc2 would cast it anyway).
    return torch.addcmul(layer.bias.to(x.dtype), x, (1 + layer.weight * nx).to(x.dtype))


def packed_block(block: ConvNeXtBlock, x: torch.Tensor, index: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """One ConvNeXt V2 block on tokens x (N, T, C); `index`, `shape`: where they sit in the (N, H_s, W_s) grid."""
    shortcut = x
    x = from_grid(depthwise_conv(block.conv_dw, to_grid(x, index, shape)), index)
    x = layer_norm(block.norm, x)
    mlp = block.mlp
    x = mlp.drop1(mlp.act(linear(mlp.fc1, x)))
    x = mlp.drop2(linear(mlp.fc2, grn(mlp.grn, x)))
    if block.gamma is not None:
        x = x * block.gamma
    return block.drop_path(x) + shortcut  # ConvNeXt V2 blocks keep their width: timm's shortcut is Identity


@register_backend("packed")
def packed_forward(encoder: ConvNeXt, x: torch.Tensor, mask: torch.Tensor, visible: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """x (N, in_chans, H, W), mask (N, H/p, W/p) 1 = masked -> (N, C_last, H/p, W/p), zero at masked patches.

    visible (N, V): `visible_patches(mask)` on x's device, computed by the caller (no host sync here), or None.
    """
    n, c_in, height, _ = x.shape
    h, w = mask.shape[-2:]
    p = height // h
    vis = visible_patches(mask) if visible is None else visible  # (N, V)
    v = vis.shape[1]
    if v == 0:  # nothing visible: the sparse output is all zeros, as with `masked`
        return x.new_zeros(n, encoder.num_features, h, w)

    # Stem on the visible image patches only: (N, V, p, p, C_in) gathered straight from x (any memory format).
    pix = x.permute(0, 2, 3, 1).reshape(n, h, p, w, p, c_in)
    batch = torch.arange(n, device=x.device)[:, None].expand(n, v)
    pix = pix[batch, vis // w, :, vis % w]  # advanced indices first: (N, V, p, p, C_in)
    t = patch_conv(encoder.stem[0], pix.reshape(n * v, p, p, c_in))  # (N*V, r, r, C)
    t = layer_norm(encoder.stem[1], t)
    r = t.shape[1]

    for stage in encoder.stages:
        if isinstance(stage.downsample, nn.Sequential):  # LN + conv 2x2/2, patch-local
            t = patch_conv(stage.downsample[1], layer_norm(stage.downsample[0], t))
            r = t.shape[1]
        if len(stage.blocks):
            index = token_index(vis, (h, w), r)  # once per stage, reused by its blocks
            shape = (n, h * r, w * r)
            tokens = t.reshape(n, v * r * r, -1)
            for block in stage.blocks:
                tokens = packed_block(block, tokens, index, shape)
            t = tokens.reshape(n * v, r, r, -1)

    # Densify: (N, C_last, H/p, W/p), zero at masked patches, whatever the last stage's r (1 with the standard stem).
    return to_grid(t.reshape(n, v * r * r, -1), token_index(vis, (h, w), r), (n, h * r, w * r))
