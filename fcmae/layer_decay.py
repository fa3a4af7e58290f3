"""Layer-wise lr decay for fine-tuning (docs/method.md, "Fine-tuning recipes"): per-parameter lr scales for `fcmae.engine.optim.param_groups`.

The weight-decay rule (none on biases and 1-D params, which includes GRN weight/bias in timm) lives in the engine;
this module only says how much smaller each parameter's lr is than the head's.
"""
from __future__ import annotations

from torch import nn

from fcmae.engine.optim import param_groups as engine_param_groups

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


def layer_scales(model: nn.Module, layer_decay: float, scheme: str = "single") -> dict[str, float]:
    """{parameter name: lr scale} for a timm ConvNeXt; scale = layer_decay ** (top id - layer id)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown layer decay scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    depths = tuple(len(stage.blocks) for stage in model.stages)
    if scheme == "group" and len(depths) != 4:
        raise ValueError("the 'group' layer decay scheme needs a 4-stage ConvNeXt")
    top = num_layer_ids(depths, scheme)
    return {name: layer_decay ** (top - layer_id(name, depths, scheme)) for name, _ in model.named_parameters()}


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0, scheme: str = "single") -> list[dict]:
    """The engine's weight-decay groups, split further by layer-decay lr scale (`lr_scale` per group)."""
    return engine_param_groups(model, weight_decay, lr_scales=layer_scales(model, layer_decay, scheme))
