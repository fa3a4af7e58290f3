"""Submit a `DistributedCommand` with submitit's AutoExecutor: Slurm on a cluster, subprocesses on this machine
(`local`), or in this very process (`debug`, for a debugger). Nothing site-specific: partitions, accounts etc.
come from the user, the rendezvous from the job itself, files go under the user's job directory."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import submitit

from jobs.launch import DEFAULT_ENTRY, DistributedCommand

CLUSTERS = ("slurm", "local", "debug")


@dataclasses.dataclass(frozen=True)
class Resources:
    """What the job asks the scheduler for. One task per GPU; `tasks_per_node` only for CPU jobs."""

    cluster: str = "slurm"
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    timeout_min: int = 240
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mem: str | None = None
    exclusive: bool = False
    comment: str | None = None
    max_requeues: int = 20
    name: str = "fcmae"

    @property
    def tasks(self) -> int:
        """Tasks per node: one per GPU, else as asked (default 1)."""
        return self.gpus_per_node if self.gpus_per_node else (self.tasks_per_node or 1)

    def validate(self) -> None:
        """ValueError naming the problem and the fix, before anything is submitted."""
        if self.cluster not in CLUSTERS:
            raise ValueError(f"unknown cluster {self.cluster!r}: use one of {', '.join(CLUSTERS)}")
        for name in ("nodes", "timeout_min"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "max_requeues"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise ValueError(f"--tasks-per-node must be at least 1, got {self.tasks_per_node}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ValueError(f"--cpus-per-task must be at least 1, got {self.cpus_per_task}")
        if self.gpus_per_node and self.tasks_per_node not in (None, self.gpus_per_node):
            raise ValueError(f"GPU jobs run one task per GPU: drop --tasks-per-node {self.tasks_per_node} "
                             f"(or make it equal to --gpus-per-node {self.gpus_per_node})")
        if self.mem is not None and not re.fullmatch(r"\d+[KMGT]?", self.mem):
            raise ValueError(f"--mem {self.mem!r} is not a Slurm memory size: use e.g. 64G, 500M or 0 (all of it)")
        if self.cluster != "slurm" and self.nodes > 1:
            raise ValueError(f"--cluster {self.cluster} runs on this machine only: use --nodes 1 or --cluster slurm")
        if self.cluster == "debug" and self.tasks > 1:
            raise ValueError("--cluster debug runs one process (this one): use --cluster local for several tasks")

    def check_scheduler(self) -> None:
        """ValueError unless the cluster's tools are here (checked after the options and the command's config, so
        a bad config is reported first, on any machine)."""
        missing = [exe for exe in ("sbatch", "srun") if shutil.which(exe) is None]  # submitit needs both
        if self.cluster == "slurm" and missing:
            raise ValueError(f"{' and '.join(missing)} not found on PATH: submit from a Slurm login node, or use "
                             "--cluster local to run on this machine")


def make_executor(job_dir: Path, res: Resources) -> submitit.AutoExecutor:
    """AutoExecutor writing its scripts, pickles and logs to `job_dir/logs`."""
    res.validate()
    res.check_scheduler()
    executor = submitit.AutoExecutor(folder=job_dir / "logs", cluster=res.cluster,
                                     slurm_max_num_timeout=res.max_requeues)
    slurm = {"partition": res.partition, "account": res.account, "qos": res.qos, "constraint": res.constraint,
             "mem": res.mem, "comment": res.comment, "exclusive": True if res.exclusive else None}
    executor.update_parameters(  # None = not set; no --gpus-per-node=0 line for sites without GPU GRES
        name=res.name, nodes=res.nodes, tasks_per_node=res.tasks, gpus_per_node=res.gpus_per_node or None,
        cpus_per_task=res.cpus_per_task, timeout_min=res.timeout_min,
        **{f"slurm_{k}": v for k, v in slurm.items() if v is not None},
    )
    return executor


def submit(argv: Sequence[str], job_dir: str | Path, res: Resources, *, run_dir: str | Path | None = None,
           entry: str = DEFAULT_ENTRY) -> submitit.Job:
    """Submit `entry(argv)` (by default `fcmae <argv>`) as a job of `res.nodes * res.tasks` tasks.

    argv: the command line after `fcmae`, e.g. ["pretrain", "--config", "c.yaml", "output_dir=/runs/a"].
    run_dir: the command's output directory (for the resume message in the log).
    Returns the submitit Job (for `debug`, the command runs when `job.result()` is called).
    """
    job_dir = Path(job_dir).resolve()
    executor = make_executor(job_dir, res)  # validates before any file is written
    created = not job_dir.exists()
    job_dir.mkdir(parents=True, exist_ok=True)
    command = DistributedCommand(tuple(argv), entry=entry, run_dir=str(run_dir) if run_dir else None,
                                 max_requeues=res.max_requeues)
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):  # submitit prints sbatch's stderr before raising: say it once
            job = executor.submit(command)
    except submitit.core.utils.FailedJobError as e:
        if created:  # nothing was submitted: leave no half-made job folder behind
            shutil.rmtree(job_dir, ignore_errors=True)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ValueError(f"sbatch refused the job ({lines[-1] if lines else 'no message'}): is Slurm reachable from "
                         "here (try `sinfo`)? Or use --cluster local to run on this machine") from None
    except BaseException:
        sys.stderr.write(said.getvalue())
        raise
    sys.stderr.write(said.getvalue())
    return job
