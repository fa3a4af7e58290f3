"""This project's checkpoints carry a header (`format`, `model_args`) beside their weights: the model it describes is
built on the meta device (no memory, no init) and the weights are checked against it before any of them is used
(convnextv2.checkpoint.validate: every key's shape, a floating dtype, finite values), and the header against what
the tensors hold (size, in_chans, patch size, decoder width and depth, classes).

Readers: `fcmae visualize` (an FCMAE checkpoint), resuming a run (the model and the EMA of a training checkpoint),
model.init of pretrain and finetune (`read_model_init`: any format, through `read_encoder`).
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any

import torch

from convnextv2.checkpoint import CheckpointError, infer_arch
from convnextv2.checkpoint.validate import REEXPORT, check_header, check_state_dict, header_claims
from fcmae.export import FINETUNE_FORMAT

FCMAE_FORMAT = "fcmae"
MODEL_ARGS = {  # the header's model_args each format's model is built from (others are ignored)
    FCMAE_FORMAT: ("encoder_name", "in_chans", "mask_ratio", "decoder_dim", "decoder_depth", "norm_pix_loss",
                   "patch_size"),
    FINETUNE_FORMAT: ("name", "num_classes", "in_chans", "patch_size"),
}


def read_model_init(path: str) -> tuple[Any, Any]:
    """model.init=PATH, any format `read_encoder` reads -> (the loaded file, its checked EncoderWeights); a ValueError
    line naming model.init for a file that cannot be used."""
    from convnextv2.checkpoint import load_file, read_encoder

    where = f"model.init={path!r}"
    try:
        raw = load_file(path)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return raw, read_encoder(raw, where=where)


def model_shapes(fmt: str, model_args: dict[str, Any], where: str) -> dict[str, torch.Size]:
    """Parameter shapes of the model a `fmt` header's model_args build (FCMAE, or the fine-tune's timm classifier)."""
    args = {k: v for k, v in model_args.items() if k in MODEL_ARGS[fmt]}
    try:
        with torch.device("meta"):
            if fmt == FCMAE_FORMAT:
                from fcmae.model import FCMAE

                model = FCMAE(**args)
            else:
                from convnextv2.encoder import create_convnextv2

                model = create_convnextv2(args.get("name"), args.get("patch_size") or 32,
                                          num_classes=args.get("num_classes"), in_chans=args.get("in_chans") or 3)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{where}: its model_args {args} describe no model ({e}); give a checkpoint a "
                              "`fcmae pretrain` or `fcmae finetune` run wrote") from None
    return {k: v.shape for k, v in model.state_dict().items()}


def _state_dict_problem(sd: Any) -> str | None:
    if not isinstance(sd, dict) or not sd:
        return "is missing" if sd is None else "is empty" if isinstance(sd, dict) else f"is a {type(sd).__name__}"
    key = next((k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    return None if key is None else f"holds a {type(sd[key]).__name__} under {key!r}, not a tensor"


def _decoder_claims(model_args: dict[str, Any], sd: dict[str, torch.Tensor]) -> list[str]:
    """What the header says of the FCMAE decoder that its tensors do not hold. The width is the one most of its
    per-channel tensors have (one wrong tensor is left to the shape check to name)."""
    pattern = re.compile(r"decoder\.(proj\.(weight|bias)|blocks\.\d+\.(conv_dw|norm)\.(weight|bias))")
    widths = Counter(int(v.shape[0]) for k, v in sd.items() if pattern.fullmatch(k) and v.ndim > 0)
    have = {"decoder_dim": widths.most_common(1)[0][0] if widths else None,
            "decoder_depth": len({m[1] for k in sd if (m := re.match(r"decoder\.blocks\.(\d+)\.", k))})}
    return [f"{k} {model_args[k]!r}, the tensors {have[k]!r} (read off its decoder)" for k in have
            if k in model_args and have[k] is not None and str(model_args[k]) != str(have[k])]


def check_header_against_tensors(fmt: str, model_args: dict[str, Any], sd: dict[str, torch.Tensor],
                                 where: str) -> None:
    """CheckpointError unless what the header says (size, in_chans, patch size; the FCMAE decoder's width and depth;
    the classifier's classes) is what the tensors hold."""
    encoder = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")} if fmt == FCMAE_FORMAT else sd
    try:
        arch = infer_arch(encoder)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    claims = header_claims(model_args, "encoder_name" if fmt == FCMAE_FORMAT else "name")
    fc = sd.get("head.fc.weight")
    if fmt == FINETUNE_FORMAT and "num_classes" in model_args:
        claims["num_classes"] = model_args["num_classes"]
    check_header(claims, arch, where, "header (model_args)", int(fc.shape[0]) if fc is not None and fc.ndim else 0)
    differs = _decoder_claims(model_args, sd) if fmt == FCMAE_FORMAT else []
    if differs:
        raise CheckpointError(f"{where}: its header (model_args) says {'; '.join(differs)}: the header and the "
                              "weights disagree (an edited or mixed-up file); save the weights with the header of "
                              "the model they are")


def check_model_state(sd: Any, fmt: str, model_args: dict[str, Any] | None, where: str,
                      run_args: dict[str, Any] | None = None, what: str = "model",
                      shapes: dict[str, torch.Size] | None = None, fix: str = REEXPORT) -> None:
    """The whole check of a `fmt` checkpoint's state_dict `sd` (its `what` entry: model, ema) before it is loaded:
    a dict of tensors, its header's `model_args` describing its tensors (this project's formats), and every key,
    shape, dtype and value those of the model `run_args` (default: the header's own model_args) build, or of
    `shapes` when given (a live model's). One CheckpointError line, ending in `fix` for a key or shape that does not
    fit."""
    problem = _state_dict_problem(sd)
    if model_args is not None and not isinstance(model_args, dict):
        problem = f"comes with model_args that are a {type(model_args).__name__}, not a mapping"
    if problem is not None:
        raise CheckpointError(f"{where}: its {what!r} state_dict {problem}; give a checkpoint a `fcmae pretrain` or "
                              "`fcmae finetune` run wrote")
    args = dict(run_args if run_args is not None else model_args or {})
    fc = sd.get("head.fc.weight")
    if fmt == FINETUNE_FORMAT and args.get("num_classes") is None and fc is not None and fc.ndim:
        args["num_classes"] = int(fc.shape[0])  # an old header without it: the head says
    label = f"{where} ({what})" if what != "model" else where
    if model_args and fmt in MODEL_ARGS:
        check_header_against_tensors(fmt, model_args, sd, label)
    shown = ", ".join(f"{k} {v}" for k, v in args.items() if k in MODEL_ARGS.get(fmt, args))
    if shapes is None:
        shapes = model_shapes(fmt, args, label)
    check_state_dict(sd, shapes, label, f"the model ({shown or 'defaults'})", fix)
