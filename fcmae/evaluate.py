"""Top-1 / top-5 and per-class accuracy of a classifier checkpoint on a val split (the `fcmae eval` command:
fcmae.commands.evaluate).

CKPT: a fine-tune checkpoint (best.pt, best-ema.pt, last.pt; `ema=true` takes last.pt's EMA weights) or an exported
timm classifier (model.safetensors). The data settings default to the ones the checkpoint was trained with.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from convnextv2.checkpoint import EncoderWeights
from convnextv2.encoder import encoder_patch_size
from fcmae.data.folder import ImageFiles, imagefolder_samples, is_imagefolder
from fcmae.data.labeled import DIGIT_CLASSES, build_splits, eval_transform, normalization, val_samples
from fcmae.engine.distributed import cleanup_distributed, init_distributed
from fcmae.export import trained_data
from fcmae.config import NotSetError
from fcmae.finetune_config import FinetuneDataConfig, check_image_size
from fcmae.metrics import ClassificationMeter

DATA_KEYS = ("path", "train_path", "val_path", "format", "image_size", "crop_pct", "mean", "std", "digits_per_class",
             "digits_val", "eval_batch_size", "num_workers")


@dataclass
class EvalConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    ema: bool = False  # from a training checkpoint (last.pt), evaluate its EMA weights
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)

    def check(self) -> None:
        d = self.data
        d.check()  # every value (the image size against the smallest patch size: the model's own is in `evaluate`)
        if d.format != "digits" and not (d.path or d.val_path):
            raise NotSetError("data.path is not set; give the val ImageFolder (or a root with val/), or "
                              "data.val_path")


def checkpoint_path(path: str) -> str:
    """CKPT as given -> the file to read: a file, or a folder holding an export's model.safetensors (a fine-tune's
    output_dir, a `fcmae convert --to hf` folder); ValueError for anything else."""
    if os.path.isdir(path):
        inner = os.path.join(path, "model.safetensors")
        if not os.path.isfile(inner):
            raise ValueError(f"checkpoint {path!r} is a folder without model.safetensors; give the checkpoint file "
                             "(best.pt, best-ema.pt, model.safetensors)")
        return inner
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} is not a file")
    return path


def classifier_from_weights(weights: EncoderWeights, where: str) -> torch.nn.Module:
    """The timm classifier holding `weights`, which must be a complete one (head.norm and head.fc); `where` names
    their source in errors."""
    from convnextv2.checkpoint import timm_classifier_state_dict
    from convnextv2.encoder import create_convnextv2

    fc = weights.state_dict.get("head.fc.weight")
    if fc is None:
        raise ValueError(f"{where!r} has no classifier (head.fc): it is an encoder; fine-tune it first "
                         "(fcmae finetune)")
    if weights.arch.name is None:
        raise ValueError(f"{where!r} holds {weights.arch.describe()}, which matches no timm convnextv2_* model")
    sd, fresh = timm_classifier_state_dict(weights, int(fc.shape[0]))
    if fresh:
        raise ValueError(f"{where!r} lacks {', '.join(fresh)}; it is not a complete classifier")
    model = create_convnextv2(weights.arch.name, weights.arch.patch_size, num_classes=int(fc.shape[0]),
                              in_chans=weights.arch.in_chans)
    model.load_state_dict(sd, strict=True)
    return model


def load_classifier(path: str, ema: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    """-> (timm classifier with the checkpoint's weights, the raw checkpoint dict or {} for a bare state_dict)."""
    from convnextv2.checkpoint import load_file, read_encoder

    raw = load_file(path)
    meta = raw if isinstance(raw, dict) and "model" in raw else {}
    src: Any = raw
    if ema:
        if "ema" not in meta:
            raise ValueError(f"{path!r} holds no EMA weights (only a training last.pt does); use best-ema.pt or "
                             "model-ema.safetensors without ema=true (fcmae eval) / --ema (fcmae predict)")
        src = {"model": meta["ema"]}
    return classifier_from_weights(read_encoder(src, where=f"{path} (EMA)" if ema else path), path), meta


def read_classifier(path: str, ema: bool = False) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any], str | None]:
    """-> (the classifier, meta with its `classes` if known, the data keys (DATA_KEYS) it was trained with: its
    preprocessing, a line saying where an exported file's preprocessing came from: None for this project's
    checkpoints, whose config holds it)."""
    model, meta = load_classifier(path, ema)
    if meta:
        trained = {k: v for k, v in trained_data(meta, path).items() if k in DATA_KEYS}
        return model, meta, trained, None
    trained, meta, said = exported_preprocessing(path, model)  # what an exported file carries (metadata, config.json)
    return model, meta, trained, said


