"""Any ConvNeXt V2 checkpoint -> timm weights: read + validate, load into a timm model, write timm / HF files.

Everything goes through one intermediate: an `EncoderWeights`, the encoder's state_dict under timm's keys (mlp.fc
weights kept 2-D until fitted to a concrete model), plus the detected format and the size its tensors imply.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.layers import trunc_normal_
from torch import nn

from convnextv2.checkpoint.arch import Arch, arch_by_name, encoder_shapes, infer_arch
from convnextv2.checkpoint.detect import FORMATS, Source, detect
from convnextv2.checkpoint.hf import hf_config, hf_to_timm, timm_to_hf
from convnextv2.checkpoint.hub import metadata
from convnextv2.checkpoint.io import CheckpointError, atomic_folder, atomic_write, load_file, save_state_dict
from convnextv2.checkpoint.minkowski import minkowski_to_timm
from convnextv2.checkpoint.reference import reference_to_timm
from convnextv2.checkpoint.validate import (
    REEXPORT, check_header, check_keys_and_shapes, check_values, header_claims, layout_fits,
)
from convnextv2.encoder import create_convnextv2

HEAD_INIT_SCALE = 0.001  # the fine-tune recipes' head init scale (docs/method.md, "Fine-tuning recipes"), timm's `head_init_scale`
HEAD_KEYS = ("head.norm.weight", "head.norm.bias", "head.fc.weight", "head.fc.bias")


@dataclass
class EncoderWeights:
    """A checkpoint's weights under timm keys. state_dict holds the encoder and, when the source had them, head.norm
    / head.fc; mlp.fc weights are 2-D (out, in) until `fit_shapes`."""
    state_dict: dict[str, torch.Tensor]
    format: str
    arch: Arch
    notes: list[str] = field(default_factory=list)
    model_args: dict[str, Any] | None = None

    def describe(self) -> str:
        return f"{FORMATS[self.format]} [{self.format}], {self.arch.describe()}"


@dataclass
class LoadInfo:
    """What `load_encoder_weights` did: which format and size it read, and which parameters start fresh."""
    format: str
    arch: Arch
    loaded: list[str]
    fresh: list[str]
    notes: list[str]

    def summary(self) -> str:
        fresh = ", ".join(sorted({k.rsplit(".", 1)[0] for k in self.fresh})) or "nothing"
        return (f"loaded {len(self.loaded)} tensors ({FORMATS[self.format]}, {self.arch.describe()}); "
                f"fresh: {fresh}" + "".join(f"; {n}" for n in self.notes))


def encoder_keys(depths: tuple[int, ...]) -> list[str]:
    """Every timm ConvNeXt V2 encoder key (no head) for the given depths."""
    keys = [f"stem.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")]
    for s, depth in enumerate(depths):
        if s > 0:
            keys += [f"stages.{s}.downsample.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")]
        for b in range(depth):
            keys += [f"stages.{s}.blocks.{b}.{m}.{p}" for m in ("conv_dw", "norm", "mlp.fc1", "mlp.grn", "mlp.fc2")
                     for p in ("weight", "bias")]
    return keys


def _to_timm_keys(src: Source) -> tuple[dict[str, torch.Tensor], list[str]]:
    if src.format in ("timm", "fcmae"):
        return dict(src.state_dict), []
    convert = {"reference": reference_to_timm, "minkowski": minkowski_to_timm, "hf": hf_to_timm}[src.format]
    return convert(src.state_dict)


def _timm_state_dict(source: Source, where: str) -> dict[str, torch.Tensor]:
    """The source's tensors, each a finite float (checked in the file's own layout: the conversions reshape dense
    floats only), under timm's keys. CheckpointError for a value, a layout or a key that does not convert."""
    check_values(source.state_dict, where)
    try:
        sd, unknown = _to_timm_keys(source)
    except ValueError as e:  # a layout conversion met a tensor not in its layout
        raise CheckpointError(f"{where} ({FORMATS[source.format]}): {e}; {REEXPORT}") from None
    if unknown:
        raise CheckpointError(
            f"{where} ({FORMATS[source.format]}) has keys with no ConvNeXt V2 counterpart: {', '.join(unknown[:5])}"
            f"{' ...' if len(unknown) > 5 else ''} (a ConvNeXt V1 with layer scale, or another model?)"
        )
    return sd


