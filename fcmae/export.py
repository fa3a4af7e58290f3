"""The preprocessing a model was trained with, in the form its exports carry it (convnextv2.checkpoint.hub):
`fcmae finetune`'s model*.safetensors + config.json, `fcmae convert` of a fine-tune checkpoint, a backbone export
(`fcmae convert --to backbone`, `fcmae demo`), and what `fcmae eval` reads back."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from convnextv2.checkpoint import EncoderWeights
from convnextv2.checkpoint.convert import feature_info, require_name, write_backbone
from convnextv2.checkpoint.hub import hf_preprocessor_config, timm_backbone_config, timm_hub_config
from convnextv2.timm_names import load_line, timm_name
from fcmae.data.transforms import default_stats

FINETUNE_FORMAT = "fcmae-finetune"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def trained_data(raw: Any, where: str = "the checkpoint", in_chans: int | None = None) -> dict[str, Any]:
    """The `data` section of the config a checkpoint of this project carries ({} for other files), its
    preprocessing checked (image_size a positive int, crop_pct in (0, 1], mean / std finite numbers, std > 0, one per
    channel when `in_chans` is given): a ValueError line naming the file and the key for a damaged one, which would
    otherwise preprocess images wrongly."""
    config = raw.get("config") if isinstance(raw, dict) else None
    data = config.get("data") if isinstance(config, dict) else None
    for name, value in (("config", config), ("config.data", data)):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{where}: its {name} is a {type(value).__name__}, not a mapping: a damaged checkpoint; "
                             "re-save it with its run's config, or save the weights alone")
    data = data or {}
    size, crop = data.get("image_size"), data.get("crop_pct")
    bad = [] if size is None or (isinstance(size, int) and not isinstance(size, bool) and size > 0) else ["image_size"]
    bad += [] if crop is None or (_number(crop) and 0 < crop <= 1) else ["crop_pct"]
    for key in ("mean", "std"):
        stats = data.get(key)
        if stats is not None and not (isinstance(stats, list) and stats and all(_number(v) for v in stats)
                                      and (key == "mean" or min(stats) > 0)
                                      and (in_chans is None or len(stats) == in_chans)):
            bad.append(key)
    if bad:
        raise ValueError(f"{where}: its config's data.{bad[0]} is {data[bad[0]]!r}, which no run writes (image_size "
                         "a positive int, crop_pct in (0, 1], mean / std one finite number per input channel, std > 0):"
                         " a damaged checkpoint; re-save it with its run's config, or save the weights alone")
    return data


def eval_settings(data: dict[str, Any], in_chans: int) -> tuple[int, float, list[float], list[float]]:
    """(image_size, crop_pct, mean, std) of a fine-tune config's `data` section, defaults filled in."""
    d_mean, d_std = default_stats(in_chans)
    return int(data.get("image_size") or 224), float(data.get("crop_pct") or 0.875), \
        list(data.get("mean") or d_mean), list(data.get("std") or d_std)


def timm_config(name: str, patch_size: int, num_classes: int, in_chans: int, data: dict[str, Any],
                classes: list[str] | None) -> dict[str, Any]:
    """timm's config.json of a classifier `name` (convnextv2_<size>) at `patch_size`: it names the layout's timm
    model (convnextv2_atto_s16 at 16), so `timm.create_model("local-dir:...", pretrained=True)` builds it."""
    return timm_hub_config(timm_name(name, patch_size), num_classes, in_chans, *eval_settings(data, in_chans),
                           label_names=classes)


def checkpoint_exports(raw: Any, where: str = "the checkpoint"
                       ) -> tuple[dict[str, Any], dict[str, Any], list[str]] | None:
    """For a fine-tune checkpoint (best.pt, last.pt): (timm config.json, HF preprocessor config, class names);
    None for anything else (an encoder, a bare state_dict: nothing recorded)."""
    if not isinstance(raw, dict) or raw.get("format") != FINETUNE_FORMAT:
        return None
    margs = raw.get("model_args")
    if not isinstance(margs, dict) or "name" not in margs or "num_classes" not in margs:
        return None  # no header to build the configs from (the weights were checked against what it has)
    in_chans, classes = int(margs.get("in_chans") or 3), [str(c) for c in raw.get("classes") or []]
    data = trained_data(raw, where, in_chans)
    size, crop, mean, std = eval_settings(data, in_chans)
    return (timm_config(margs["name"], int(margs.get("patch_size") or 32), int(margs["num_classes"]), in_chans, data,
                        classes or None),
            hf_preprocessor_config(size, crop, mean, std), classes)


def trained_settings(raw: Any, in_chans: int, where: str = "the checkpoint"
                     ) -> tuple[int, float, list[float], list[float]]:
    """(image_size, crop_pct, mean, std) a checkpoint of this project was trained with (its config's `data`, checked:
    `trained_data`); 224 px, crop_pct 0.875 and the default statistics for other files."""
    return eval_settings(trained_data(raw, where, in_chans), in_chans)


def write_backbone_export(weights: EncoderWeights, raw: Any, dst: Path) -> dict[str, Any]:
    """Write the encoder as a timm backbone (`fcmae convert --to backbone`, the demo's stage 2) with its stage
    channels / strides and the preprocessing it was trained with (`trained_settings`), and print its load line ->
    {"weights", "fresh", "path": the weights file}."""
    arch = weights.arch
    size, _, mean, std = trained_settings(raw, arch.in_chans)
    stages = feature_info(arch)
    path = write_backbone(weights, dst, timm_backbone_config(arch.timm_name, arch.in_chans, stages, size, mean, std))
    print(f"wrote {dst}: timm {arch.timm_name} backbone (no classifier{'' if dst.suffix else '; + config.json'}), "
          f"stage channels {[s['num_chs'] for s in stages]}, strides {[s['reduction'] for s in stages]}")
    print(f"  load: {load_line(require_name(arch), arch.patch_size, arch.in_chans, str(path), None, size)}")
    return {"weights": weights, "fresh": [], "path": path}
