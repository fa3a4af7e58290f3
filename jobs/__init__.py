"""Cluster launch for fcmae with submitit: `fcmae submit` (jobs.cli), the per-task callable that sets up
torch.distributed and requeues itself on preemption (jobs.launch), and the executor setup (jobs.submit).
jobs builds on fcmae; fcmae never imports jobs (it finds `submit` through the `fcmae.commands` entry point)."""
from jobs.launch import DistributedCommand, distributed_env
from jobs.submit import Resources, submit

__all__ = ["DistributedCommand", "Resources", "distributed_env", "submit"]
