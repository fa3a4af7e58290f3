"""Recognise a loaded checkpoint's format from its keys, and pull out the encoder's state_dict."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from convnextv2.checkpoint.io import CheckpointError

FORMATS = {
    "fcmae": "this project's FCMAE checkpoint",
    "timm": "timm ConvNeXt V2 state_dict",
    "reference": "reference repo dense state_dict (fine-tuned or pt_only)",
    "minkowski": "reference repo MinkowskiEngine sparse state_dict (FCMAE pretraining)",
    "hf": "Hugging Face transformers ConvNextV2 state_dict",
}
CONTAINER_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")
# FCMAE decoder parts: ours (`decoder.*`) and the reference's top-level `proj`, `mask_token`, `decoder`, `pred`.
DECODER_PREFIXES = ("decoder.", "proj.", "pred.", "mask_token")
HEADER_FORMATS = ("fcmae", "fcmae-finetune")  # this project's checkpoints: a header (model_args) beside the weights


@dataclass
class Source:
    """A checkpoint's encoder weights in their own layout (container and `module.`/`encoder.` prefixes removed)."""
    format: str
    state_dict: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)
    model_args: dict[str, Any] | None = None  # this project's checkpoints: the header's model_args
    header: str | None = None  # the header's `format` ("fcmae", "fcmae-finetune") when it has model_args
    where: str = "checkpoint"  # how messages name the file


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _why_not_state_dict(obj: Any) -> str:
    """Why `obj` is no state_dict, in a few words ('is missing', 'is empty', 'holds a str under x')."""
    if obj is None:
        return "is missing"
    if not isinstance(obj, dict):
        return f"is a {type(obj).__name__}"
    if not obj:
        return "is empty"
    key = next(k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if not isinstance(key, str):
        return f"has a key {key!r} that is not a name"
    return f"holds a {type(obj[key]).__name__} under {key!r}, not a tensor"


def _header(obj: dict) -> tuple[dict[str, Any] | None, str | None]:
    """(model_args, format) of this project's checkpoint header, (None, None) for other files."""
    args = obj.get("model_args")
    if obj.get("format") in HEADER_FORMATS and isinstance(args, dict):
        return args, obj["format"]
    return None, None


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _sample(keys, n: int = 5) -> str:
    keys = [str(k) for k in keys]
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} keys)" if len(keys) > n else "")


def detect(obj: Any, where: str = "checkpoint") -> Source:
    """Loaded checkpoint (see io.load_file) -> Source. CheckpointError if it is no ConvNeXt V2 checkpoint."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where} holds a {type(obj).__name__}, not a state_dict or a checkpoint dict; save the "
                              "model's state_dict() (a dict of tensors)")
    notes: list[str] = []
    if obj.get("format") == "fcmae":
        sd = obj.get("model")
        if not _is_state_dict(sd):
            raise CheckpointError(
                f"{where} says format 'fcmae' but its 'model' state_dict {_why_not_state_dict(sd)}; give an FCMAE "
                "checkpoint as `fcmae pretrain` or `fcmae convert --to fcmae` writes it")
        enc = _strip(sd, "encoder.")
        # The FCMAE encoder's head.norm is frozen and never trained: a fine-tune starts it fresh.
        enc = {k: v for k, v in enc.items() if not k.startswith("head.")}
        notes.append(f"FCMAE checkpoint (version {obj.get('version')}): took encoder.*, ignored the decoder"
                     + (f", epoch {obj['epoch']}" if "epoch" in obj else ""))
        return Source("fcmae", enc, notes, *_header(obj), where)
    model_args, header = None, None
    if _is_state_dict(obj):
        sd = obj
    else:
        key = next((k for k in CONTAINER_KEYS if _is_state_dict(obj.get(k))), None)
        name = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), dict) and obj[k]), None)
        tensors = sum(isinstance(v, torch.Tensor) for v in obj.values())
        if key is None and (name is not None or 2 * tensors >= len(obj)):  # a state_dict but for one entry: name it
            what = f"its {name!r} state_dict" if name is not None else "its state_dict"
            raise CheckpointError(f"{where}: {what} {_why_not_state_dict(obj[name] if name else obj)}; save the "
                                  "model's state_dict() (a dict of tensors)")
        if key is None:
            raise CheckpointError(
                f"{where} has no state_dict: top-level keys are [{_sample(obj.keys())}]; expected tensors or a dict "
                f"with one of {', '.join(CONTAINER_KEYS)}"
            )
        sd = obj[key]
        notes.append(f"weights from the checkpoint's {key!r} entry")
        model_args, header = _header(obj) if key == "model" else (None, None)
    if all(k.startswith("module.") for k in sd):
        sd = _strip(sd, "module.")  # saved from a DistributedDataParallel wrapper
    hf_markers = ("embeddings.patch_embeddings.weight", "convnextv2.embeddings.patch_embeddings.weight")
    if any(m in sd for m in hf_markers):
        return Source("hf", sd, notes, model_args, header, where)
    if any(k.startswith("encoder.") for k in sd):
        others = [k for k in sd if not k.startswith("encoder.")]
        if others:
            decoder = [k for k in others if k.startswith(DECODER_PREFIXES)]
            notes.append(f"took encoder.*, ignored {len(others)} other keys"
                         + (" (the FCMAE decoder)" if len(decoder) == len(others) else f": {_sample(others)}"))
        sd = _strip(sd, "encoder.")
    if "stem.0.weight" in sd:
        return Source("timm", sd, notes, model_args, header, where)
    if any(k.endswith("dwconv.kernel") for k in sd):
        return Source("minkowski", sd, notes, model_args, header, where)
    if "downsample_layers.0.0.weight" in sd:
        return Source("reference", sd, notes, model_args, header, where)
    raise CheckpointError(
        f"{where} is not a ConvNeXt V2 checkpoint: its keys [{_sample(sd)}] match none of the known layouts "
        f"({'; '.join(FORMATS.values())})"
    )
