"""`fcmae pretrain --config FILE [key=value ...]`: FCMAE pretraining on a folder, ImageFolder, shards or the digits.

The FCMAE-specific part of the engine (fcmae.engine.loop): the model, its param groups (no decay on the mask token),
the per-micro-batch random mask and the reconstruction pictures.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable

import torch
from torch import nn

from fcmae.config import add_config_arguments, load_config
from fcmae.engine.config import check_global_batch
from fcmae.engine.distributed import DistInfo, cleanup_distributed, init_distributed
from fcmae.engine.loop import train
from fcmae.engine.optim import param_groups
from fcmae.engine.seeds import derive_seed
from fcmae.masking import random_mask
from fcmae.model import FCMAE
from fcmae.pretrain_config import PretrainConfig


class PretrainTask:
    """FCMAE pretraining as a `fcmae.engine.loop.Task`."""

    def __init__(self, cfg: PretrainConfig, info: DistInfo):
        from fcmae.data import build_image_data

        self.cfg, self.info = cfg, info
        m, d = cfg.model, cfg.data
        self.micro_batch = check_global_batch(d.batch_size, cfg.optim.accum_steps, info.world_size)
        self.global_batch = d.batch_size
        torch.manual_seed(cfg.seed)  # identical initial weights on every process
        self.model = FCMAE(m.name, m.in_chans, m.mask_ratio, m.decoder_dim, m.decoder_depth, m.norm_pix_loss, m.backend)
        torch.manual_seed(derive_seed(cfg.seed, info.rank))  # back to the per-rank seed
        self.data = build_image_data(d, m.in_chans, self.micro_batch, cfg.optim.accum_steps, info, cfg.seed)
        self.steps_per_epoch = self.data.steps_per_epoch
        self.grid = (d.image_size // self.model.patch_size,) * 2

    def param_groups(self, weight_decay: float) -> list[dict]:
        return param_groups(self.model, weight_decay, no_decay_names=["decoder.mask_token"])

    def batches(self, epoch: int, skip_micro: int):
        return self.data.batches(epoch, skip_micro)

    def mask(self, epoch: int, micro: int) -> torch.Tensor:
        """This process's rows of the global micro-batch's mask, drawn from (seed, epoch, micro): (b, h, w).

        Rows rank::W match the DistributedSampler's interleaving, so every sample gets the same mask whatever
        the number of processes.
        """
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, epoch, micro))
        full = random_mask(self.micro_batch * self.info.world_size, self.grid, self.model.mask_ratio, generator=g)
        return full[self.info.rank::self.info.world_size]

    def loss(self, model: nn.Module, batch: Any, epoch: int, micro: int) -> torch.Tensor:
        imgs = self.data.to_device(batch[0], self.info.device, self.cfg.channels_last)  # uint8 -> normalised
        loss, _, _ = model(imgs, self.mask(epoch, micro).to(self.info.device))
        return loss

    def skipped(self, batch: Any) -> int:
        return int(batch[2].sum())

    def checkpoint_header(self) -> dict[str, Any]:
        m = self.cfg.model
        return {"format": "fcmae", "version": 1, "model_args": {
            "encoder_name": m.name, "in_chans": m.in_chans, "mask_ratio": m.mask_ratio,
            "decoder_dim": m.decoder_dim, "decoder_depth": m.decoder_depth, "norm_pix_loss": m.norm_pix_loss}}

    def end_of_epoch(self, epoch: int, last: bool) -> dict[str, Any]:
        every = self.cfg.log.vis_every_epochs
        if not every or not ((epoch + 1) % every == 0 or last):
            return {}
        from fcmae.visualize import save_grid

        imgs = self.data.vis_images(self.cfg.log.vis_images).to(self.info.device)
        g = torch.Generator().manual_seed(self.cfg.seed)  # the same masks every time: pictures compare over epochs
        mask = random_mask(len(imgs), self.grid, self.model.mask_ratio, generator=g).to(self.info.device)
        path = os.path.join(self.cfg.output_dir, f"reconstruction-epoch{epoch + 1}.png")
        save_grid(self.model, imgs, mask, self.data.mean, self.data.std, path)
        return {}


def pretrain(cfg: PretrainConfig, on_loss: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Run (or resume) a pretraining; joins/leaves the process group when WORLD_SIZE > 1. Returns the summary."""
    info = init_distributed(cfg.device)
    try:
        torch.manual_seed(derive_seed(cfg.seed, info.rank))  # per-rank seed for anything not derived explicitly
        task = PretrainTask(cfg, info)
        if info.is_main:
            print(f"fcmae pretrain: {cfg.model.name} ({cfg.model.backend}) on {task.data.format} {cfg.data.path or ''} "
                  f"({task.data.num_samples} images), {info.world_size} process(es) on {info.device}, global batch "
                  f"{cfg.data.batch_size}, {task.steps_per_epoch} steps/epoch -> {cfg.output_dir}", flush=True)
        return train(cfg, task, info, on_loss=on_loss)
    finally:
        cleanup_distributed()


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretrain", help="FCMAE pretraining (resumes automatically in the same output_dir)",
        description="Pretrain a ConvNeXt V2 encoder with FCMAE. Example: fcmae pretrain --config "
        "configs/pretrain/tiny.yaml data.path=/data/train output_dir=runs/tiny. Multi-GPU: torchrun "
        "--nproc_per_node=8 -m fcmae pretrain ... (data.batch_size is the GLOBAL batch).",
    )
    add_config_arguments(p, "YAML file (configs/pretrain/<size>.yaml)", "optim.epochs=100 data.path=/data")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    pretrain(load_config(PretrainConfig, args.config, args.overrides))
