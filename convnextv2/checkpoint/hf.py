"""Hugging Face transformers' ConvNextV2 layout <-> timm keys (transformers is not needed for the conversion).

`ConvNextV2ForImageClassification` keys (`ConvNextV2Model` has the same without the `convnextv2.` prefix and no
classifier):
    convnextv2.embeddings.patch_embeddings / .layernorm                   stem conv / LN
    convnextv2.encoder.stages.s.downsampling_layer.{0,1}                  stage-s LN / 2x2 conv (s >= 1)
    convnextv2.encoder.stages.s.layers.b.{dwconv, layernorm, pwconv1, grn, pwconv2}
        pwconv Linear (out, in); grn.weight / grn.bias (1, 1, 1, 4C)
    convnextv2.layernorm                                                  final LN (timm head.norm)
    classifier                                                            timm head.fc
"""
from __future__ import annotations

import re
from typing import Any

import torch

from convnextv2.checkpoint.arch import Arch
from convnextv2.checkpoint.layout import convert_tensor, grn_to_timm

PREFIX = "convnextv2."

_BLOCK_TO_HF = {"conv_dw": "dwconv", "norm": "layernorm", "mlp.fc1": "pwconv1", "mlp.fc2": "pwconv2", "mlp.grn": "grn"}
_BLOCK_TO_TIMM = {v: k for k, v in _BLOCK_TO_HF.items()}


def timm_to_hf(sd: dict[str, torch.Tensor], base_model: bool = False) -> dict[str, torch.Tensor]:
    """timm state_dict -> ConvNextV2ForImageClassification keys, or ConvNextV2Model keys if base_model (the
    classifier is then left out)."""
    prefix = "" if base_model else PREFIX
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if m := re.fullmatch(r"stem\.(\d)\.(\w+)", k):
            out[prefix + ("embeddings.patch_embeddings." if m[1] == "0" else "embeddings.layernorm.") + m[2]] = v
        elif m := re.fullmatch(r"stages\.(\d+)\.downsample\.(\d)\.(\w+)", k):
            out[f"{prefix}encoder.stages.{m[1]}.downsampling_layer.{m[2]}.{m[3]}"] = v
        elif m := re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)\.(\w+)", k):
            if m[3] not in _BLOCK_TO_HF:
                raise ValueError(f"timm key {k} has no Hugging Face counterpart (is this a ConvNeXt V2?)")
            if m[3] == "mlp.grn":
                v = v.reshape(1, 1, 1, -1)
            elif m[3].startswith("mlp.fc") and v.ndim == 4:
                v = v.flatten(1)
            out[f"{prefix}encoder.stages.{m[1]}.layers.{m[2]}.{_BLOCK_TO_HF[m[3]]}.{m[4]}"] = v
        elif m := re.fullmatch(r"head\.norm\.(\w+)", k):
            out[f"{prefix}layernorm.{m[1]}"] = v
        elif m := re.fullmatch(r"head\.fc\.(\w+)", k):
            if not base_model:
                out[f"classifier.{m[1]}"] = v
        else:
            raise ValueError(f"timm key {k} has no Hugging Face counterpart (is this a ConvNeXt V2?)")
    return out


def hf_to_timm(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """ConvNextV2Model or ConvNextV2ForImageClassification state_dict -> (timm state_dict, unknown keys). ValueError
    naming the key for a GRN parameter that is not (1, 1, 1, C)."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, v in sd.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if m := re.fullmatch(r"embeddings\.(patch_embeddings|layernorm)\.(\w+)", k):
            out[f"stem.{0 if m[1] == 'patch_embeddings' else 1}.{m[2]}"] = v
        elif m := re.fullmatch(r"encoder\.stages\.(\d+)\.downsampling_layer\.(\d)\.(\w+)", k):
            out[f"stages.{m[1]}.downsample.{m[2]}.{m[3]}"] = v
        elif (m := re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(\w+)\.(\w+)", k)) and m[3] in _BLOCK_TO_TIMM:
            out[f"stages.{m[1]}.blocks.{m[2]}.{_BLOCK_TO_TIMM[m[3]]}.{m[4]}"] = (
                convert_tensor(key, grn_to_timm, v) if m[3] == "grn" else v)
        elif m := re.fullmatch(r"layernorm\.(\w+)", k):
            out[f"head.norm.{m[1]}"] = v
        elif m := re.fullmatch(r"classifier\.(\w+)", k):
            out[f"head.fc.{m[1]}"] = v
        else:
            unknown.append(key)
    return out, unknown


def hf_config(arch: Arch, num_classes: int, labels: list[str] | None = None) -> dict[str, Any]:
    """A transformers ConvNextV2Config as a dict (config.json). layer_norm_eps is timm's 1e-6 for the final norm
    (transformers' default 1e-12 would differ slightly); the other norms are fixed at 1e-6 in both. HF's `patch_size`
    is the stem's kernel == stride (4 standard, 2 for an encoder pretrained with 16-px mask patches). labels: the
    class names (id2label), else LABEL_i."""
    cfg: dict[str, Any] = {
        "model_type": "convnextv2", "architectures": ["ConvNextV2ForImageClassification"],
        "depths": list(arch.depths), "hidden_sizes": list(arch.dims), "num_channels": arch.in_chans,
        "patch_size": arch.stem_stride, "num_stages": len(arch.depths), "hidden_act": "gelu",
        "layer_norm_eps": 1e-6, "drop_path_rate": 0.0, "image_size": 224, "initializer_range": 0.02,
    }
    if num_classes > 0:
        names = list(labels) if labels is not None and len(labels) == num_classes else [
            f"LABEL_{i}" for i in range(num_classes)]
        cfg["id2label"] = {str(i): n for i, n in enumerate(names)}
        cfg["label2id"] = {n: i for i, n in enumerate(names)}
    else:
        cfg["architectures"] = ["ConvNextV2Model"]
    return cfg
