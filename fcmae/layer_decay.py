"""Optimizer parameter groups for fine-tuning: layer-wise lr decay (SPEC §3) and weight-decay exclusions."""
from __future__ import annotations

from torch import nn

SCHEMES = ("single", "group")


def layer_id(name: str, depths: tuple[int, ...], scheme: str) -> int:
    """The layer id of a timm ConvNeXt parameter name; the head (and anything after the last stage) gets the top id.

    single: stem -> 1; stage-s downsample -> id of the stage's first block; block b of stage s -> sum(depths[:s])+b+1;
            head -> sum(depths) + 1.
    group:  stem 0; stage 0 -> 1; stage 1 (+ downsample) -> 2; downsample 2 -> 3; stage-2 block b -> 3 + b//3;
            stage 3 (+ downsample) -> 12; head -> 13.
    """
    parts = name.split(".")
    if scheme == "single":
        if parts[0] == "stem":
            return 1
        if parts[0] == "stages":
            s = int(parts[1])
            first = sum(depths[:s]) + 1
            return first + int(parts[3]) if parts[2] == "blocks" else first
        return sum(depths) + 1
    if scheme == "group":
        if parts[0] == "stem":
            return 0
        if parts[0] == "stages":
            s = int(parts[1])
            if s == 2:
                return 3 + int(parts[3]) // 3 if parts[2] == "blocks" else 3
            return {0: 1, 1: 2, 3: 12}[s]
        return 13
    raise ValueError(f"unknown layer decay scheme {scheme!r}; valid: {', '.join(SCHEMES)}")


def num_layer_ids(depths: tuple[int, ...], scheme: str) -> int:
    """The top id (the head's): scale = decay ** (top - id), so the head has scale 1."""
    return sum(depths) + 1 if scheme == "single" else 13


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, every 1-D parameter (norms, GRN weight/bias in timm) and GRN params of any shape get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias") or ".grn." in name or name.endswith("mask_token")


def param_groups(
    model: nn.Module, weight_decay: float, layer_decay: float = 1.0, scheme: str = "single"
) -> list[dict]:
    """Groups for torch.optim: one per (layer id, decay or not), each with `lr_scale` (timm's schedulers apply it).

    `model` is a timm ConvNeXt. With layer_decay == 1 every scale is 1 and only the weight-decay split remains.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown layer decay scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    depths = tuple(len(stage.blocks) for stage in model.stages)
    if scheme == "group" and len(depths) != 4:
        raise ValueError("the 'group' layer decay scheme needs a 4-stage ConvNeXt")
    top = num_layer_ids(depths, scheme)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, depths, scheme)
        skip_wd = no_weight_decay(name, p)
        group = groups.setdefault((lid, skip_wd), {
            "params": [], "param_names": [], "weight_decay": 0.0 if skip_wd else weight_decay,
            "lr_scale": layer_decay ** (top - lid), "layer_id": lid,
        })
        group["params"].append(p)
        group["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]