def read_encoder(src: str | os.PathLike | dict | Source, model: str | None = None,
                 where: str | None = None) -> EncoderWeights:
    """Load (safely), detect the format, check every value is a finite float, convert to timm keys, infer the size and
    check the rest (`check_encoder`): the encoder is complete, every shape is the size's, the header (if any) says
    what the tensors hold.

    model: a timm name (`convnextv2_atto`); if given, the file must hold that size, else a ValueError names the size
    the file implies and the offending keys. where: how errors name the file (default: the path, the Source's).
    """
    if isinstance(src, (str, os.PathLike)):
        where = where or str(src)
        src = load_file(src)
    if isinstance(src, Source):
        source, where = src, where or src.where
    else:
        where = where or "checkpoint"
        source = detect(src, where)
    sd = _timm_state_dict(source, where)
    try:
        arch = infer_arch(sd)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    missing = [k for k in encoder_keys(arch.depths) if k not in sd]
    if missing:
        hint = " (no GRN: a ConvNeXt V1 checkpoint?)" if all(".grn." in k for k in missing) else ""
        raise CheckpointError(
            f"{where} is an incomplete ConvNeXt V2 encoder{hint}: missing {len(missing)} keys, e.g. {', '.join(missing[:5])}"
        )
    check_encoder(sd, arch, where, source.model_args, source.header)
    weights = EncoderWeights(sd, source.format, arch, list(source.notes), source.model_args)
    if model is not None:
        arch_by_name(model)  # ValueError for an unknown name
        if arch.name != model:
            shapes = timm_shapes(model, 0, arch.in_chans, arch.patch_size)
            check_shapes(fit_shapes(encoder_part(sd), shapes), shapes, arch, model,
                         f". Use --model {arch.name} (or leave --model out)" if arch.name else "")
    return weights


def check_encoder(sd: dict[str, torch.Tensor], arch: Arch, where: str, model_args: dict[str, Any] | None = None,
                  header: str | None = None) -> None:
    """CheckpointError (one line: the file, the first bad key, the fix) unless `sd` (timm keys) is exactly `arch`'s
    encoder, plus head.norm / head.fc when it has them, and its header (`model_args` of a checkpoint whose `format`
    is `header`) says what the tensors hold. (The values: `check_values`, before the layout conversions.)"""
    fc = sd.get("head.fc.weight")
    num_classes = int(fc.shape[0]) if fc is not None and fc.ndim > 0 else 0
    if model_args is not None:
        claims = header_claims(model_args, "encoder_name" if header == "fcmae" else "name")
        if header != "fcmae" and model_args.get("num_classes") is not None:
            claims["num_classes"] = model_args["num_classes"]
        check_header(claims, arch, where, "header (model_args)", num_classes)
    shapes = encoder_shapes(arch, num_classes)
    check_keys_and_shapes(sd, shapes, where, arch.name or "the layout its stem and blocks imply",
                          may_lack=lambda k: k.startswith("head."))


def encoder_part(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not k.startswith("head.")}


def timm_shapes(name: str, num_classes: int, in_chans: int = 3, patch_size: int = 32) -> dict[str, torch.Size]:
    """Parameter shapes of timm's `name` at total stride `patch_size` (see `create_convnextv2`), built on the meta
    device: no memory, no init cost, nothing downloaded."""
    with torch.device("meta"):
        model = create_convnextv2(name, patch_size, num_classes=num_classes, in_chans=in_chans)
    return {k: v.shape for k, v in model.state_dict().items()}


