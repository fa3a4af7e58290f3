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
    timm `config.json` beside it; None when neither holds one."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        cfg = _hub_config(meta.get(METADATA_KEY))
        if cfg is not None:
            return cfg, f"{path.name}'s metadata"
    beside = path.parent / "config.json"
    if beside.is_file():
        cfg = _hub_config(beside.read_text(errors="replace"))
        if cfg is not None:
            return cfg, str(beside)
    return None


def _hub_config(text: str | None) -> dict[str, Any] | None:
    """The timm config in `text` (JSON), or None when it holds none: not JSON, or no architecture and
    pretrained_cfg."""
    try:
        cfg = json.loads(text) if text is not None else None
    except ValueError:
        return None
    if isinstance(cfg, dict) and isinstance(cfg.get("pretrained_cfg"), dict) and "architecture" in cfg:
        return cfg
    return None
