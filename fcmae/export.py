"""The preprocessing a fine-tuned classifier was evaluated with, in the form its exports carry it
(convnextv2.checkpoint.hub): `fcmae finetune`'s model*.safetensors + config.json, `fcmae convert` of a fine-tune
checkpoint, and what `fcmae eval` reads back."""
from __future__ import annotations

from typing import Any

from convnextv2.checkpoint.hub import hf_preprocessor_config, timm_hub_config
from convnextv2.timm_names import timm_name
from fcmae.data.transforms import default_stats

FINETUNE_FORMAT = "fcmae-finetune"


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


def checkpoint_exports(raw: Any) -> tuple[dict[str, Any], dict[str, Any], list[str]] | None:
    """For a fine-tune checkpoint (best.pt, last.pt): (timm config.json, HF preprocessor config, class names);
    None for anything else (an encoder, a bare state_dict: nothing recorded)."""
    if not isinstance(raw, dict) or raw.get("format") != FINETUNE_FORMAT:
        return None
    margs, data = raw.get("model_args") or {}, (raw.get("config") or {}).get("data") or {}
    in_chans, classes = int(margs.get("in_chans", 3)), list(raw.get("classes") or [])
    size, crop, mean, std = eval_settings(data, in_chans)
    return (timm_config(margs["name"], int(margs.get("patch_size") or 32), int(margs["num_classes"]), in_chans, data,
                        classes or None),
            hf_preprocessor_config(size, crop, mean, std), classes)
