"""`minkowski`: the reference code's sparse library (MinkowskiEngine 0.5.4) over the same timm weights.

An independent sparse-convolution implementation to check the other backends against, and a compatibility path for
users of the reference code; not the fast path (its CPU depthwise conv is a Python loop over the 49 offsets).
Install the library with `make minkowski`; nothing else in the toolkit needs it, so it is imported lazily.

How the timm ConvNeXt V2 maps onto MinkowskiEngine (ME), as in the reference `SparseConvNeXtV2`:
- stem: timm's dense conv 4x4/4 + LayerNorm on the full image, then a sparse tensor of the visible positions;
- depthwise 7x7: `MinkowskiChannelwiseConvolution`, downsample 2x2/2: `MinkowskiConvolution`; their kernels are
  computed on every call from the timm weights (`depthwise_kernel`, `conv_kernel`), so gradients reach timm's
  parameters through ME's own autograd functions;
- LayerNorm, MLP, GELU on the features; GRN per sample over that sample's points (docs/method.md, departure 1: not per batch);
- densify to (N, C, H/p, W/p) with the shape given explicitly (docs/method.md, departure 4).
`reference_sparse_state_dict` exports exactly these kernels in the reference's sparse checkpoint layout (docs/checkpoints.md).
"""
from __future__ import annotations

import warnings
from types import ModuleType

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models.convnext import ConvNeXt, ConvNeXtBlock
from torch import nn
from torch.func import functional_call

from convnextv2.backends import register_backend

INSTALL_HINT = "build and install it with `make minkowski` (see README, section MinkowskiEngine)"


def import_minkowski() -> ModuleType:
    """MinkowskiEngine, or an ImportError that says how to install it."""
    try:
        with warnings.catch_warnings():  # a CPU-only build warns on import; CPU is the expected build here
            warnings.filterwarnings("ignore", message="The MinkowskiEngine was compiled with CPU_ONLY")
            import MinkowskiEngine as ME
    except ImportError as e:  # also a build made for another torch (undefined symbols surface as ImportError)
        raise ImportError(f"backend 'minkowski' needs MinkowskiEngine 0.5.4, which does not import here ({e}); "
                          f"{INSTALL_HINT}") from e
    return ME


# ---- kernels in ME's layout: offsets enumerate the first spatial axis (rows) fastest -------------------------------

def depthwise_kernel(conv: nn.Conv2d) -> torch.Tensor:
    """timm depthwise conv weight (C, 1, k, k) -> ME channelwise kernel (k*k, C), kernel[a + k*b, c] = W[c, 0, a, b]."""
    w = conv.weight
    if conv.groups != w.shape[0] or w.shape[1] != 1 or conv.stride != (1, 1) or conv.dilation != (1, 1):
        raise ValueError(f"expected a depthwise stride-1 conv, got {conv}")
    k = w.shape[-1]
    return w[:, 0].permute(2, 1, 0).reshape(k * k, w.shape[0])


def conv_kernel(conv: nn.Conv2d) -> torch.Tensor:
    """Dense conv weight (Cout, Cin, k, k) -> ME kernel (k*k, Cin, Cout), kernel[a + k*b, i, o] = W[o, i, a, b]."""
    w = conv.weight
    return w.permute(3, 2, 1, 0).reshape(w.shape[2] * w.shape[3], w.shape[1], w.shape[0])


def bias_row(bias: torch.Tensor) -> torch.Tensor:
    """(C,) -> (1, C), ME's bias shape."""
    return bias.reshape(1, -1)


# ---- the forward ---------------------------------------------------------------------------------------------------

def _with_features(ME: ModuleType, like, features: torch.Tensor):
    """A sparse tensor with `like`'s coordinates (same map key and manager) and new features (rows in like's order)."""
    return ME.SparseTensor(features, coordinate_map_key=like.coordinate_map_key,
                           coordinate_manager=like.coordinate_manager)


