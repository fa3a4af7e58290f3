"""The reference repo's MinkowskiEngine sparse layout (`models/convnextv2_sparse.py`) <-> timm keys.

Sparse encoder keys (inside the FCMAE model they carry an `encoder.` prefix, stripped by `detect`):
    downsample_layers.0.0.{weight,bias}       stem nn.Conv2d (dense), (C0, in_chans, 4, 4)
    downsample_layers.0.1.{weight,bias}       stem LayerNorm (channels_first), (C0,)
    downsample_layers.i.0.ln.{weight,bias}    MinkowskiLayerNorm, (C_{i-1},)
    downsample_layers.i.1.kernel / .bias      MinkowskiConvolution 2x2/2, (4, C_{i-1}, C_i) / (1, C_i)
    stages.s.b.dwconv.kernel / .bias          MinkowskiDepthwiseConvolution 7x7, (49, C) / (1, C)
    stages.s.b.norm.ln.{weight,bias}          (C,)
    stages.s.b.pwconv{1,2}.linear.{weight,bias}  nn.Linear inside MinkowskiLinear
    stages.s.b.grn.{gamma,beta}               MinkowskiGRN, (1, 4C)
There is no final norm and no head. Kernel offset order: see `layout`.
"""
from __future__ import annotations

import re

import torch

from convnextv2.checkpoint.layout import (
    convert_tensor, minkowski_bias_to_timm, minkowski_conv_to_timm, minkowski_dw_to_timm, timm_bias_to_minkowski,
    timm_conv_to_minkowski, timm_dw_to_minkowski,
)
from convnextv2.checkpoint.reference import reference_to_timm, timm_to_reference


def minkowski_to_reference(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sparse (Minkowski) encoder state_dict -> reference dense encoder state_dict. ValueError naming the key for a
    kernel, bias or GRN parameter not in its Minkowski layout (reshaping it would hide the wrong shape)."""
    out: dict[str, torch.Tensor] = {}
    for key, v in sd.items():
        k = key.replace(".ln.", ".").replace(".linear.", ".")
        if k.endswith(".kernel"):
            k = k[: -len("kernel")] + "weight"
            v = convert_tensor(key, minkowski_dw_to_timm if v.ndim == 2 else minkowski_conv_to_timm, v)
        elif re.fullmatch(r"(downsample_layers\.\d+\.1|stages\.\d+\.\d+\.dwconv)\.bias", k) and v.ndim != 1:
            v = convert_tensor(key, minkowski_bias_to_timm, v)  # (1, C); a (C,) bias is already timm's
        elif ".grn." in k:
            v = convert_tensor(key, minkowski_bias_to_timm, v).reshape(1, 1, 1, -1)
        out[k] = v
    return out


def reference_to_minkowski(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Reference dense encoder state_dict -> (sparse state_dict, dropped keys: final norm and head)."""
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for k, v in sd.items():
        if k.startswith(("norm.", "head.")):
            dropped.append(k)  # the sparse encoder has neither
        elif k.startswith("downsample_layers.0."):
            out[k] = v  # the stem stays a dense Conv2d + channels_first LayerNorm
        elif m := re.fullmatch(r"(downsample_layers\.\d+)\.0\.(\w+)", k):
            out[f"{m[1]}.0.ln.{m[2]}"] = v
        elif m := re.fullmatch(r"(downsample_layers\.\d+\.1)\.(\w+)", k):
            out[f"{m[1]}.kernel" if m[2] == "weight" else k] = (
                timm_conv_to_minkowski(v) if m[2] == "weight" else timm_bias_to_minkowski(v)
            )
        elif m := re.fullmatch(r"(stages\.\d+\.\d+)\.(\w+)\.(\w+)", k):
            prefix, module, param = m[1], m[2], m[3]
            if module == "dwconv":
                out[f"{prefix}.dwconv.kernel" if param == "weight" else k] = (
                    timm_dw_to_minkowski(v) if param == "weight" else timm_bias_to_minkowski(v)
                )
            elif module == "norm":
                out[f"{prefix}.norm.ln.{param}"] = v
            elif module in ("pwconv1", "pwconv2"):
                out[f"{prefix}.{module}.linear.{param}"] = v
            elif module == "grn":
                out[k] = timm_bias_to_minkowski(v)
            else:
                raise ValueError(f"reference key {k} has no Minkowski counterpart")
        else:
            raise ValueError(f"reference key {k} has no Minkowski counterpart")
    return out, dropped


def minkowski_to_timm(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Sparse (Minkowski) encoder state_dict -> (timm-keyed state_dict, keys with no timm counterpart)."""
    return reference_to_timm(minkowski_to_reference(sd))


def timm_to_minkowski(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """timm state_dict -> (sparse encoder state_dict without `encoder.` prefix, dropped head keys)."""
    return reference_to_minkowski(timm_to_reference(sd))
