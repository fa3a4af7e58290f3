"""`fcmae convert SRC DST`: any ConvNeXt V2 checkpoint -> a timm classifier, a timm backbone (the encoder for
detection / segmentation), a Hugging Face state_dict, an FCMAE checkpoint with a fresh decoder (to continue
pretraining from released weights), or an ONNX file of the dense classifier / backbone (fcmae.onnx_export).

The reading, detection and format rules live in `convnextv2.checkpoint`, the FCMAE side in fcmae.convert.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from convnextv2.checkpoint import (
    EncoderWeights, detect, load_file, read_encoder, save_state_dict, save_torch, timm_classifier_state_dict,
    timm_metadata, write_hf,
)
from convnextv2.checkpoint.convert import require_name
from convnextv2.checkpoint.io import WEIGHT_SUFFIXES, check_weights_suffix
from convnextv2.checkpoint.hub import metadata
from convnextv2.timm_names import load_line
from fcmae.convert import fcmae_checkpoint, fcmae_from_encoder
from fcmae.engine.config import check_at_least, check_writable_dir, check_writable_file
from fcmae.export import checkpoint_exports, trained_data, trained_settings, write_backbone_export
from fcmae.onnx_export import ONNX_TARGETS, check_onnx_args, write_onnx_export


def _parts(keys: list[str]) -> str:
    return ", ".join(sorted({k.rsplit(".", 1)[0] for k in keys})) or "nothing"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a ConvNeXt V2 checkpoint (any format) to timm, Hugging Face or FCMAE",
        description="Read a ConvNeXt V2 checkpoint in any supported format (this project's FCMAE checkpoints, timm, "
        "the reference repo's dense / pt_only / MinkowskiEngine files, Hugging Face transformers; .pth/.pt or "
        ".safetensors), detect its format and size, and write it as a timm classifier (head.norm/head.fc fresh "
        "unless the source has them; head init scale 0.001), a timm backbone (no classifier; with its stage channels "
        "and strides, for timm's features_only), a Hugging Face ConvNextV2 state_dict, an FCMAE checkpoint with a "
        "fresh decoder, or an ONNX file (--to onnx: the classifier's logits; --to onnx-backbone: the four stage "
        "outputs; opset 18, dynamic batch and image size, checked in onnxruntime). Files are only read with "
        "weights_only=True or safetensors. Prints the line that loads a timm output (the onnxruntime line for ONNX).",
    )
    p.add_argument("src", help="checkpoint to read")
    p.add_argument("dst", help="file to write: .safetensors (recommended for timm/hf), .pth or .pt; for --to hf a "
                   "path without suffix writes a from_pretrained folder, for --to backbone a timm local-dir folder; "
                   "--to fcmae needs .pt/.pth")
    p.add_argument("--to", choices=("timm", "backbone", "hf", "fcmae", *ONNX_TARGETS), default="timm",
                   help="output format (default timm); onnx: the classifier's logits, onnx-backbone: the encoder's "
                   "four stage outputs, as a DST.onnx file")
    p.add_argument("--model", default=None, help="expected timm name, e.g. convnextv2_tiny (default: inferred)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classifier outputs (default: the source's classifier, else 1000; 0 = no classifier)")
    p.add_argument("--ema", action="store_true", help="take the EMA weights of a fine-tune's last.pt")
    p.add_argument("--decoder-dim", type=int, default=512, help="--to fcmae: decoder width (default 512)")
    p.add_argument("--decoder-depth", type=int, default=1, help="--to fcmae: decoder blocks (default 1)")
    p.set_defaults(func=run)


def check_args(args: argparse.Namespace, dst: Path) -> None:
    """Every check of the command line, before SRC is read: DST's suffix for --to, the options, a writable DST."""
    check_onnx_args(args.to, dst, args.num_classes)
    if args.to == "fcmae" and dst.suffix not in (".pt", ".pth"):
        raise ValueError(f"an FCMAE checkpoint is a torch file: name it *.pt or *.pth, not {dst.name}")
    if args.to == "timm":
        check_weights_suffix(dst)
    if args.to == "backbone" and dst.suffix not in (*WEIGHT_SUFFIXES, ""):
        raise ValueError(f"cannot tell the file type of {dst}: name it *.safetensors (recommended), *.pth or *.pt, "
                         "or give a folder name without suffix")
    if args.to == "backbone" and not dst.suffix and dst.exists() and not dst.is_dir():
        raise ValueError(f"{dst} is a file; --to backbone writes a folder there: give a new folder name or a "
                         "*.safetensors")
    if args.to == "backbone" and args.num_classes is not None:
        raise ValueError("a backbone has no classifier: leave out --num-classes (or use --to timm)")
    check_at_least("--num-classes", args.num_classes, 0)
    check_at_least("--decoder-dim", args.decoder_dim, 1)
    check_at_least("--decoder-depth", args.decoder_depth, 0)
    if args.to == "hf" and not dst.suffix:  # a from_pretrained folder
        check_writable_dir(args.dst, "DST")
    else:
        check_writable_file(args.dst, "DST")


