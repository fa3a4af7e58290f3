"""ONNX export of a ConvNeXt V2 checkpoint (`fcmae convert SRC DST.onnx --to onnx | onnx-backbone`).

What is exported: the dense timm model in eval mode (no mask, no sparse backend: what the encoder computes on whole
images), float32, by torch's torch.export-based exporter (`torch.onnx.export(..., dynamo=True)`, which needs
onnxscript) at opset ONNX_OPSET. One input, `image` (batch, in_chans, height, width), normalised as the checkpoint was
trained; batch, height and width are dynamic (traced at the checkpoint's eval size). Outputs:
- `--to onnx`: `logits` (batch, num_classes) of the classifier SRC holds (no softmax);
- `--to onnx-backbone`: `stage0` .. `stage3`, the four stage outputs of timm's `features_only` model
  (out_indices (0, 1, 2, 3): strides patch/8, patch/4, patch/2, patch); `stage3.mean((2, 3))` is `fcmae embed`'s vector.
The model's metadata (key `timm_config`) holds timm's config.json (convnextv2.checkpoint.hub): input size, mean, std,
crop_pct, interpolation, class names. Before DST appears, onnxruntime runs the file and must match torch.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convnextv2.checkpoint import EncoderWeights

ONNX_OPSET = 18  # the torch.export-based exporter's own opsets start at 18 (older ones go through a converter)
ONNX_TARGETS = ("onnx", "onnx-backbone")
INPUT = "image"
STAGES = [f"stage{i}" for i in range(4)]
CHECK_TOLERANCE = 1e-3  # max |onnxruntime - torch| / max(1, max |torch|): float noise is ~1e-6, a wrong graph O(1)


def require_onnx(to: str) -> None:
    """ValueError, one line naming what to install, unless the exporter's and the check's packages import."""
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ValueError(f"--to {to} needs {', '.join(missing)}: pip install onnx onnxscript onnxruntime (this "
                         "project's `onnx` extra: pip install -e '.[onnx]')")


def check_onnx_args(to: str, dst: Path, num_classes: int | None) -> None:
    """The ONNX side of `fcmae convert`'s checks, before SRC is read: DST's suffix, options, packages."""
    if dst.suffix == ".onnx" and to not in ONNX_TARGETS:
        raise ValueError(f"{dst} is an ONNX file name: add --to onnx (the classifier) or --to onnx-backbone (the "
                         "encoder's stage outputs)")
    if to not in ONNX_TARGETS:
        return
    if dst.suffix != ".onnx":
        raise ValueError(f"--to {to} writes an ONNX file: name DST *.onnx, not {dst.name}")
    if num_classes is not None:
        raise ValueError(f"--to {to} exports the model SRC holds as it is: leave out --num-classes")
    require_onnx(to)


def onnx_module(weights: EncoderWeights, src: str, backbone: bool) -> tuple[nn.Module, list[str]]:
    """-> (the dense timm model to export, in eval mode; its output names)."""
    from timm.models import FeatureListNet

    from convnextv2.checkpoint import timm_classifier_state_dict
    from convnextv2.checkpoint.convert import require_name
    from convnextv2.encoder import create_convnextv2
    from fcmae.evaluate import classifier_from_weights

    if not backbone:
        if "head.fc.weight" not in weights.state_dict:
            raise ValueError(f"{src} has no classifier (head.fc): --to onnx-backbone exports its encoder, or "
                             "fine-tune it first (fcmae finetune)")
        return classifier_from_weights(weights, src).eval(), ["logits"]
    arch = weights.arch
    model = create_convnextv2(require_name(arch), arch.patch_size, in_chans=arch.in_chans, num_classes=0)
    model.load_state_dict(timm_classifier_state_dict(weights, num_classes=0)[0], strict=True)
    # timm's features_only model, as `timm.create_model(..., features_only=True)` wraps it (the names' feature_cfg)
    return FeatureListNet(model, out_indices=(0, 1, 2, 3), flatten_sequential=True).eval(), STAGES


def export_config(weights: EncoderWeights, raw: Any, src: str, backbone: bool, num_classes: int) -> dict[str, Any]:
    """timm's config.json for the export: a fine-tune checkpoint's, else the one an exported SRC carries (safetensors
    metadata, config.json beside it) if it describes this model, else `trained_settings`'s (224 px, crop_pct 0.875,
    the default statistics for a file of unknown training). A backbone's has its stage channels and strides."""
    from convnextv2.checkpoint.convert import feature_info
    from convnextv2.checkpoint.hub import read_hub_config, timm_backbone_config, timm_hub_config
    from fcmae.export import checkpoint_exports, trained_settings

    arch = weights.arch
    size, crop_pct, mean, std = trained_settings(raw, arch.in_chans)
    exports = checkpoint_exports(raw)
    found = read_hub_config(src)
    carried = found[0] if found and found[0].get("architecture") == arch.timm_name else None
    if backbone:
        if exports is None and carried is not None:
            pc = carried["pretrained_cfg"]
            size, mean, std = int(pc["input_size"][-1]), pc["mean"], pc["std"]
        return timm_backbone_config(arch.timm_name, arch.in_chans, feature_info(arch), size, mean, std)
    if exports and exports[0]["num_classes"] == num_classes:
        return exports[0]
    if carried is not None and carried.get("num_classes") == num_classes:
        return carried
    return timm_hub_config(arch.timm_name, num_classes, arch.in_chans, size, crop_pct, mean, std)


