"""What a cluster job runs: one process per task (per GPU), each running an `fcmae` command in-process.

submitit starts the tasks; `DistributedCommand` turns submitit's job environment into the `env://` variables
torch.distributed reads (the same ones torchrun sets), so the training engine needs no cluster-specific code. On
preemption or time-out submitit sends SIGUSR2 and calls `checkpoint()`, which requeues the same command: the engine
resumes from `{output_dir}/last.pt` by itself, losing at most the steps since that checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import submitit

DEFAULT_ENTRY = "fcmae.cli:main"


def master_port(job_id: str) -> int:
    """A TCP port for the rendezvous, the same on every node of a job and across its requeues, different between
    jobs sharing a first node. 20000-29999 stays below Linux's ephemeral range (32768+)."""
    digits = re.sub(r"\D", "", job_id)
    return 20000 + int(digits or 0) % 10000


def distributed_env(env: submitit.JobEnvironment) -> dict[str, str]:
    """torch.distributed `env://` variables for this task: rendezvous on the first node of the job."""
    return {
        "RANK": str(env.global_rank),
        "WORLD_SIZE": str(env.num_tasks),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.num_tasks // env.num_nodes),
        "MASTER_ADDR": env.hostnames[0],
        "MASTER_PORT": str(master_port(env.job_id)),
    }


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block (the debug executor runs in the caller's process,
    which must not keep a RANK or WORLD_SIZE afterwards)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def resolve(entry: str) -> Callable[[list[str]], int | None]:
    """'package.module:function' -> the function (a string, so the pickled job stays small and portable)."""
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclasses.dataclass(frozen=True)
class DistributedCommand:
    """A CLI command run in every task of a job, e.g. argv=["pretrain", "--config", "c.yaml", "output_dir=/x"].

    entry: the `main(argv) -> exit status` that runs it, 'fcmae.cli:main' for the real commands.
    run_dir: the command's output directory, only used to say in the log whether the attempt resumes.
    max_requeues: requeues (preemptions and time-outs together) allowed before the job stops.
    requeues: how many times this job was requeued already.
    """

    argv: tuple[str, ...]
    entry: str = DEFAULT_ENTRY
    run_dir: str | None = None
    max_requeues: int = 3
    requeues: int = 0

    def __call__(self) -> int:
        env = submitit.JobEnvironment()
        dist = distributed_env(env)
        # A task killed by an earlier attempt's requeue (its peers vanished mid-collective) left an error result;
        # drop it, or the job would look finished-with-error as soon as task 0 of this attempt is done.
        if "SUBMITIT_FOLDER" in os.environ:  # set by submitit's job runner (slurm, local); not in debug mode
            env.paths.result_pickle.unlink(missing_ok=True)
        if env.global_rank == 0:
            last = Path(self.run_dir, "last.pt") if self.run_dir else None
            start = (f"resumes from {last}" if last and last.exists() else "starts from scratch")
            print(f"fcmae submit: attempt {self.requeues + 1} (requeues left: {self.max_requeues - self.requeues}) "
                  f"of job {env.job_id} {start}; rendezvous {dist['MASTER_ADDR']}:{dist['MASTER_PORT']}, "
                  f"world size {dist['WORLD_SIZE']}", flush=True)
        with environ(dist):
            status = resolve(self.entry)(list(self.argv))
        if status:  # a non-zero exit (e.g. a bad config) must fail the job, not count as a result
            raise RuntimeError(f"fcmae {self.argv[0]} exited with status {status}; its error message is printed "
                               "just before this in the task's _log.err")
        return 0

    def checkpoint(self) -> submitit.helpers.DelayedSubmission | None:
        """Called by submitit (rank 0) on SIGUSR2, i.e. preemption or time-out: requeue the same command, which
        resumes from the run's last checkpoint. Returning None ends the job ('checkpoint function returned None'
        in the log, `job.result()` raises) once the requeue budget is spent, so a job cannot cycle forever."""
        if self.requeues >= self.max_requeues:
            print(f"fcmae submit: not requeuing: the job was requeued {self.requeues} times already "
                  f"(--max-requeues {self.max_requeues})", flush=True)
            return None
        print(f"fcmae submit: requeuing (requeue {self.requeues + 1} of at most {self.max_requeues})", flush=True)
        return submitit.helpers.DelayedSubmission(dataclasses.replace(self, requeues=self.requeues + 1))
