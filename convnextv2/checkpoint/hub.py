"""The preprocessing an exported classifier was trained with, carried with its weights.

timm's hub layout: a `config.json` beside `model.safetensors` (`timm.create_model("local-dir:FOLDER",
pretrained=True)` reads both; `timm.data.resolve_data_config(model=model)` then gives the eval transform) holding
the architecture, num_classes, `pretrained_cfg` (input_size, mean, std, crop_pct, interpolation) and `label_names`.
The same JSON rides in the safetensors metadata (key `timm_config`), so a lone `.safetensors` still carries it.
Hugging Face: id2label / label2id in config.json and a ConvNeXt `preprocessor_config.json` (resize to
size / crop_pct, center crop, bicubic: the same eval transform).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METADATA_KEY = "timm_config"


def timm_hub_config(name: str, num_classes: int, in_chans: int, image_size: int, crop_pct: float,
                    mean: list[float], std: list[float], label_names: list[str] | None = None,
                    interpolation: str = "bicubic") -> dict[str, Any]:
    """timm's config.json for a classifier evaluated with resize(image_size / crop_pct) + center crop. name: the timm
    name of the layout (`convnextv2.timm_names.timm_name`: `convnextv2_atto_s16` at patch 16), so that
    `timm.create_model("local-dir:...")` builds it."""
    cfg: dict[str, Any] = {
        "architecture": name, "num_classes": num_classes, "model_args": {"in_chans": in_chans},
        "pretrained_cfg": {
            "input_size": [in_chans, image_size, image_size], "interpolation": interpolation,
            "crop_pct": crop_pct, "crop_mode": "center", "mean": list(mean), "std": list(std),
            "num_classes": num_classes, "first_conv": "stem.0", "classifier": "head.fc",
        },
    }
    if label_names is not None:
        cfg["label_names"] = list(label_names)
    return cfg


def timm_backbone_config(name: str, in_chans: int, feature_info: list[dict[str, Any]], image_size: int,
                         mean: list[float], std: list[float]) -> dict[str, Any]:
    """config.json of a backbone export: timm's num_classes=0 model plus `feature_info` (timm's own list: num_chs,
    reduction, module per stage), the stage channels and strides a detection / segmentation neck is built for.
    (timm's hub loader ignores the extra top-level key.)"""
    return {**timm_hub_config(name, 0, in_chans, image_size, 1.0, mean, std), "feature_info": feature_info}


def hf_preprocessor_config(image_size: int, crop_pct: float, mean: list[float], std: list[float]) -> dict[str, Any]:
    """transformers' ConvNextImageProcessor settings for the same eval transform (resample 3 = bicubic)."""
    return {"image_processor_type": "ConvNextImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
            "crop_pct": crop_pct, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(mean), "image_std": list(std)}


def metadata(config: dict[str, Any] | None) -> dict[str, str] | None:
    """safetensors metadata carrying the config (None when there is none)."""
    return None if config is None else {METADATA_KEY: json.dumps(config)}


def read_hub_config(path: str | os.PathLike) -> tuple[dict[str, Any], str] | None:
    """The timm config an exported file carries -> (config, where it came from): its safetensors metadata, else a
    timm `config.json` beside it, else a transformers folder's config.json + preprocessor_config.json (as timm's);
    None when none holds one."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if METADATA_KEY in meta:
            try:
                cfg = json.loads(meta[METADATA_KEY])
            except ValueError as e:
                cfg = e
            if not (isinstance(cfg, dict) and isinstance(cfg.get("pretrained_cfg"), dict)):
                raise ValueError(f"{path}: its safetensors metadata {METADATA_KEY!r} is not a timm config "
                                 f"({cfg if isinstance(cfg, ValueError) else 'no pretrained_cfg'}); re-export the "
                                 "file (fcmae convert)")
            return cfg, f"{path.name}'s metadata"
    beside = path.parent / "config.json"
    cfg = _read_json(beside)
    if isinstance(cfg, dict) and isinstance(cfg.get("pretrained_cfg"), dict) and "architecture" in cfg:
        return cfg, str(beside)
    pre = _read_json(path.parent / "preprocessor_config.json")
    if isinstance(cfg, dict) and cfg.get("model_type") == "convnextv2" and isinstance(pre, dict):
        found = hf_as_timm_config(cfg, pre)
        if found is not None:
            return found, f"{beside} + preprocessor_config.json"
    return None


def _read_json(path: Path) -> Any:
    """The JSON in `path`; None when it is missing or not JSON."""
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


def hf_as_timm_config(config: dict[str, Any], preprocessor: dict[str, Any]) -> dict[str, Any] | None:
    """A transformers folder's config.json (ConvNextV2: depths, hidden_sizes, patch_size = stem stride, id2label) and
    preprocessor_config.json (`hf_preprocessor_config`) as timm's config, so that an HF export's preprocessing and
    class names read as a timm export's; None when they name no timm convnextv2 layout or lack a setting."""
    from convnextv2.timm_names import SIZES, SUFFIXES, timm_name

    name = next((n for n, (depths, dims, _) in SIZES.items()
                 if [list(depths), list(dims)] == [config.get("depths"), config.get("hidden_sizes")]), None)
    patch_size = 8 * int(config.get("patch_size") or 4)
    size = (preprocessor.get("size") or {}).get("shortest_edge")
    keys = ("crop_pct", "image_mean", "image_std")
    if name is None or patch_size not in SUFFIXES or size is None or any(preprocessor.get(k) is None for k in keys):
        return None
    id2label = config.get("id2label") or {}
    labels = [id2label.get(str(i), str(i)) for i in range(len(id2label))]
    return timm_hub_config(timm_name(name, patch_size), len(labels), int(config.get("num_channels") or 3), int(size),
                           float(preprocessor["crop_pct"]), preprocessor["image_mean"], preprocessor["image_std"],
                           label_names=labels or None)
