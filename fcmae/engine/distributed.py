"""torch.distributed setup from the environment torchrun (or submitit) provides: env://, NCCL on GPU, gloo on CPU."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(device: str, local_rank: int) -> torch.device:
    """'auto' -> this process's GPU when CUDA is available, else CPU; 'cuda' without CUDA is an error."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but CUDA is not available; use device=cpu or device=auto")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when WORLD_SIZE > 1 (needs RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, as torchrun sets)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method="env://")
    return DistInfo(rank, world_size, local_rank, dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over processes (identity on one process)."""
    if info.distributed:
        x = x.clone()
        dist.all_reduce(x)
        x /= info.world_size
    return x


def all_reduce_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        x = x.clone()
        dist.all_reduce(x)
    return x


def on_main(fn: Callable[[], T], info: DistInfo) -> T | None:
    """fn() on rank 0 only (what touches the run folder), its ValueError or OSError raised on every process with the
    same message, so all stop together instead of waiting for rank 0 in a collective. A collective: every process
    must call it. -> fn's result on rank 0, None elsewhere."""
    result, error = None, None
    try:
        if info.is_main:
            result = fn()
    except (ValueError, OSError) as e:
        if not info.distributed:
            raise
        error = e
    if info.distributed:
        said = [None if error is None else (isinstance(error, OSError), str(error))]
        dist.broadcast_object_list(said, src=0)
        if error is not None:
            raise error
        if said[0] is not None:
            is_os, message = said[0]
            raise (OSError if is_os else ValueError)(message)
    return result