def fit_shapes(sd: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Reshape mlp.fc weights between Linear (out, in) and 1x1-conv (out, in, 1, 1) to what `shapes` says; nothing
    else (`layout_fits`: a same-size tensor of another shape is left as it is, for `check_shapes` to refuse)."""
    out = {}
    for k, v in sd.items():
        want = shapes.get(k)
        if want is not None and v.shape != want and layout_fits(k, v.shape, want):
            v = v.reshape(want)
        out[k] = v
    return out


def check_shapes(sd: dict[str, torch.Tensor], shapes: dict[str, torch.Size], arch: Arch, target: str,
                 fix: str = "") -> None:
    """ValueError naming the size the weights imply, up to 5 offending keys and `fix`, unless every key of sd fits."""
    bad = [f"{k} {tuple(v.shape)} vs {tuple(shapes[k])}" for k, v in sd.items() if k in shapes and v.shape != shapes[k]]
    bad += [f"{k} (not in the model)" for k in sd if k not in shapes]
    if bad:
        raise ValueError(
            f"size mismatch: the checkpoint holds {arch.describe()}, but the target is {target}; offending keys "
            f"(checkpoint vs model): {'; '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}{fix}"
        )


def rebuild_hint(arch: Arch, target: Arch) -> str:
    """What differs between the weights and a model (size, in_chans, patch size) and how to build one they fit."""
    differs = [f"{what} ({a} vs {b})" for what, a, b in (("size", arch.name, target.name),
                                                        ("in_chans", arch.in_chans, target.in_chans),
                                                        ("patch size", arch.patch_size, target.patch_size)) if a != b]
    if arch.name is None or not differs:
        return ""
    after = " after `import convnextv2`" if arch.patch_size != 32 else ""
    return (f". The checkpoint and the model differ in {' and '.join(differs)}: build the model as "
            f"timm.create_model({arch.timm_name!r}, in_chans={arch.in_chans}, ...){after}")


def fresh_head(shapes: dict[str, torch.Size], head_init_scale: float = HEAD_INIT_SCALE,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """head.norm = (ones, zeros); head.fc weight ~ trunc_normal(std .02) * head_init_scale, bias 0 (as timm and the
    reference fine-tune initialise the classifier)."""
    head: dict[str, torch.Tensor] = {}
    if "head.norm.weight" in shapes:
        head["head.norm.weight"] = torch.ones(shapes["head.norm.weight"])
        head["head.norm.bias"] = torch.zeros(shapes["head.norm.bias"])
    if "head.fc.weight" in shapes:
        w = torch.empty(shapes["head.fc.weight"])
        if generator is not None:  # trunc_normal_ has no generator argument: draw, then clip like it does
            w = (torch.randn(w.shape, generator=generator) * 0.02).clamp_(-2.0, 2.0)
        else:
            trunc_normal_(w, std=0.02)
        head["head.fc.weight"] = w * head_init_scale
        head["head.fc.bias"] = torch.zeros(shapes["head.fc.bias"])
    return head


def _with_head(weights: EncoderWeights, shapes: dict[str, torch.Size], head_init_scale: float
               ) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Encoder + the source's head parts that fit `shapes` + fresh ones for the rest -> (sd, fresh keys, notes)."""
    sd = fit_shapes(encoder_part(weights.state_dict), shapes)
    notes = []
    new = fresh_head(shapes, head_init_scale)
    fresh = []
    for k in HEAD_KEYS:
        if k not in shapes:
            continue
        src = weights.state_dict.get(k)
        if src is not None and src.shape == shapes[k]:
            sd[k] = src
        else:
            if src is not None:
                notes.append(f"{k} {tuple(src.shape)} does not fit {tuple(shapes[k])}: started fresh")
            sd[k] = new[k]
            fresh.append(k)
    return sd, fresh, notes


def timm_classifier_state_dict(weights: EncoderWeights, num_classes: int | None = None,
                               head_init_scale: float = HEAD_INIT_SCALE) -> tuple[dict[str, torch.Tensor], list[str]]:
    """-> (complete timm state_dict for `weights.arch.name` with num_classes outputs, keys that start fresh).

    num_classes None keeps the source's classifier if it has one, else 1000 (timm's default, so that
    `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))` loads it strictly).
    """
    name = require_name(weights.arch)
    if num_classes is None:
        fc = weights.state_dict.get("head.fc.weight")
        num_classes = int(fc.shape[0]) if fc is not None else 1000
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    shapes = timm_shapes(name, num_classes, weights.arch.in_chans, weights.arch.patch_size)
    sd, fresh, notes = _with_head(weights, shapes, head_init_scale)
    check_shapes(sd, shapes, weights.arch, name)
    weights.notes.extend(notes)
    return sd, fresh


def require_name(arch: Arch) -> str:
    if arch.name is None:
        raise ValueError(
            f"the checkpoint holds {arch.describe()}, which matches no timm convnextv2_* model; "
            "load it into your own timm ConvNeXt with load_encoder_weights instead"
        )
    return arch.name


def load_encoder_weights(model: nn.Module, src: str | os.PathLike | dict | EncoderWeights,
                         head_init_scale: float | None = HEAD_INIT_SCALE) -> LoadInfo:
    """Load any ConvNeXt V2 checkpoint (any format of docs/checkpoints.md) into a timm ConvNeXt, for fine-tuning.

    Every encoder tensor must fit (else a ValueError names the size the file implies and the offending keys).
    head.norm / head.fc come from the file when it has them with matching shapes; otherwise they start fresh:
    head.norm (1, 0), head.fc trunc_normal(.02) * head_init_scale (None: keep the model's own init). The returned
    LoadInfo lists the fresh keys (`info.summary()` is one log line).
    """
    weights = src if isinstance(src, EncoderWeights) else read_encoder(src)
    target = model.state_dict()
    shapes = {k: v.shape for k, v in target.items()}
    target_arch = infer_arch(target)
    check_shapes(fit_shapes(encoder_part(weights.state_dict), shapes), shapes, weights.arch,
                 target_arch.describe(), rebuild_hint(weights.arch, target_arch))
    missing_enc = [k for k in shapes if not k.startswith("head.") and k not in weights.state_dict]
    if missing_enc:
        raise ValueError(f"the checkpoint lacks {len(missing_enc)} encoder keys of the model, e.g. {missing_enc[:5]}")
    sd, fresh, notes = _with_head(weights, shapes, head_init_scale if head_init_scale is not None else 1.0)
    if head_init_scale is None:  # keep the model's own init for fresh parts
        sd.update({k: target[k] for k in fresh})
    model.load_state_dict(sd, strict=True)
    return LoadInfo(weights.format, weights.arch, [k for k in sd if k not in fresh], fresh,
                    weights.notes + notes)


def timm_metadata(arch: Arch) -> dict[str, str]:
    """The safetensors header entries of a timm export: how to rebuild the model (timm's own loader ignores them;
    `patch_size` is the total stride, `stem_stride` timm's `patch_size` argument)."""
    return {"model": arch.name or "", "in_chans": str(arch.in_chans), "patch_size": str(arch.patch_size),
            "stem_stride": str(arch.stem_stride)}


def write_timm(weights: EncoderWeights, dst: str | os.PathLike, num_classes: int | None = None,
               head_init_scale: float = HEAD_INIT_SCALE, metadata: dict[str, str] | None = None) -> list[str]:
    """Write a timm classifier state_dict (safetensors or torch by suffix) -> the fresh keys. metadata: extra
    safetensors metadata (convnextv2.checkpoint.hub.metadata: the preprocessing)."""
    sd, fresh = timm_classifier_state_dict(weights, num_classes, head_init_scale)
    save_state_dict(sd, dst, {**timm_metadata(weights.arch), **(metadata or {})})
    return fresh


def feature_info(arch: Arch) -> list[dict[str, Any]]:
    """timm's `feature_info` of the layout the weights imply: per stage its channels (num_chs), stride (reduction) and
    module, read off the model itself (built on the meta device: no memory, nothing downloaded)."""
    with torch.device("meta"):
        model = create_convnextv2(require_name(arch), arch.patch_size, in_chans=arch.in_chans, num_classes=0)
    return [dict(info) for info in model.feature_info]


def write_backbone(weights: EncoderWeights, dst: str | os.PathLike, config: dict[str, Any]) -> Path:
    """Write the encoder as timm's num_classes=0 model (no classifier; head.norm kept, from the source or fresh, so that
    timm loads it strictly) with `config` (hub.timm_backbone_config) -> the weights file. DST.safetensors carries
    the config in its metadata (DST.pt/.pth: none); a DST without suffix becomes a folder, model.safetensors +
    config.json, that `timm.create_model("local-dir:DST", pretrained=True, features_only=True)` reads."""
    sd, _ = timm_classifier_state_dict(weights, num_classes=0)
    meta = {**timm_metadata(weights.arch), **(metadata(config) or {})}
    dst = Path(dst)
    if dst.suffix:
        save_state_dict(sd, dst, meta)
        return dst
    with atomic_folder(dst) as tmp:  # all of the folder or none of it
        save_state_dict(sd, tmp / "model.safetensors", meta)
        write_json(tmp / "config.json", config)
    return dst / "model.safetensors"


def hf_state_dict(weights: EncoderWeights, num_classes: int | None = None, head_init_scale: float = HEAD_INIT_SCALE,
                  labels: list[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """-> (transformers ConvNextV2 state_dict, its config dict, fresh timm keys). num_classes 0 gives
    ConvNextV2Model keys; otherwise ConvNextV2ForImageClassification keys (labels: id2label's names)."""
    sd, fresh = timm_classifier_state_dict(weights, num_classes, head_init_scale)
    k = int(sd["head.fc.weight"].shape[0]) if "head.fc.weight" in sd else 0
    return timm_to_hf(sd, base_model=k == 0), hf_config(weights.arch, k, labels), fresh


def write_json(path: str | os.PathLike, data: dict[str, Any] | list[Any]) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def write_hf(weights: EncoderWeights, dst: str | os.PathLike, num_classes: int | None = None,
             head_init_scale: float = HEAD_INIT_SCALE, labels: list[str] | None = None,
             preprocessor: dict[str, Any] | None = None) -> list[str]:
    """Write a transformers ConvNextV2 state_dict to a file (.safetensors/.pth/.pt), or, when dst has no suffix, a
    folder `from_pretrained` reads offline (config.json with id2label from `labels` + model.safetensors, and
    preprocessor_config.json when `preprocessor` is given: convnextv2.checkpoint.hub) -> the fresh keys."""
    sd, config, fresh = hf_state_dict(weights, num_classes, head_init_scale, labels)
    dst = Path(dst)
    if dst.suffix:
        save_state_dict(sd, dst)
    else:
        with atomic_folder(dst) as tmp:  # all of the folder or none of it
            save_state_dict(sd, tmp / "model.safetensors")
            write_json(tmp / "config.json", config)
            if preprocessor is not None:
                write_json(tmp / "preprocessor_config.json", preprocessor)
    return fresh
