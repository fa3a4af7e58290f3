"""Supervised fine-tuning of a timm ConvNeXt V2 classifier (the `fcmae finetune` command: fcmae.commands.finetune).

The classification-specific part of the engine (fcmae.engine.loop): timm's model (drop path, head init scale), the
pretrained encoder loaded from any checkpoint format, layer-wise lr decay, Mixup/CutMix with soft-target CE or
label smoothing, EMA of the weights, top-1/top-5 of both model and EMA on the val split after every epoch, best /
best-EMA checkpoints, and the final weights exported in timm format.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Subset

from convnextv2.encoder import create_convnextv2
from fcmae.config import to_dict
from fcmae.data.build import SkipSampler
from fcmae.data.labeled import build_splits, python_seeded
from fcmae.engine import checkpoint as ckpt_io
from fcmae.engine.config import check_global_batch
from fcmae.engine.distributed import DistInfo, cleanup_distributed, init_distributed
from fcmae.engine.loop import amp_dtype, train
from fcmae.engine.resume import check_same_resume_everywhere, prepare_resume
from fcmae.engine.rundir import claim
from fcmae.engine.seeds import derive_seed
from fcmae.export import FINETUNE_FORMAT, timm_config
from fcmae.finetune_config import FinetuneConfig, check_image_size
from fcmae.layer_decay import param_groups
from fcmae.metrics import ClassificationMeter

FORMAT = FINETUNE_FORMAT  # header of finetune checkpoints (a timm state_dict under "model": every reader loads it)


def build_classifier(name: str, num_classes: int, drop_path: float = 0.0, head_init_scale: float = 1.0,
                     in_chans: int = 3, patch_size: int = 32) -> nn.Module:
    """timm's classifier at total stride patch_size (32 / 16 / 8: stem stride patch_size // 8, `create_convnextv2`)."""
    return create_convnextv2(name, patch_size, num_classes=num_classes, drop_path_rate=drop_path,
                             head_init_scale=head_init_scale, in_chans=in_chans)


def encoder_from_checkpoint(src: Any, where: str | None = None) -> tuple[nn.Module, Any]:
    """Any checkpoint fcmae reads (a path or a loaded dict; `where` names it in errors) -> (timm encoder with its
    weights, num_classes=0, in eval mode; the EncoderWeights read and checked). The model is built as fine-tuning
    builds it (`build_classifier`), so whatever the file implies (size, in_chans, stem stride) holds here too."""
    from convnextv2.checkpoint import load_encoder_weights, read_encoder
    from convnextv2.checkpoint.convert import require_name

    weights = read_encoder(src, where=where)
    arch = weights.arch
    model = build_classifier(require_name(arch), 0, in_chans=arch.in_chans, patch_size=arch.patch_size)
    load_encoder_weights(model, weights)
    return model.eval(), weights


def check_pretrained(path: str, name: str, in_chans: int | None = None, patch_size: int | None = None) -> Any:
    """Read a pretrained checkpoint (any format; every tensor checked) -> EncoderWeights; ValueError when it holds
    another size or another number of input channels than `in_chans` or another patch size (stem stride) than
    `patch_size` (None: any)."""
    from fcmae.headers import read_model_init

    weights = read_model_init(path)[1]
    if weights.arch.name != name:
        raise ValueError(f"model.init={path!r} holds {weights.arch.describe()}, but model.name={name}; use "
                         f"model.name={weights.arch.name} (configs/finetune/{str(weights.arch.name).split('_')[-1]}"
                         ".yaml) or a checkpoint of this size")
    if in_chans is not None and weights.arch.in_chans != in_chans:
        raise ValueError(f"model.init={path!r} was pretrained on {weights.arch.in_chans}-channel images, but "
                         f"model.in_chans={in_chans}; leave model.in_chans unset (null) to take the checkpoint's")
    a = weights.arch
    if patch_size is not None and a.patch_size != patch_size:
        raise ValueError(f"model.init={path!r} was pretrained with patch size {a.patch_size} (stem stride "
                         f"{a.stem_stride}), but model.patch_size={patch_size}; leave model.patch_size unset (null) to "
                         "take the checkpoint's")
    return weights