def read_source(args: argparse.Namespace) -> tuple[Any, EncoderWeights]:
    """SRC (its EMA weights with --ema), read and checked -> (the raw file, its encoder weights under timm keys)."""
    raw = load_file(args.src)
    if args.ema:
        if not (isinstance(raw, dict) and isinstance(raw.get("ema"), dict)):
            raise ValueError(f"{args.src} holds no EMA weights (only a fine-tune's last.pt has them; its best-ema.pt "
                             "and model-ema.safetensors are EMA weights already): leave out --ema")
        weights = read_encoder(detect({"model": raw["ema"]}, f"{args.src} (EMA)"), model=args.model)
    else:
        weights = read_encoder(detect(raw, args.src), model=args.model)
    trained_data(raw, args.src, weights.arch.in_chans)  # the preprocessing that travels along: checked before writing
    how = "as given by --model" if args.model else "inferred from tensor shapes"
    print(f"read {args.src}{' (EMA weights)' if args.ema else ''}: {weights.describe()} ({how})")
    for note in weights.notes:
        print(f"  {note}")
    return raw, weights


def run(args: argparse.Namespace) -> dict[str, Any]:
    dst = Path(args.dst)
    check_args(args, dst)
    raw, weights = read_source(args)
    require_name(weights.arch)
    if args.to == "fcmae":
        model, model_args = fcmae_from_encoder(weights, args.decoder_dim, args.decoder_depth)
        save_torch(fcmae_checkpoint(model, model_args), dst)
        print(f"wrote {dst}: FCMAE checkpoint {model_args} (decoder fresh, std .02)")
        return {"weights": weights, "fresh": ["decoder"]}
    if args.to == "backbone":
        return write_backbone_export(weights, raw, dst)
    if args.to in ONNX_TARGETS:
        return write_onnx_export(weights, raw, args.src, dst, backbone=args.to == "onnx-backbone")
    write = write_timm_export if args.to == "timm" else write_hf_export
    return {"weights": weights, "fresh": write(weights, raw, args.src, dst, args.num_classes)}


def write_timm_export(weights: EncoderWeights, raw: Any, src: str, dst: Path, num_classes: int | None) -> list[str]:
    """--to timm: a timm classifier state_dict (a fine-tune's preprocessing and class names in its metadata); prints
    its load line -> the fresh keys."""
    arch = weights.arch
    exports = checkpoint_exports(raw, src)
    sd, fresh = timm_classifier_state_dict(weights, num_classes)
    k = int(sd["head.fc.weight"].shape[0]) if "head.fc.weight" in sd else 0
    hub = exports[0] if exports and k == exports[0]["num_classes"] else None
    save_state_dict(sd, dst, {**timm_metadata(arch), **(metadata(hub) or {})})
    scale = " (head.fc init scale 0.001)" if "head.fc.weight" in fresh else ""
    print(f"wrote {dst}: timm {arch.timm_name} state_dict (patch size {arch.patch_size}), {k} classes; fresh: "
          f"{_parts(fresh)}{scale}" + ("; with its preprocessing and class names (safetensors metadata)"
                                       if hub and dst.suffix == ".safetensors" else ""))
    size = trained_settings(raw, arch.in_chans)[0]
    print(f"  load: {load_line(arch.name, arch.patch_size, arch.in_chans, str(dst), k, size)}")
    return fresh


def write_hf_export(weights: EncoderWeights, raw: Any, src: str, dst: Path, num_classes: int | None) -> list[str]:
    """--to hf: a transformers ConvNextV2 state_dict, or a from_pretrained folder (with a fine-tune's labels and
    preprocessor config) -> the fresh keys."""
    exports = checkpoint_exports(raw, src)
    k = num_classes if num_classes is not None else (
        int(weights.state_dict["head.fc.weight"].shape[0]) if "head.fc.weight" in weights.state_dict else 1000)
    labels, pre = (exports[2], exports[1]) if exports and k == exports[0]["num_classes"] else (None, None)
    fresh = write_hf(weights, dst, num_classes, labels=labels, preprocessor=pre)
    print(f"wrote {dst}: Hugging Face ConvNextV2 state_dict{' + config.json' if not dst.suffix else ''}; "
          f"fresh: {_parts(fresh)}" + (f"; build it with ConvNextV2Config(patch_size={weights.arch.stem_stride})"
                                       if weights.arch.stem_stride != 4 else ""))
    return fresh