def export_program(model: nn.Module, example: torch.Tensor, output_names: list[str]):
    """torch.onnx.export (torch.export-based, opset ONNX_OPSET) with dynamic batch, height and width ->
    torch.onnx.ONNXProgram. example: (2, C, S, S) (a batch of 1 would be specialised, not traced as dynamic)."""
    import onnxscript
    from torch.export import Dim

    dims = {0: Dim("batch"), 2: Dim("height"), 3: Dim("width")}
    try:
        return torch.onnx.export(model, (example,), dynamo=True, opset_version=ONNX_OPSET, input_names=[INPUT],
                                 output_names=output_names, dynamic_shapes=(dims,), verbose=False)
    except Exception as e:  # noqa: BLE001 - whatever the exporter raises: one line, not a traceback
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"torch {torch.__version__}'s ONNX exporter (onnxscript {onnxscript.__version__}) failed: "
                         f"{type(e).__name__}: {first}; please report it with these versions") from None


def onnxruntime_error(path: str, model: nn.Module, x: torch.Tensor) -> float:
    """max |onnxruntime - torch| over every output for input x (N, C, H, W), divided by max(1, max |torch|)."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT: x.numpy()})
    with torch.no_grad():
        want = model(x)
    want = list(want) if isinstance(want, (list, tuple)) else [want]
    return max(float(abs(g - w.numpy()).max()) / max(1.0, float(w.abs().max())) for g, w in zip(got, want))


def save_checked(program, dst: Path, metadata: dict[str, str], model: nn.Module, x: torch.Tensor) -> float:
    """Save `program` with `metadata` into a temp folder beside dst, check it with onnxruntime on x, then move it into
    place (weights over 2 GB go to DST.data, as the exporter names them; the .onnx moves last): a reader never sees
    half an export, a failed check leaves nothing -> the checked error."""
    from convnextv2.checkpoint.io import TMP_PREFIX, writing

    program.model.metadata_props.update(metadata)
    with writing(dst):  # a full disk, a read-only folder: one WriteError naming DST
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{dst.name}.", dir=dst.parent)
    try:
        path = os.path.join(tmp, dst.name)
        with writing(dst):
            program.save(path)
        err = onnxruntime_error(path, model, x)
        if not err <= CHECK_TOLERANCE:
            raise ValueError(f"the ONNX export of {dst.name} differs from torch by {err:.2g} (relative) in "
                             "onnxruntime; nothing written: please report it with the versions of torch, onnxscript "
                             "and onnxruntime")
        with writing(dst):
            for name in sorted(os.listdir(tmp), key=lambda n: n == dst.name):
                with open(os.path.join(tmp, name), "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(os.path.join(tmp, name), dst.parent / name)
        return err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def onnx_load_line(path: str, in_chans: int, size: int, backbone: bool) -> str:
    """One line of Python that runs the export in onnxruntime on a zero image, to paste as printed."""
    outputs = f"{', '.join(STAGES)} = session.run(None, " if backbone else "logits = session.run(None, "
    return (f"import onnxruntime as ort, numpy as np; session = ort.InferenceSession({path!r}, "
            f"providers=['CPUExecutionProvider']); {outputs}{{{INPUT!r}: np.zeros((1, {in_chans}, {size}, {size}), "
            f"np.float32)}}){'' if backbone else '[0]'}")


def write_onnx_export(weights: EncoderWeights, raw: Any, src: str, dst: Path, backbone: bool) -> dict[str, Any]:
    """Export SRC's model to DST.onnx (checked in onnxruntime, written atomically) and print what it holds and its
    onnxruntime line -> {"weights", "fresh": [], "path"}."""
    import onnxruntime

    arch = weights.arch
    model, outputs = onnx_module(weights, src, backbone)
    k = 0 if backbone else model.num_classes
    config = export_config(weights, raw, src, backbone, k)
    pc = config["pretrained_cfg"]
    size = int(pc["input_size"][-1])
    example = torch.randn(2, arch.in_chans, size, size, generator=torch.Generator().manual_seed(0))
    program = export_program(model, example, outputs)
    x = torch.randn(3, arch.in_chans, size, size, generator=torch.Generator().manual_seed(1))
    err = save_checked(program, dst, {"timm_config": json.dumps(config)}, model, x)
    shapes = ", ".join(f"{n} (batch, {s['num_chs']}, height/{s['reduction']}, width/{s['reduction']})"
                       for n, s in zip(outputs, config["feature_info"])) if backbone else f"logits (batch, {k})"
    labels = f", {len(config['label_names'])} class names" if config.get("label_names") else ""
    print(f"wrote {dst}: ONNX opset {ONNX_OPSET}, timm {arch.timm_name} {'backbone' if backbone else 'classifier'} "
          f"(dense, eval mode): {INPUT} (batch, {arch.in_chans}, height, width) float32 -> {shapes}; batch, height "
          f"and width dynamic")
    print(f"  metadata timm_config: {size} px, crop_pct {pc['crop_pct']}, mean {pc['mean']}, std {pc['std']}{labels}")
    print(f"  onnxruntime {onnxruntime.__version__} = torch within {err:.1g} (batch 3, {size} x {size})")
    print(f"  load: {onnx_load_line(str(dst), arch.in_chans, size, backbone)}")
    return {"weights": weights, "fresh": [], "path": dst}
