"""FCMAE pretraining on a folder, ImageFolder, shards or the digits (the `fcmae pretrain` command:
fcmae.commands.pretrain).

The FCMAE-specific part of the engine (fcmae.engine.loop): the model, its param groups (no decay on the mask token),
the per-micro-batch random mask and the reconstruction pictures.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

import torch
from torch import nn

from convnextv2 import visible_patches
from fcmae.data.device import to_device_async
from fcmae.engine.config import check_global_batch
from fcmae.engine.distributed import DistInfo, cleanup_distributed, init_distributed
from fcmae.engine.loop import train
from fcmae.engine.metrics import ImageFile
from fcmae.engine.resume import check_same_resume_everywhere, complete, finished_run, prepare_resume
from fcmae.engine.rundir import claim
from fcmae.engine.optim import param_groups
from fcmae.engine.seeds import derive_seed
from fcmae.headers import FCMAE_FORMAT as FORMAT, check_header_against_tensors, read_model_init
from fcmae.masking import random_mask
from fcmae.model import FCMAE
from fcmae.pretrain_config import PretrainConfig


def checkpoint_header(cfg: PretrainConfig) -> dict[str, Any]:
    """What identifies the model in a pretraining checkpoint (a resumed run must agree on all of it)."""
    m = cfg.model
    return {"format": FORMAT, "version": 1, "model_args": {
        "encoder_name": m.name, "in_chans": m.in_chans, "mask_ratio": m.mask_ratio,
        "decoder_dim": m.decoder_dim, "decoder_depth": m.decoder_depth, "norm_pix_loss": m.norm_pix_loss,
        "patch_size": m.patch_size}}


def load_init(model: FCMAE, path: str, cfg: PretrainConfig) -> str:
    """model.init: the encoder from any checkpoint format `read_encoder` reads, the decoder too when the file is an
    FCMAE checkpoint that has one (its shapes must match the config). Every tensor is checked before it is loaded
    (shapes, dtype, finite values, the header against the tensors). Returns a one-line summary."""
    from convnextv2.checkpoint import load_encoder_weights

    m = cfg.model
    where = f"model.init={path!r}"
    obj, weights = read_model_init(path)
    if weights.arch.name != m.name:
        raise ValueError(f"{where} holds {weights.arch.describe()}, but model.name={m.name}; use "
                         f"model.name={weights.arch.name} or a checkpoint of this size")
    if weights.arch.in_chans != m.in_chans:
        raise ValueError(f"{where} holds {weights.arch.in_chans}-channel weights, but "
                         f"model.in_chans={m.in_chans}; set model.in_chans={weights.arch.in_chans}")
    if weights.arch.patch_size != m.patch_size:
        auto = f" (auto at {cfg.data.image_size} px)" if m.patch_size_auto else ""
        raise ValueError(f"{where} holds an encoder with patch size {weights.arch.patch_size}, but "
                         f"model.patch_size={m.patch_size}{auto}; set model.patch_size={weights.arch.patch_size}")
    decoder = init_decoder(obj, model, where) if weights.format == "fcmae" else None
    info = load_encoder_weights(model.encoder, weights, head_init_scale=None)
    if decoder is not None:
        model.decoder.load_state_dict(decoder)
    return f"encoder: {info.summary()}; decoder: {'fresh' if decoder is None else 'from the file'}"


def init_decoder(obj: dict[str, Any], model: FCMAE, where: str) -> dict[str, torch.Tensor] | None:
    """The decoder state_dict of an FCMAE checkpoint for model.init, checked against its header and `model`'s
    decoder (ValueError: one line with the file's decoder_dim / decoder_depth); None when the file has none."""
    from convnextv2.checkpoint.validate import check_values

    sd = {k[len("decoder."):]: v for k, v in obj["model"].items() if k.startswith("decoder.")}
    if not sd:
        return None
    args = obj.get("model_args") if isinstance(obj.get("model_args"), dict) else {}
    check_header_against_tensors(FORMAT, args, obj["model"], where)
    want = model.decoder.state_dict()
    bad = [f"{k} {tuple(sd[k].shape) if k in sd else 'missing'} vs {tuple(v.shape)}"
           for k, v in want.items() if k not in sd or sd[k].shape != v.shape]
    bad += [f"{k} (not in this decoder)" for k in sd if k not in want]
    if bad:
        hint = " ".join(f"model.{k}={args[k]}" for k in ("decoder_dim", "decoder_depth") if k in args)
        raise ValueError(f"{where} has a decoder of another shape ({'; '.join(bad[:3])}); set "
                         f"{hint or 'model.decoder_dim / model.decoder_depth'} as in the file")
    check_values({f"decoder.{k}": v for k, v in sd.items()}, where)
    return sd


class PretrainTask:
    """FCMAE pretraining as a `fcmae.engine.loop.Task`. resuming: the weights will come from the checkpoint
    (model.init is not read)."""

    outputs = ("reconstruction-epoch*.png",)  # what it writes in output_dir besides the loop's files

    def __init__(self, cfg: PretrainConfig, info: DistInfo, resuming: bool = False):
        from fcmae.data import build_image_data

        self.cfg, self.info = cfg, info
        m, d = cfg.model, cfg.data
        self.micro_batch = check_global_batch(d.batch_size, cfg.optim.accum_steps, info.world_size)
        self.global_batch = d.batch_size
        torch.manual_seed(cfg.seed)  # identical initial weights on every process
        self.model = FCMAE(m.name, m.in_chans, m.mask_ratio, m.decoder_dim, m.decoder_depth, m.norm_pix_loss, m.backend,
                           patch_size=m.patch_size)
        self.init_info = load_init(self.model, m.init, cfg) if m.init != "none" and not resuming else None
        torch.manual_seed(derive_seed(cfg.seed, info.rank))  # back to the per-rank seed
        self.data = build_image_data(d, m.in_chans, self.micro_batch, cfg.optim.accum_steps, info, cfg.seed)
        self.steps_per_epoch = self.data.steps_per_epoch
        self.grid = (d.image_size // self.model.patch_size,) * 2
        self.monitor = self.monitor_splits() if cfg.monitor.every_epochs and info.is_main else None

    def param_groups(self, weight_decay: float) -> list[dict]:
        return param_groups(self.model, weight_decay, no_decay_names=["decoder.mask_token"])

    def batches(self, epoch: int, skip_micro: int):
        return self.data.batches(epoch, skip_micro)

    def mask(self, epoch: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's rows of the global micro-batch's mask, drawn on the CPU from (seed, epoch, micro):
        mask (b, h, w) and its visible patch indices (b, V), both on the CPU.

        Rows rank::W match the DistributedSampler's interleaving, so every sample gets the same mask whatever
        the number of processes. The indices (and the mask's invariants) are computed here, on the host, so that the
        step on the GPU never waits for them.
        """
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, epoch, micro))
        full = random_mask(self.micro_batch * self.info.world_size, self.grid, self.model.mask_ratio, generator=g)
        mask = full[self.info.rank::self.info.world_size]
        return mask, visible_patches(mask)

    def loss(self, model: nn.Module, batch: Any, epoch: int, micro: int) -> torch.Tensor:
        device = self.info.device
        imgs = self.data.to_device(batch[0], device, self.cfg.channels_last)  # uint8 -> normalised
        mask, visible = (to_device_async(t, device) for t in self.mask(epoch, micro))
        loss, _, _ = model(imgs, mask, visible)
        return loss

    def skipped(self, batch: Any) -> int:
        return int(batch[2].sum())

    def checkpoint_header(self) -> dict[str, Any]:
        return checkpoint_header(self.cfg)

    # --- the kNN monitor (rank 0; docs/method.md) ------------------------------------------------------------------------
    def monitor_splits(self):
        """The monitor's labeled splits (eval transform on both), built now so a bad monitor.data fails early."""
        from fcmae.knn import check_neighbours, probe_splits

        try:
            splits = probe_splits(self.cfg.monitor.data, self.cfg.model.in_chans)
        except ValueError as e:  # the keys live under monitor.data
            raise ValueError(str(e).replace("data.", "monitor.data.")) from None
        check_neighbours(self.cfg.monitor.k, len(splits.train), key="monitor.k")
        return splits

    def knn(self) -> dict[str, float]:
        """kNN top-1 of the live encoder (dense forward on full images), deterministic and RNG-neutral."""
        from fcmae.engine.loop import amp_dtype
        from fcmae.knn import knn_probe

        mon, s = self.cfg.monitor, self.monitor
        result = knn_probe(self.model.encoder, s.train, s.val, len(s.classes), self.info.device,
                           mon.data.eval_batch_size, mon.data.num_workers, amp_dtype(self.cfg.amp, self.info.device),
                           mon.k, mon.temperature)
        return {"knn_top1": result.top1, "knn_seconds": round(result.seconds, 3)}

    def start(self, resumed: bool) -> dict[str, Any]:
        """Rank 0, before the first epoch of a fresh run: the random-init encoder's kNN, the monitor's baseline."""
        return self.knn() if self.monitor is not None and not resumed else {}

    def end_of_epoch(self, epoch: int, last: bool) -> dict[str, Any]:
        every = self.cfg.monitor.every_epochs
        out: dict[str, Any] = self.knn() if self.monitor is not None and ((epoch + 1) % every == 0 or last) else {}
        picture = self.save_reconstructions(epoch, last)
        if picture is not None:  # in the epoch's row: its path in metrics.jsonl, the image for the trackers
            out["reconstruction"] = ImageFile(picture)
        return out

    def save_reconstructions(self, epoch: int, last: bool) -> str | None:
        """reconstruction-epochN.png every log.vis_every_epochs epochs and after the last. -> its path, if written."""
        every = self.cfg.log.vis_every_epochs
        if not every or not ((epoch + 1) % every == 0 or last):
            return None
        from fcmae.visualize import save_grid

        imgs = self.data.vis_images(self.cfg.log.vis_images).to(self.info.device)
        g = torch.Generator().manual_seed(self.cfg.seed)  # the same masks every time: pictures compare over epochs
        mask = random_mask(len(imgs), self.grid, self.model.mask_ratio, generator=g).to(self.info.device)
        path = os.path.join(self.cfg.output_dir, f"reconstruction-epoch{epoch + 1}.png")
        save_grid(self.model, imgs, mask, self.data.mean, self.data.std, path)
        return path


def pretrain(cfg: PretrainConfig, on_loss: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
             afresh: str | None = None) -> dict:
    """Run (or resume) a pretraining; joins/leaves the process group when WORLD_SIZE > 1. Returns the summary.
    afresh: how the calling command starts afresh when output_dir's last.pt cannot be resumed (its own options)."""
    header = checkpoint_header(cfg)
    resume = prepare_resume(cfg.output_dir, cfg.resume, header, afresh=afresh)  # before data, files and devices
    info = init_distributed(cfg.device)
    run_dir = None
    try:
        check_same_resume_everywhere(resume, info)  # before data: every node must see the same checkpoint
        run_dir = claim(cfg, info, resume, header, PretrainTask.outputs)  # locked; nothing written yet
        if resume is not None and complete(resume[1], cfg.optim.epochs):  # a finished run: no data to load
            return finished_run(cfg.output_dir, resume[1], cfg.optim.epochs, info.is_main)
        torch.manual_seed(derive_seed(cfg.seed, info.rank))  # per-rank seed for anything not derived explicitly
        task = PretrainTask(cfg, info, resuming=resume is not None)
        if info.is_main:
            print(f"fcmae pretrain: {cfg.model.name} ({cfg.model.backend}), {cfg.patch_summary()}, on "
                  f"{task.data.format} {cfg.data.path or ''} ({task.data.num_samples} images), {info.world_size} "
                  f"process(es) on {info.device}, global batch {cfg.data.batch_size}, {task.steps_per_epoch} "
                  f"steps/epoch -> {cfg.output_dir}", flush=True)
            warning = cfg.coarse_grid_warning()
            if warning:
                print(f"fcmae pretrain: warning: {warning}", file=sys.stderr, flush=True)
            if task.init_info is not None:
                print(f"initial weights from {cfg.model.init}: {task.init_info}", flush=True)
            elif cfg.model.init != "none":
                print(f"model.init={cfg.model.init} is not read: the run resumes from its checkpoint", flush=True)
            if task.monitor is not None:
                s = task.monitor
                print(f"kNN monitor: {s.where}: {len(s.train)} train / {len(s.val)} val images, {len(s.classes)} "
                      f"classes, every {cfg.monitor.every_epochs} epoch(s) and after the last", flush=True)
        return train(cfg, task, info, on_loss=on_loss, resume=resume, run_dir=run_dir)
    finally:
        if run_dir is not None:
            run_dir.release()
        cleanup_distributed()
