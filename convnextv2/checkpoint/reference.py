"""The reference repo's dense layout (facebookresearch/ConvNeXt-V2 `models/convnextv2.py`) <-> timm keys.

Reference dense keys: `downsample_layers.0.{0,1}` stem conv + LN; `downsample_layers.i.{0,1}` stage-i LN + 2x2 conv;
`stages.s.b.{dwconv, norm, pwconv1, grn.gamma, grn.beta, pwconv2}` with Linear pwconv (out, in) and GRN
(1, 1, 1, 4C); final `norm`; classifier `head`. The released `pt_only` FCMAE files use the same names under an
`encoder.` prefix (stripped by `detect`). timm's mlp.fc weights are returned 2-D; `fit_shapes` makes them 1x1 convs.
"""
from __future__ import annotations

import re

import torch

from convnextv2.checkpoint.layout import convert_tensor, grn_to_timm

_BLOCK_TO_TIMM = {
    "dwconv": "conv_dw", "norm": "norm", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2",
    "grn.gamma": "mlp.grn.weight", "grn.beta": "mlp.grn.bias",
}
_BLOCK_FROM_TIMM = {
    "conv_dw": "dwconv", "norm": "norm", "mlp.fc1": "pwconv1", "mlp.fc2": "pwconv2",
    "mlp.grn.weight": "grn.gamma", "mlp.grn.bias": "grn.beta",
}


def _split_param(rest: str) -> tuple[str, str]:
    """'grn.gamma' -> ('grn.gamma', ''), 'pwconv1.weight' -> ('pwconv1', 'weight')."""
    if rest.startswith("grn."):
        return rest, ""
    module, _, param = rest.rpartition(".")
    return module, param


def reference_to_timm(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Reference dense state_dict -> (timm-keyed state_dict, keys that have no timm counterpart). ValueError naming
    the key for a GRN parameter that is not (1, 1, 1, C)."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for k, v in sd.items():
        if m := re.fullmatch(r"downsample_layers\.0\.(\d)\.(\w+)", k):
            out[f"stem.{m[1]}.{m[2]}"] = v
        elif m := re.fullmatch(r"downsample_layers\.(\d+)\.(\d)\.(\w+)", k):
            out[f"stages.{m[1]}.downsample.{m[2]}.{m[3]}"] = v
        elif m := re.fullmatch(r"stages\.(\d+)\.(\d+)\.(.+)", k):
            module, param = _split_param(m[3])
            if module not in _BLOCK_TO_TIMM:
                unknown.append(k)
                continue
            name = f"stages.{m[1]}.blocks.{m[2]}.{_BLOCK_TO_TIMM[module]}" + (f".{param}" if param else "")
            out[name] = convert_tensor(k, grn_to_timm, v) if module.startswith("grn.") else v
        elif m := re.fullmatch(r"norm\.(\w+)", k):
            out[f"head.norm.{m[1]}"] = v
        elif m := re.fullmatch(r"head\.(\w+)", k):
            out[f"head.fc.{m[1]}"] = v
        else:
            unknown.append(k)
    return out, unknown


def timm_to_reference(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ConvNeXt V2 state_dict -> reference dense state_dict (pwconv 2-D, GRN (1, 1, 1, 4C))."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if m := re.fullmatch(r"stem\.(\d)\.(\w+)", k):
            out[f"downsample_layers.0.{m[1]}.{m[2]}"] = v
        elif m := re.fullmatch(r"stages\.(\d+)\.downsample\.(\d)\.(\w+)", k):
            out[f"downsample_layers.{m[1]}.{m[2]}.{m[3]}"] = v
        elif m := re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)\.(\w+)", k):
            module = _BLOCK_FROM_TIMM.get(m[3] if m[3] != "mlp.grn" else f"mlp.grn.{m[4]}")
            if module is None:
                raise ValueError(f"timm key {k} has no reference counterpart (is this a ConvNeXt V2?)")
            if module.startswith("grn."):
                out[f"stages.{m[1]}.{m[2]}.{module}"] = v.reshape(1, 1, 1, -1)
            else:
                out[f"stages.{m[1]}.{m[2]}.{module}.{m[4]}"] = v.flatten(1) if module.startswith("pwconv") and v.ndim == 4 else v
        elif m := re.fullmatch(r"head\.norm\.(\w+)", k):
            out[f"norm.{m[1]}"] = v
        elif m := re.fullmatch(r"head\.fc\.(\w+)", k):
            out[f"head.{m[1]}"] = v
        else:
            raise ValueError(f"timm key {k} has no reference counterpart (is this a ConvNeXt V2?)")
    return out