def exported_preprocessing(path: str, model: torch.nn.Module) -> tuple[dict[str, Any], dict[str, Any], str]:
    """-> (data defaults, meta with the classes, a line saying where they came from) of an exported classifier:
    image_size, crop_pct, mean, std from timm's pretrained_cfg (safetensors metadata, else config.json beside it)."""
    from convnextv2.checkpoint.hub import read_hub_config

    found = read_hub_config(path)
    if found is None:
        return {}, {}, (f"{path} carries no preprocessing (no timm config.json beside it or in its metadata): "
                        "data.* defaults apply (224 px, crop_pct 0.875, ImageNet mean/std) unless you set them")
    cfg, where = found
    pc = cfg["pretrained_cfg"]
    if (cfg.get("architecture"), cfg.get("num_classes")) != (model.pretrained_cfg.get("architecture"),
                                                             model.num_classes):
        return {}, {}, (f"{where} describes another model ({cfg.get('architecture')}, {cfg.get('num_classes')} "
                        "classes): ignored; data.* defaults apply")
    try:
        data = {"image_size": int(pc["input_size"][-1]), "crop_pct": float(pc.get("crop_pct", 0.875))}
        data.update({k: [float(v) for v in pc[k]] for k in ("mean", "std") if k in pc})
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: its pretrained_cfg is not timm's (input_size, crop_pct, mean, std: "
                         f"{type(e).__name__}: {e}); re-export the file (fcmae convert) or fix it") from None
    labels = cfg.get("label_names") or pc.get("label_names")
    meta = {"classes": list(labels)} if labels and len(labels) == model.num_classes else {}
    return data, meta, (f"preprocessing from {where}: {data['image_size']} px, crop_pct {data['crop_pct']}, "
                        f"{pc.get('interpolation', 'bicubic')}, mean {data.get('mean')}, std {data.get('std')}"
                        + (f", {len(labels)} class names" if meta else ""))


def eval_dataset(d: FinetuneDataConfig, classes: list[str] | None, in_chans: int = 3) -> tuple[ImageFiles, list[str]]:
    """The val split as `in_chans`-channel images: digits' held-out images, or an ImageFolder (data.val_path,
    data.path/val, or data.path)."""
    if d.format == "digits":
        return build_splits(d, 0, train=False, in_chans=in_chans).val, list(DIGIT_CLASSES)
    root = d.val_path or (os.path.join(d.path, "val") if os.path.isdir(os.path.join(d.path, "val")) else d.path)
    if not os.path.isdir(root) or not is_imagefolder(root):
        raise ValueError(f"{root!r} is not an ImageFolder (class subfolders); give data.path or data.val_path")
    if classes is None:  # a bare exported file: classes are the sorted subfolders
        classes = imagefolder_samples(root)[2]
    files, labels = val_samples(root, classes)
    return ImageFiles(files, classifier_transform(d, in_chans), in_chans, labels), classes


def classifier_transform(d: FinetuneDataConfig, in_chans: int):
    """The eval transform of `d` for `in_chans` channels: resize the short side to image_size / crop_pct (bicubic),
    center crop image_size, normalise with data.mean / data.std (ImageNet's by default) -> (in_chans, S, S)."""
    return eval_transform(d.image_size, d.crop_pct, *normalization(d, in_chans), in_chans)


def evaluate(ckpt: str, cfg: EvalConfig, meta: dict | None = None, model=None) -> tuple[ClassificationMeter, list[str]]:
    from fcmae.engine.loop import amp_dtype
    from fcmae.finetune import evaluate_model, val_loader

    info = init_distributed(cfg.device)
    try:
        if model is None:
            model, meta = load_classifier(ckpt, cfg.ema)
        check_image_size(cfg.data.image_size, encoder_patch_size(model), " of the model")
        dataset, classes = eval_dataset(cfg.data, (meta or {}).get("classes"), model.stem[0].in_channels)
        k = model.num_classes
        if len(classes) != k:
            raise ValueError(f"the model has {k} outputs but the data has {len(classes)} classes; give the val split "
                             "of the data it was trained on")
        loader = val_loader(dataset, cfg.data.eval_batch_size, cfg.data.num_workers, info)
        meter = evaluate_model(model.to(info.device), loader, k, info.device, amp_dtype(cfg.amp, info.device))
        return meter, classes
    finally:
        cleanup_distributed()


def format_report(meter: ClassificationMeter, classes: list[str]) -> str:
    s = meter.summary()
    lines = [f"top-1 {s['top1']:.2f}  top-5 {s['top5']:.2f}  ({s['count']} images)", "",
             f"{'class':>5}  {'name':<20} {'images':>6}  {'top-1':>6}"]
    for c, n, acc in meter.per_class():
        lines.append(f"{c:>5}  {classes[c][:20]:<20} {n:>6}  {acc:>6.2f}")
    return "\n".join(lines)