@torch.no_grad()
def evaluate_model(model: nn.Module, loader, num_classes: int, device: torch.device,
                   dtype: torch.dtype | None = None) -> ClassificationMeter:
    """Top-1/top-5/per-class counts of `model` over `loader` (batches (images, labels, ...)), summed over ranks."""
    was_training = model.training
    model.eval()
    meter = ClassificationMeter(num_classes, device)
    for batch in loader:
        imgs, target = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(imgs)
        meter.update(logits.float(), target)
    meter.all_reduce()
    model.train(was_training)
    return meter


def val_loader(dataset, batch_size: int, num_workers: int, info: DistInfo) -> DataLoader:
    """This process's share (rank::world_size, no padding, so the summed counts are exact) of the val set."""
    part = Subset(dataset, list(range(info.rank, len(dataset), info.world_size)))
    return DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=info.device.type == "cuda")


class FinetuneTask:
    """Classification fine-tuning as a `fcmae.engine.loop.Task` (with the evaluate / EMA / extra-state hooks).

    resumed: the header of the checkpoint the run resumes from; the weights come from it, so model.init is not read
    (it may be gone) and the input channels are the checkpoint's."""

    outputs = ("best.pt", "best-ema.pt", "model.safetensors", "model-ema.safetensors", "config.json", "classes.json")

    def __init__(self, cfg: FinetuneConfig, info: DistInfo, resumed: dict[str, Any] | None = None):
        self.cfg, self.info = cfg, info
        m, d, a = cfg.model, cfg.data, cfg.aug
        weights = None
        if m.init != "none" and resumed is None:
            weights = check_pretrained(m.init, m.name, m.in_chans, m.patch_size)  # fails before data
        resumed_args = (resumed or {}).get("model_args") or {}
        self.in_chans = m.in_chans or resumed_args.get("in_chans") or (weights.arch.in_chans if weights is not None else 3)
        self.patch_size = m.patch_size or resumed_args.get("patch_size") or (
            weights.arch.patch_size if weights is not None else 32)
        if m.patch_size is None and weights is not None:  # all of this fails before any data is read
            check_image_size(d.image_size, self.patch_size, f" the checkpoint {m.init} was pretrained with")
        self.splits = build_splits(d, cfg.seed, in_chans=self.in_chans)
        self.classes = self.splits.classes
        k = len(self.classes)
        if m.num_classes is not None and m.num_classes != k:
            raise ValueError(f"model.num_classes={m.num_classes} but the training data has {k} classes "
                             f"({', '.join(self.classes[:10])}{' ...' if k > 10 else ''}); set model.num_classes={k} "
                             "or leave it unset")
        self.num_classes = k
        self.micro_batch = check_global_batch(d.batch_size, cfg.optim.accum_steps, info.world_size)
        self.global_batch = d.batch_size
        n = len(self.splits.train) // info.world_size * info.world_size
        self.steps_per_epoch = n // (self.micro_batch * info.world_size * cfg.optim.accum_steps)
        if self.steps_per_epoch < 1:
            raise ValueError(f"{len(self.splits.train)} training images is less than one global batch "
                             f"({d.batch_size}); lower data.batch_size or add images")

        torch.manual_seed(cfg.seed)  # identical initial weights on every process
        self.model = build_classifier(m.name, k, m.drop_path, m.head_init_scale, self.in_chans, self.patch_size)
        self.load_info = None
        if weights is not None:
            from convnextv2.checkpoint import load_encoder_weights

            self.load_info = load_encoder_weights(self.model, weights, head_init_scale=m.head_init_scale)
        torch.manual_seed(derive_seed(cfg.seed, info.rank))
        self.model.to(info.device)
        self.ema = ModelEmaV3(self.model, decay=cfg.ema.decay, device=info.device) if cfg.ema.enabled else None

        self.mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.switch_prob,
                           mode="batch", label_smoothing=a.smoothing, num_classes=k) if a.mixing else None
        if self.mixup is not None:
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif a.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(a.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.val = val_loader(self.splits.val, d.eval_batch_size, d.num_workers, info)
        self.dtype = amp_dtype(cfg.amp, info.device)
        self.best = {"top1": -1.0, "epoch": -1, "ema_top1": -1.0, "ema_epoch": -1}
        self.exported: dict[str, str] | None = None  # by `finish`, once trained

    # --- Task protocol -------------------------------------------------------------------------------------------
    def param_groups(self, weight_decay: float) -> list[dict]:
        o = self.cfg.optim
        return param_groups(self.model, weight_decay, o.layer_decay, o.layer_decay_scheme)

    def batches(self, epoch: int, skip_micro: int):
        ds, info, workers = self.splits.train, self.info, self.cfg.data.num_workers
        ds.set_epoch(epoch)
        sampler = SkipSampler(ds, info.world_size, info.rank, self.cfg.seed, skip=skip_micro * self.micro_batch)
        sampler.set_epoch(epoch)
        return DataLoader(ds, batch_size=self.micro_batch, sampler=sampler, drop_last=True, num_workers=workers,
                          pin_memory=info.device.type == "cuda", prefetch_factor=4 if workers else None)

    def loss(self, model: nn.Module, batch: Any, epoch: int, micro: int) -> torch.Tensor:
        device = self.info.device
        imgs, target = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if self.cfg.channels_last:
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        seed = derive_seed(self.cfg.seed, epoch, micro, self.info.rank)
        if self.mixup is not None:
            with python_seeded(seed):  # timm's Mixup draws lambda and the cut box from numpy
                imgs, target = self.mixup(imgs, target)
        # drop path draws from torch's RNG: seed it per micro-batch, so a resumed run draws the same masks
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            logits = model(imgs)
        return self.criterion(logits.float(), target)

    def skipped(self, batch: Any) -> int:
        return int(batch[2].sum())

    def checkpoint_header(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": 1, "classes": list(self.classes),
                "model_args": {"name": self.cfg.model.name, "num_classes": self.num_classes, "in_chans": self.in_chans,
                               "patch_size": self.patch_size}}

    def after_step(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=step)

    def evaluate(self, epoch: int) -> dict[str, float]:
        """Top-1/top-5 of the model (and the EMA) on the val split, on every process; rank 0 writes best*.pt.
        Every `data.eval_every_epochs` epochs and after the last (nothing in between: a short run saves its time)."""
        every, last = self.cfg.data.eval_every_epochs, epoch + 1 == self.cfg.optim.epochs
        if (epoch + 1) % every and not last:
            return {}
        out = {}
        models = [("", self.model)] + ([("ema_", self.ema.module)] if self.ema is not None else [])
        for prefix, model in models:
            s = evaluate_model(model, self.val, self.num_classes, self.info.device, self.dtype).summary()
            out[prefix + "top1"], out[prefix + "top5"] = s["top1"], s["top5"]
            if s["top1"] > self.best[prefix + "top1"]:
                self.best[prefix + "top1"], self.best[prefix + "epoch"] = s["top1"], epoch + 1
                if self.info.is_main:
                    name = "best-ema.pt" if prefix else "best.pt"
                    self.save_weights(model, os.path.join(self.cfg.output_dir, name), epoch + 1, s)
        out["best_top1"] = self.best["top1"]
        if self.ema is not None:
            out["best_ema_top1"] = self.best["ema_top1"]
        return out

    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"best": dict(self.best)}
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.best.update(state.get("best", {}))
        if self.ema is not None:
            if "ema" not in state:
                raise ValueError("the checkpoint to resume from has no EMA weights; set ema.enabled=false or start "
                                 "a new output_dir")
            self.ema.module.load_state_dict(state["ema"])

    def end_of_epoch(self, epoch: int, last: bool) -> dict[str, Any]:
        return {}

    def finish(self) -> dict[str, str]:
        """Rank 0, after the last epoch: export (`export`). -> the exported files and the best checkpoints."""
        self.exported = self.export()
        best = {name: os.path.join(self.cfg.output_dir, f"{name}.pt") for name in ("best", "best-ema")}
        return {**self.exported, **{name: path for name, path in best.items() if os.path.isfile(path)}}

    # --- outputs ---------------------------------------------------------------------------------------------------
    def save_weights(self, model: nn.Module, path: str, epoch: int, metrics: dict[str, Any]) -> None:
        """A small checkpoint: header + timm state_dict + the config and metrics (read by `fcmae eval`)."""
        ckpt_io.save_atomic({**self.checkpoint_header(), "model": model.state_dict(), "epoch": epoch,
                             "metrics": dict(metrics), "config": to_dict(self.cfg)}, path)

    def export(self) -> dict[str, str]:
        """The final model (and EMA) as timm state_dicts in safetensors, with the architecture, preprocessing and class
        names in their metadata and timm's config.json beside them: timm.create_model("local-dir:RUN_DIR",
        pretrained=True) loads model.safetensors with it (its architecture is the layout's timm name,
        convnextv2.timm_names); `convnextv2.timm_names.load_line` is the line that loads either file."""
        from convnextv2.checkpoint import infer_arch, save_state_dict, timm_metadata
        from convnextv2.checkpoint.convert import write_json
        from convnextv2.checkpoint.hub import metadata

        hub = timm_config(self.cfg.model.name, self.patch_size, self.num_classes, self.in_chans,
                          to_dict(self.cfg)["data"], list(self.classes))
        meta = {**timm_metadata(infer_arch(self.model.state_dict())), **metadata(hub)}
        out = {"model": os.path.join(self.cfg.output_dir, "model.safetensors")}
        save_state_dict(self.model.state_dict(), out["model"], meta)
        if self.ema is not None:
            out["ema"] = os.path.join(self.cfg.output_dir, "model-ema.safetensors")
            save_state_dict(self.ema.module.state_dict(), out["ema"], meta)
        write_json(os.path.join(self.cfg.output_dir, "config.json"), hub)
        write_json(os.path.join(self.cfg.output_dir, "classes.json"), self.classes)
        return out


