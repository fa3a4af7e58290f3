"""`fcmae submit`: run `fcmae pretrain|finetune` as a (multi-node, multi-GPU) Slurm job, or locally.

Reached from the `fcmae` command through the `fcmae.commands` entry point (pyproject.toml): fcmae never imports
jobs. The run directory defaults to the job directory, so the run and its logs live together and a requeued job
finds its `last.pt` there.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import submitit

from fcmae.recipes import find_config
from jobs.launch import DEFAULT_ENTRY, environ
from jobs.submit import CLUSTERS, Resources, submit

COMMANDS = ("pretrain", "finetune")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "submit", help="run pretrain/finetune as a Slurm job (or locally), requeued on preemption",
        description="Submit `fcmae pretrain|finetune --config FILE [key=value ...]` with submitit: one task per GPU "
        "(or --tasks-per-node CPU tasks), torch.distributed set up from the job (rendezvous on its first node; "
        "NCCL on GPU, gloo on CPU). On preemption or time-out (SIGUSR2) the job requeues itself and resumes from "
        "its run directory's last.pt. Run files go to --job-dir (unless output_dir=... is given), submitit's "
        "scripts and logs to JOB_DIR/logs. Example: fcmae submit pretrain --config c.yaml optim.epochs=800 "
        "--job-dir runs/p1 --nodes 2 --gpus-per-node 8 --partition gpu --timeout-min 1440. "
        "`fcmae submit pretrain --help` lists the job options.",
    )
    commands = p.add_subparsers(dest="submit_command", metavar="{pretrain,finetune}")
    commands.required = True
    options = job_options()
    for name in COMMANDS:
        c = commands.add_parser(name, parents=[options], help=f"submit `fcmae {name}`",
                                description=f"Submit `fcmae {name} --config FILE [key=value ...]` as a job. "
                                "The run directory and logs go to --job-dir; on preemption the job requeues and "
                                "resumes.")
        c.set_defaults(func=run)


def job_options() -> argparse.ArgumentParser:
    """The command's own arguments and the job's resources (shared by pretrain and finetune)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", required=True, help="the command's YAML config or recipe name, as for the command")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for the command")
    p.add_argument("--job-dir", required=True, help="folder for the run (output_dir) and the job's logs")
    p.add_argument("--cluster", choices=CLUSTERS, default="slurm",
                   help="slurm (default); local: subprocesses on this machine; debug: in this process")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node, one task each (default 0: CPU)")
    p.add_argument("--tasks-per-node", type=int, default=None, help="processes per node for CPU jobs (default 1)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per task, e.g. for data workers")
    p.add_argument("--timeout-min", type=int, default=240,
                   help="time limit per attempt in minutes (default 240); the job requeues itself when it is hit")
    p.add_argument("--max-requeues", type=int, default=20,
                   help="requeues allowed (preemptions and time-outs together) before the job stops (default 20)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--mem", help="memory per node, Slurm syntax: 64G, 500M, 0 = all")
    p.add_argument("--exclusive", action="store_true", help="whole nodes only")
    p.add_argument("--comment")
    p.add_argument("--name", default=None, help="job name (default fcmae-COMMAND)")
    p.add_argument("--wait", action="store_true", help="wait for the job to end; exit 1 with its error if it fails")
    return p


def command_argv(args: argparse.Namespace, job_dir: Path) -> tuple[list[str], Path]:
    """The `fcmae` command line the job runs, and its run directory (output_dir: given, else the job dir)."""
    config = Path(find_config(args.config, args.submit_command))
    for item in args.overrides:
        if "=" not in item or item.startswith("="):
            raise ValueError(f"override {item!r} is not key=value: write e.g. optim.epochs=10")
    given = [o.split("=", 1)[1] for o in args.overrides if o.split("=", 1)[0] == "output_dir"]
    run_dir = Path(given[-1]).resolve() if given else job_dir
    argv = [args.submit_command, "--config", str(config.resolve()), *args.overrides]
    if not given:
        argv.append(f"output_dir={run_dir}")
    return argv, run_dir


def check_config(argv: list[str], world_size: int) -> None:
    """Load and check the command's config as each of the job's processes will (same schema, same overrides,
    WORLD_SIZE the job's), so a bad key or value fails here, not in the queue."""
    from fcmae.config import load_config
    from fcmae.finetune_config import FinetuneConfig
    from fcmae.pretrain_config import PretrainConfig

    schema = {"pretrain": PretrainConfig, "finetune": FinetuneConfig}[argv[0]]
    with environ({"WORLD_SIZE": str(world_size)}):
        load_config(schema, argv[2], argv[3:])


def run(args: argparse.Namespace, entry: str = DEFAULT_ENTRY) -> submitit.Job:
    """Validate, submit `entry(argv)` (`fcmae.cli:main` unless a test swaps it), say where to look; the job."""
    job_dir = Path(args.job_dir).resolve()
    res = Resources(
        cluster=args.cluster, nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task, timeout_min=args.timeout_min, partition=args.partition,
        account=args.account, qos=args.qos, constraint=args.constraint, mem=args.mem, exclusive=args.exclusive,
        comment=args.comment, max_requeues=args.max_requeues, name=args.name or f"fcmae-{args.submit_command}",
    )
    res.validate()
    argv, run_dir = command_argv(args, job_dir)
    if entry == DEFAULT_ENTRY:
        check_config(argv, res.nodes * res.tasks)
    job = submit(argv, job_dir, res, run_dir=run_dir, entry=entry)
    where = f" to partition {res.partition}" if res.partition else ""
    print(f"Submitted job {job.job_id} ({res.cluster}{where}): {res.nodes} node(s) x {res.tasks} task(s), "
          f"{res.gpus_per_node} GPU(s) per node", flush=True)
    print(f"  run directory: {run_dir}")
    print(f"  logs:          {job.paths.stdout} (task 0; _log.err for errors, other tasks _1_, _2_, ...)")
    print(f"  follow:        tail -f {job.paths.stdout} {job.paths.stderr}")
    if res.cluster == "slurm":
        print(f"  status:        squeue -j {job.job_id}; sacct -j {job.job_id}; cancel: scancel {job.job_id}")
    sys.stdout.flush()
    if args.wait or res.cluster == "debug":  # debug runs here and now
        try:
            job.results()  # one result per task; raises the first task error
        except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as e:
            print(f"fcmae submit: job {job.job_id} failed:\n{e}", file=sys.stderr)
            raise SystemExit(1) from None
        print(f"Job {job.job_id} finished; run directory {run_dir}")
    return job
