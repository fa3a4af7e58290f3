"""AdamW with weight-decay exclusions, and the per-iteration warmup + cosine learning rate."""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn


def param_groups(
    model: nn.Module, weight_decay: float, no_decay_names: Iterable[str] = (), lr_scales: dict[str, float] | None = None,
) -> list[dict]:
    """Two groups (or more with per-parameter `lr_scales`, e.g. layer decay): no weight decay for biases, every
    1-D parameter (norms, GRN gamma/beta) and names in `no_decay_names` (e.g. the mask token); frozen params dropped.

    Each group carries `lr_scale` (1.0 unless given), which `set_lr` multiplies into the scheduled lr.
    """
    skip = set(no_decay_names)
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in skip
        wd = 0.0 if no_decay else weight_decay
        scale = (lr_scales or {}).get(name, 1.0)
        group = groups.setdefault((wd, scale), {"params": [], "param_names": [], "weight_decay": wd, "lr_scale": scale})
        group["params"].append(p)
        group["param_names"].append(name)
    return list(groups.values())


def build_adamw(groups: list[dict], lr: float, betas: tuple[float, float],
                device: torch.device | None = None) -> torch.optim.AdamW:
    """AdamW over `groups`: the fused kernel on CUDA (one pass over each parameter's state: about a third of the
    multi-tensor version's memory traffic, and it can skip a step on the device, see `skips_on_device`), the
    multi-tensor (foreach) one elsewhere (on the CPU bitwise equal to torch's per-tensor default). The update is the
    same either way (tests/test_engine.py)."""
    # param_names stays out of the optimizer (its state_dict must hold only tensors and plain values)
    clean = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    fused = device is not None and device.type == "cuda"
    return torch.optim.AdamW(clean, lr=lr, betas=tuple(betas), fused=True if fused else None,
                             foreach=None if fused else True)


def check_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, where: str,
                          names: dict[int, str] | None = None) -> None:
    """ValueError (one line) unless `state` (an optimizer state_dict) has this optimizer's parameter groups and every
    moment the shape of its parameter. names: id(parameter) -> its name, for the message."""
    have = [len(g["params"]) for g in state["param_groups"]]
    want = [len(g["params"]) for g in optimizer.param_groups]
    if have != want:
        raise ValueError(f"{where}: its optimizer state has parameter groups of {have} parameters, this run's "
                         f"optimizer {want}: it was written for another model or by another version; resume with "
                         "the settings that wrote it, or start afresh in another output_dir")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for index, param in zip((i for g in state["param_groups"] for i in g["params"]), params):
        for key, moment in (state["state"].get(index) or {}).items():
            if isinstance(moment, torch.Tensor) and moment.ndim and moment.shape != param.shape:
                name = (names or {}).get(id(param), f"parameter {index}")
                raise ValueError(f"{where}: its optimizer's {key} of {name} has shape {tuple(moment.shape)}, the "
                                 f"parameter {tuple(param.shape)}: the optimizer state does not belong to these "
                                 "weights (an edited or mixed-up file); resume from an earlier checkpoint")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict(state)` (check it first: `check_optimizer_state`), keeping this run's kernel choice:
    a state_dict carries the `fused` / `foreach` flags it was written with (maybe on another device, or by an older
    version), and loading restores them."""
    kernels = [(g.get("fused"), g.get("foreach")) for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, (fused, foreach) in zip(optimizer.param_groups, kernels):
        group["fused"], group["foreach"] = fused, foreach


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """True when the optimizer reads `optimizer.found_inf` (a device tensor, non-zero = skip this step), as fused
    AdamW does: a step with a non-finite loss then changes nothing without the host reading the loss first."""
    return all(group.get("fused") for group in optimizer.param_groups)


def scaled_lr(blr: float, effective_batch: int) -> float:
    """lr = blr * effective batch / 256 (docs/method.md; effective batch = global batch per optimizer step)."""
    return blr * effective_batch / 256


def cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Linear warmup from 0 over `warmup_steps`, then half-cosine from base_lr to min_lr at `total_steps` (per step)."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