def finetune(cfg: FinetuneConfig, on_loss: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
             afresh: str | None = None) -> dict:
    """Run (or resume) a fine-tuning; joins/leaves the process group when WORLD_SIZE > 1. Returns the summary
    (last epoch's loss, top1/top5/ema_top1/ema_top5, best_top1/best_ema_top1, exported files). afresh: how the
    calling command starts afresh when output_dir's last.pt cannot be resumed (its own options)."""
    header = {"format": FORMAT, "model_args": {"name": cfg.model.name, "num_classes": cfg.model.num_classes,
                                               "in_chans": cfg.model.in_chans, "patch_size": cfg.model.patch_size}}
    resume = prepare_resume(cfg.output_dir, cfg.resume, header, afresh=afresh)  # before data, files and devices
    info = init_distributed(cfg.device)
    run_dir = None
    try:
        check_same_resume_everywhere(resume, info)  # before data: every node must see the same checkpoint
        run_dir = claim(cfg, info, resume, header, FinetuneTask.outputs)  # locked; nothing written yet
        torch.manual_seed(derive_seed(cfg.seed, info.rank))
        task = FinetuneTask(cfg, info, resumed=resume[1] if resume is not None else None)
        if info.is_main:
            init = ("from scratch" if cfg.model.init == "none" else f"from {cfg.model.init}"
                    if resume is None else "resuming (model.init not read)")
            print(f"fcmae finetune: {cfg.model.name} (patch size {task.patch_size}) {init}, {task.num_classes} classes, "
                  f"{task.splits.where} "
                  f"({len(task.splits.train)} train / {len(task.splits.val)} val images), {info.world_size} "
                  f"process(es) on {info.device}, global batch {cfg.data.batch_size}, {task.steps_per_epoch} "
                  f"steps/epoch -> {cfg.output_dir}", flush=True)
            if task.load_info is not None:
                print(f"pretrained weights: {task.load_info.summary()}", flush=True)
        summary = train(cfg, task, info, on_loss=on_loss, resume=resume, run_dir=run_dir)
        if info.is_main:
            summary["exported"] = task.exported or task.export()  # a run that was complete already exports here
            from convnextv2.timm_names import load_line

            print(f"best top-1 {task.best['top1']:.2f} (epoch {task.best['epoch']})"
                  + (f", EMA {task.best['ema_top1']:.2f} (epoch {task.best['ema_epoch']})" if task.ema else "")
                  + f"; exported {', '.join(summary['exported'].values())}; load in timm:\n  "
                  + load_line(cfg.model.name, task.patch_size, task.in_chans, summary["exported"]["model"],
                              task.num_classes, cfg.data.image_size), flush=True)
        summary["best"] = dict(task.best)
        return summary
    finally:
        if run_dir is not None:
            run_dir.release()
        cleanup_distributed()