def _layer_norm(f: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """timm LayerNorm / LayerNorm2d applied to features (M, C)."""
    return F.layer_norm(f, (f.shape[1],), norm.weight, norm.bias, norm.eps)


def _linear(f: torch.Tensor, fc: nn.Module) -> torch.Tensor:
    """nn.Linear (out, in) or 1x1 nn.Conv2d (out, in, 1, 1) applied to features (M, in)."""
    return F.linear(f, fc.weight.flatten(1), fc.bias)


def _grn(f: torch.Tensor, grn: nn.Module, batch: torch.Tensor, num_samples: int) -> torch.Tensor:
    """timm GlobalResponseNorm on features (M, C) of points from `batch` (M,): the L2 norm is per sample."""
    sq = f.new_zeros(num_samples, f.shape[1]).index_add(0, batch, f * f)
    # sqrt with a zero (not NaN) gradient where a sample's channel is all zero, as torch.norm does.
    nonzero = sq > 0
    gx = torch.where(nonzero, torch.where(nonzero, sq, 1.0).sqrt(), 0.0)
    nx = gx / (gx.mean(dim=1, keepdim=True) + grn.eps)
    return f + grn.bias + grn.weight * (f * nx[batch])


def _drop_path(f: torch.Tensor, drop: nn.Module, batch: torch.Tensor, num_samples: int) -> torch.Tensor:
    """timm DropPath on features: one draw per sample (not per point)."""
    if not isinstance(drop, DropPath) or not drop.training or drop.drop_prob == 0.0:
        return f
    keep_prob = 1 - drop.drop_prob
    keep = f.new_empty(num_samples).bernoulli_(keep_prob)
    if keep_prob > 0.0 and drop.scale_by_keep:
        keep = keep / keep_prob
    return f * keep[batch, None]


def _block(ME: ModuleType, block: ConvNeXtBlock, x, num_samples: int):
    """One ConvNeXt V2 block on sparse tensor x (M, C) -> same coordinates."""
    dw = block.conv_dw
    k = dw.kernel_size[0]
    # ME draws a random init here; functional_call swaps in the timm-derived kernel and bias for this call only.
    conv = ME.MinkowskiChannelwiseConvolution(dw.in_channels, kernel_size=k, bias=True, dimension=2)
    y = functional_call(conv, {"kernel": depthwise_kernel(dw), "bias": bias_row(dw.bias)}, (x,))
    batch = y.C[:, 0].long()
    mlp = block.mlp
    f = _layer_norm(y.F, block.norm)
    f = mlp.drop1(mlp.act(_linear(f, mlp.fc1)))
    f = mlp.drop2(_linear(_grn(f, mlp.grn, batch, num_samples), mlp.fc2))
    if block.gamma is not None:
        f = f * block.gamma
    f = _drop_path(f, block.drop_path, batch, num_samples)
    if not isinstance(block.shortcut, nn.Identity):
        raise ValueError("the minkowski backend supports ConvNeXt blocks with an identity shortcut only")
    return x + _with_features(ME, y, f)  # ME adds by coordinate


def _downsample(ME: ModuleType, downsample: nn.Sequential, x):
    """timm downsample (LayerNorm, conv 2x2/2) on a sparse tensor: outputs at every 2x2 cell with an active input."""
    norm, conv = downsample[0], downsample[1]
    x = _with_features(ME, x, _layer_norm(x.F, norm))
    me_conv = ME.MinkowskiConvolution(conv.in_channels, conv.out_channels, kernel_size=conv.kernel_size[0],
                                      stride=conv.stride[0], bias=True, dimension=2)
    return functional_call(me_conv, {"kernel": conv_kernel(conv), "bias": bias_row(conv.bias)}, (x,))


@register_backend("minkowski")
def minkowski_forward(encoder: ConvNeXt, x: torch.Tensor, mask: torch.Tensor, visible: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """x (N, in_chans, H, W), mask (N, H/p, W/p) 1 = masked -> (N, C_last, H/p, W/p) fp32, zero at masked positions."""
    keep = mask == 0  # (N, h, w)
    if not bool(keep.any()):
        # A convolution on an empty sparse tensor crashes MinkowskiEngine (segfault): refuse before reaching it.
        raise ValueError("the minkowski backend got a batch with no visible patch; keep at least one patch visible")
    ME = import_minkowski()
    if x.device.type != "cpu" and not ME.is_cuda_available():
        raise ValueError(f"this MinkowskiEngine build is CPU-only but the input is on {x.device}; run on CPU or "
                         "rebuild it with CUDA (MINKOWSKI_CUDA=1 make minkowski)")
    n, (h, w) = x.shape[0], keep.shape[1:]
    # ME's kernels are fp32/fp64 only (docs/method.md, departure 3): run this backend without autocast.
    with torch.autocast(x.device.type, enabled=False):
        y = encoder.stem(x if x.dtype in (torch.float32, torch.float64) else x.float())  # dense, full image
        h0, w0 = y.shape[-2:]
        keep0 = keep.repeat_interleave(h0 // h, 1).repeat_interleave(w0 // w, 2)  # (N, h0, w0)
        coords = keep0.nonzero().int().contiguous()  # (M, 3) [batch, row, col], same order as the boolean index
        st = ME.SparseTensor(y.permute(0, 2, 3, 1)[keep0], coordinates=coords)
        for stage in encoder.stages:
            if isinstance(stage.downsample, nn.Sequential):
                st = _downsample(ME, stage.downsample, st)
            for block in stage.blocks:
                st = _block(ME, block, st, n)
        stride = st.tensor_stride[0]
        dense, _, _ = st.dense(shape=torch.Size([n, st.F.shape[1], h0 // stride, w0 // stride]),
                               min_coordinate=torch.zeros(2, dtype=torch.int32), contract_stride=True)
    if dense.shape[-2:] != (h, w):
        raise ValueError(f"expected a ({h}, {w}) output grid, got {tuple(dense.shape[-2:])}: the stem stride times "
                         f"the downsample strides must equal the mask patch size")
    return dense


# ---- export in the reference's sparse layout -----------------------------------------------------------------------

def reference_sparse_state_dict(encoder: ConvNeXt, prefix: str = "encoder.") -> dict[str, torch.Tensor]:
    """The kernels this backend hands ME, keyed as the reference `SparseConvNeXtV2` (docs/checkpoints.md), detached copies.

    Keys (prefix + ...): `downsample_layers.0.{0,1}` dense stem conv and LayerNorm; `downsample_layers.i.0.ln` and
    `downsample_layers.i.1.{kernel (4, Cin, Cout), bias (1, Cout)}`; per block `stages.s.b.dwconv.{kernel (49, C),
    bias (1, C)}`, `.norm.ln`, `.pwconv1.linear` / `.pwconv2.linear` (2-D weights), `.grn.{gamma,beta}` (1, 4C).
    The reference FCMAE checkpoint stores its encoder under `encoder.`; it has no final norm or head (nor does this).
    """
    sd: dict[str, torch.Tensor] = {}

    def put(key: str, t: torch.Tensor) -> None:
        sd[prefix + key] = t.detach().clone()

    stem_conv, stem_norm = encoder.stem[0], encoder.stem[1]
    put("downsample_layers.0.0.weight", stem_conv.weight)
    put("downsample_layers.0.0.bias", stem_conv.bias)
    put("downsample_layers.0.1.weight", stem_norm.weight)
    put("downsample_layers.0.1.bias", stem_norm.bias)
    for s, stage in enumerate(encoder.stages):
        if isinstance(stage.downsample, nn.Sequential):
            norm, conv = stage.downsample[0], stage.downsample[1]
            put(f"downsample_layers.{s}.0.ln.weight", norm.weight)
            put(f"downsample_layers.{s}.0.ln.bias", norm.bias)
            put(f"downsample_layers.{s}.1.kernel", conv_kernel(conv))
            put(f"downsample_layers.{s}.1.bias", bias_row(conv.bias))
        for b, block in enumerate(stage.blocks):
            key = f"stages.{s}.{b}."
            put(key + "dwconv.kernel", depthwise_kernel(block.conv_dw))
            put(key + "dwconv.bias", bias_row(block.conv_dw.bias))
            put(key + "norm.ln.weight", block.norm.weight)
            put(key + "norm.ln.bias", block.norm.bias)
            for ref, fc in (("pwconv1", block.mlp.fc1), ("pwconv2", block.mlp.fc2)):
                put(key + f"{ref}.linear.weight", fc.weight.flatten(1))
                put(key + f"{ref}.linear.bias", fc.bias)
            put(key + "grn.gamma", block.mlp.grn.weight.reshape(1, -1))
            put(key + "grn.beta", block.mlp.grn.bias.reshape(1, -1))
    return sd
