"""A tiny stand-in for `fcmae pretrain`, used by tests/test_jobs.py to exercise the Slurm + submitit + requeue
plumbing in seconds. Same shape as the real command: `main(["pretrain", "--config", FILE, "key=value", ...])`,
torch.distributed from the env:// variables, rank 0 writes `{output_dir}/last.pt` atomically after every step, and
a rerun with the same output_dir resumes from it.

Config keys: output_dir, steps, step_seconds, fail_at_step (-1: never).
State: x <- x / 2 + sum over ranks of (rank + 1 + step), in float64, so the result of N steps is exact and
depends on the world size; `starts` records the step each attempt started from.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml


def expected_x(steps: int, world_size: int) -> float:
    """The oracle: what an uninterrupted run ends with."""
    x = 0.0
    for step in range(steps):
        x = x / 2 + sum(rank + 1 + step for rank in range(world_size))
    return x


def parse(argv: list[str]) -> dict:
    cfg = {"steps": 6, "step_seconds": 0.0, "fail_at_step": -1}
    cfg.update(yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text()) or {})
    for item in argv[argv.index("--config") + 2:]:
        key, value = item.split("=", 1)
        cfg[key] = yaml.safe_load(value)
    return cfg


def main(argv: list[str]) -> int:
    cfg = parse(argv)
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1:
        dist.init_process_group("gloo", init_method="env://")
    # Every rank sees a distinct RANK: each sets its own slot, the sum shows every slot set exactly once.
    seen = torch.zeros(world, dtype=torch.float64)
    seen[rank] = 1
    if world > 1:
        dist.all_reduce(seen)
    last = out / "last.pt"
    state = (torch.load(last, weights_only=True) if last.exists() else
             {"step": 0, "x": torch.zeros((), dtype=torch.float64), "starts": []})
    state["starts"].append(state["step"])
    state.update(world_size=world, ranks_seen=seen.tolist(), master_addr=os.environ.get("MASTER_ADDR"),
                 local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    x = state["x"]
    for step in range(state["step"], int(cfg["steps"])):
        if step == cfg["fail_at_step"]:
            raise RuntimeError(f"stand-in failure at step {step}")
        contribution = torch.tensor(rank + 1.0 + step, dtype=torch.float64)
        if world > 1:
            dist.all_reduce(contribution)
        x = x / 2 + contribution
        time.sleep(float(cfg["step_seconds"]))
        if rank == 0:
            state.update(step=step + 1, x=x)
            tmp = last.with_name(last.name + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, last)
    if world > 1:
        dist.destroy_process_group()
    return 0
