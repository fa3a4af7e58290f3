"""`fcmae submit` (jobs/): the debug and local executors, a real single-node Slurm started by scripts/slurm.sh and
a real two-node one started by scripts/slurm-two-nodes.sh (as root; CI runs them). Every wait has a deadline; the
daemons this module starts are stopped at the end of the session, failed tests or not.

The Slurm + submitit + requeue plumbing is exercised with tests/jobs_standin.py (a few deterministic distributed
steps, checkpointed every step); the real `fcmae pretrain` runs through the same path in the pretrain tests.
"""
from __future__ import annotations

import ast
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import submitit
import torch

from fcmae.cli import build_parser, main
from jobs.launch import distributed_env, master_port
from jobs_standin import expected_x

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
STANDIN = "jobs_standin:main"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
JOB_TIMEOUT_S = 180
# The pretraining run the Slurm tests submit: the contract's demo config, checkpointing every step so that a
# preemption lands between checkpoints. It must last long enough (> ~10 s) to be preempted mid-run.
PRETRAIN_CONFIG = REPO / "configs" / "pretrain" / "demo.yaml"
PRETRAIN_OVERRIDES = ["seed=0", "checkpoint.every_steps=1", "data.num_workers=0", "optim.epochs=2", "data.num_samples=192",
                      "data.batch_size=16", "log.vis_every_epochs=0"]


# ----------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def fcmae_commands(tmp_path_factory) -> str:
    """Make the `fcmae.commands` entry points visible. An installed project (`pip install -e .`, as `make test`
    does) has them; a source checkout run with PYTHONPATH has no metadata, so build it (setuptools, no install)
    into a temporary folder on sys.path. Returns that folder ('' when installed) for the jobs' PYTHONPATH."""
    from importlib.metadata import entry_points

    if any(ep.name == "submit" for ep in entry_points(group="fcmae.commands")):
        return ""
    meta = tmp_path_factory.mktemp("metadata")
    subprocess.run([sys.executable, "-c", "import sys, setuptools.build_meta as b; "
                    "b.prepare_metadata_for_build_wheel(sys.argv[1])", str(meta)],
                   cwd=REPO, check=True, capture_output=True, timeout=120)
    for extra in meta.glob("*.egg-info"):  # keep the one .dist-info
        shutil.rmtree(extra)
    sys.path.append(str(meta))
    assert any(ep.name == "submit" for ep in entry_points(group="fcmae.commands"))
    return str(meta)


@pytest.fixture
def job_env(fcmae_commands, monkeypatch) -> dict[str, str]:
    """Jobs inherit the submitter's environment (sbatch exports it; the local executor copies it): let them import
    the project, the stand-in and the entry points from a source checkout too."""
    path = [str(REPO), str(TESTS), fcmae_commands, os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in path if p))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    return dict(os.environ)


def _unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"Slurm tests must run in CI: {reason}")
    pytest.skip(reason)


@contextlib.contextmanager
def local_slurm(script: Path, what: str) -> Iterator[None]:
    """Run the tests on the local `what` Slurm `script` starts (scripts/slurm.sh, scripts/slurm-two-nodes.sh).
    Outside CI the tests skip unless it is up already (`up` installs packages and starts daemons: not something a
    test run does behind a user's back); with CI set it is started here, and stopped at the end of the session if it
    was started here (CI's .ci/run starts and stops them itself)."""
    name = script.relative_to(REPO)
    was_up = "slurmctld running" in subprocess.run([script, "status"], capture_output=True, text=True,
                                                   timeout=30).stdout
    if not was_up and not IN_CI:
        pytest.skip(f"no {what} Slurm running: start the local one with `sudo {name} up` (CI=true starts it)")
    if os.geteuid() != 0:
        _unavailable(f"starting Slurm needs root ({name} up)")
    try:
        up = subprocess.run([script, "up"], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        up = None
    try:
        if up is None or up.returncode != 0:
            _unavailable(f"{name} up failed: {up.stderr[-2000:] if up else 'timed out after 600 s'}")
        yield
    finally:
        if not was_up:
            subprocess.run([script, "down"], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def slurm() -> str:
    """A running single-node Slurm from scripts/slurm.sh (partitions low and high): the partition to use."""
    conf = Path("/etc/slurm/slurm.conf")
    if conf.exists() and "written by fcmae scripts/slurm.sh" not in conf.read_text():
        _unavailable("a Slurm not set up by scripts/slurm.sh is configured here; not submitting test jobs to it")
    with local_slurm(REPO / "scripts" / "slurm.sh", "single-node"):
        yield "low"


@pytest.fixture(scope="session")
def slurm_two_nodes() -> str:
    """A running two-node Slurm from scripts/slurm-two-nodes.sh (nodes fcmae-n1, fcmae-n2 in network namespaces of
    their own, partition `two`): its SLURM_CONF, which clients need to reach it rather than the single-node one."""
    script = REPO / "scripts" / "slurm-two-nodes.sh"
    with local_slurm(script, "two-node"):
        yield subprocess.run([script, "env"], capture_output=True, text=True, timeout=30,
                             check=True).stdout.strip().split("=", 1)[1]


# ----------------------------------------------------------------------------------------------------- helpers


def submit(argv: list[str], entry: str = STANDIN) -> submitit.Job:
    """`fcmae submit ARGV` in this process, returning the job (main() would drop it)."""
    args = build_parser().parse_args(["submit", *argv])
    return args.func(args, entry=entry)


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path} missing)"


def wait_done(job: submitit.Job, timeout_s: float = JOB_TIMEOUT_S) -> None:
    """Wait for the job to end; on time-out cancel it and fail with its logs."""
    deadline, last_force = time.monotonic() + timeout_s, 0.0
    while True:
        force = time.monotonic() - last_force > 5  # ask the scheduler now and then, the result file otherwise
        last_force = time.monotonic() if force else last_force
        if job.done(force_check=force):
            return
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} did not finish in {timeout_s} s:\n{tail(job.paths.stdout)}\n"
                        f"{tail(job.paths.stderr)}")
        time.sleep(0.5)


def wait_for(predicate, what: str, timeout_s: float = JOB_TIMEOUT_S, job: submitit.Job | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            logs = f"\n{tail(job.paths.stdout)}\n{tail(job.paths.stderr)}" if job else ""
            if job:
                job.cancel(check=False)
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}{logs}")
        time.sleep(0.2)


def checkpoint_step(path: Path) -> int:
    """Step stored in a checkpoint, -1 while there is none (files appear atomically, so a read sees a whole one)."""
    return torch.load(path, weights_only=True)["step"] if path.exists() else -1


def sacct_states(job_id: str, timeout_s: float = 30) -> list[str]:
    """Every state Slurm recorded for the job's allocation, earlier attempts included (-D), once the last one is
    final (the result file appears a moment before Slurm sees the job end)."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = subprocess.run(["sacct", "-j", job_id, "-D", "-X", "-n", "-P", "-o", "state"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
        states = [line.split()[0] for line in out.splitlines() if line.strip()]
        if states and states[-1] not in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED"):
            return states
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} still {states} in sacct after {timeout_s} s")
        time.sleep(0.5)


def standin_config(tmp_path: Path, steps: int, step_seconds: float = 0.0, **extra) -> Path:
    cfg = tmp_path / "standin.yaml"
    cfg.write_text("".join(f"{k}: {v}\n" for k, v in dict(steps=steps, step_seconds=step_seconds, **extra).items()))
    return cfg


# ----------------------------------------------------------------------------------------------- CLI, no jobs


def test_submit_is_an_fcmae_command(fcmae_commands, job_env):
    """`python -m fcmae submit` (and the installed `fcmae` script, when there is one) reach jobs/ through the
    entry point; fcmae itself never imports jobs."""
    cmds = [[sys.executable, "-m", "fcmae"]]
    script = Path(sys.executable).with_name("fcmae")
    if script.exists():
        cmds.append([str(script)])
    for cmd in cmds:
        out = subprocess.run(cmd + ["submit", "pretrain", "--help"], capture_output=True, text=True, timeout=120,
                             env=job_env, check=True).stdout
        for option in ("--job-dir", "--gpus-per-node", "--tasks-per-node", "--partition", "--timeout-min",
                       "--max-requeues", "--cluster"):
            assert option in out


def test_fcmae_never_imports_jobs():
    """The layering the entry point exists for: no module of fcmae/ imports jobs (checked on the source)."""
    for path in (REPO / "fcmae").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "jobs" or n.startswith("jobs.") for n in names), path


@pytest.mark.parametrize("argv, message", [
    (["--config", "missing.yaml"], "--config 'missing.yaml' is neither a file nor a recipe"),
    (["--gpus-per-node", "2", "--tasks-per-node", "3"], "one task per GPU"),
    (["--cluster", "debug", "--tasks-per-node", "2"], "--cluster debug runs one process"),
    (["--cluster", "local", "--nodes", "2"], "runs on this machine only"),
    (["--mem", "12 GB"], "not a Slurm memory size"),
    (["--timeout-min", "0"], "--timeout-min must be at least 1"),
    (["not-an-override"], "is not key=value"),
])
def test_bad_input_fails_before_submitting(fcmae_commands, tmp_path, capsys, argv, message):
    cfg = standin_config(tmp_path, steps=1)
    job_dir = tmp_path / "job"
    base = ["submit", "pretrain", "--config", str(cfg), "--job-dir", str(job_dir), "--cluster", "local"]
    assert main(base + argv) == 2
    assert message in capsys.readouterr().err
    assert not job_dir.exists()  # nothing was submitted


@pytest.mark.parametrize("argv, message", [
    (["optim.epochz=1"], "unknown config key 'optim.epochz'"),
    (["model.mask_ratio=1.5"], "model.mask_ratio must be in (0, 1)"),
    (["optim.lr=.nan"], "'optim.lr' = nan is not a finite number"),
    # the job's world size (3 tasks), not this process's (1), decides whether the global batch splits
    (["--tasks-per-node", "3", "data.batch_size=64"], "divisible by processes x optim.accum_steps = 3 x 1"),
])
def test_submit_checks_the_config_as_the_command_would(fcmae_commands, tmp_path, capsys, argv, message):
    job_dir = tmp_path / "job"
    code = main(["submit", "pretrain", "--config", "demo", "--job-dir", str(job_dir), "--cluster", "local", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not job_dir.exists()


def test_submit_without_slurm_reports_the_config_error_first(fcmae_commands, tmp_path, capsys, monkeypatch):
    """No sbatch here: a bad config is still the line the user sees (it would fail on the cluster too); a good one
    gets the missing-Slurm line."""
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    job_dir = tmp_path / "job"
    base = ["submit", "pretrain", "--config", "demo", "--job-dir", str(job_dir)]
    assert main([*base, "optim.epochz=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown config key 'optim.epochz'" in err, err
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sbatch and srun not found on PATH" in err, err
    assert not job_dir.exists()


def test_submit_without_a_reachable_slurm_says_so_in_one_line(job_env, tmp_path):
    """sbatch on PATH but no controller answering (a login node with Slurm down): one line, no traceback, no job
    folder left behind."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Unable to contact "
                                    "slurm controller (connect failure)' >&2\nexit 1\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for exe in ("sbatch", "srun"):
        (bin_dir / exe).chmod(0o755)
    env = dict(job_env, PATH=f"{bin_dir}{os.pathsep}{job_env['PATH']}")
    job_dir = tmp_path / "job"
    done = subprocess.run([sys.executable, "-m", "fcmae", "submit", "pretrain", "--config", "demo", "--job-dir",
                           str(job_dir)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Unable to contact slurm controller" in done.stderr and "sinfo" in done.stderr
    assert "Traceback" not in done.stderr and not job_dir.exists()


def test_distributed_env_from_slurm_variables(monkeypatch):
    """A 2-node x 4-task Slurm job seen from task 5: torchrun's variables, rendezvous on the first node."""
    for k, v in dict(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4321", SLURM_NTASKS="8", SLURM_JOB_NUM_NODES="2",
                     SLURM_NODEID="1", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_PROCID="5", SLURM_LOCALID="1").items():
        monkeypatch.setenv(k, v)
    env = distributed_env(submitit.JobEnvironment())
    assert env == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                   "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 4321)}
    assert master_port("123456_7") == 20000 + 1234567 % 10000  # array jobs: digits of "<array id>_<task>"


def test_slurm_script_carries_every_option(job_env, tmp_path, monkeypatch, capsys):
    """What reaches sbatch, through submitit's real submission path, with a stand-in `sbatch` on PATH that keeps
    the batch script and answers like Slurm."""
    bin_dir, kept = tmp_path / "bin", tmp_path / "submitted.sh"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {kept}\necho 'Submitted batch job 4242'\n")
    # submitit's SlurmExecutor refuses to start unless `srun` is on PATH too (it is never run here)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for exe in ("sbatch", "srun"):
        (bin_dir / exe).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    job = submit(["pretrain", "--config", str(standin_config(tmp_path, steps=1)), "--job-dir", str(tmp_path / "j"),
                  "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "6", "--partition", "gpu",
                  "--account", "acct", "--qos", "high", "--constraint", "a100", "--mem", "0", "--exclusive",
                  "--comment", "fcmae test", "--timeout-min", "90"])
    assert job.job_id == "4242" and "squeue -j 4242" in capsys.readouterr().out
    script = kept.read_text()
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=6", "--partition=gpu",
                 "--account=acct", "--qos=high", "--constraint=a100", "--mem=0", "--exclusive", "--time=90",
                 "--signal=USR2@90", "--job-name=fcmae-pretrain", f"--output={tmp_path / 'j' / 'logs'}/%j_0_log.out"):
        assert f"#SBATCH {line}\n" in script, line
    assert "--comment" in script and "fcmae test" in script
    # A CPU job asks for no GPU at all (sites without GPU GRES reject --gpus-per-node=0).
    submit(["pretrain", "--config", str(standin_config(tmp_path, steps=1)), "--job-dir", str(tmp_path / "k"),
            "--tasks-per-node", "3"])
    script = kept.read_text()
    assert "#SBATCH --ntasks-per-node=3\n" in script and "gpus" not in script


# ------------------------------------------------------------------------------------------ debug and local


def test_debug_executor_runs_in_this_process(job_env, tmp_path, capsys):
    job = submit(["pretrain", "--config", str(standin_config(tmp_path, steps=5)), "--job-dir", str(tmp_path / "job"),
                  "--cluster", "debug"])
    state = torch.load(tmp_path / "job" / "last.pt", weights_only=True)  # output_dir defaults to the job dir
    assert state["step"] == 5 and state["world_size"] == 1 and state["starts"] == [0]
    assert state["x"].item() == expected_x(5, world_size=1)
    assert "RANK" not in os.environ and "MASTER_PORT" not in os.environ  # restored after the in-process run
    assert f"Job {job.job_id} finished" in capsys.readouterr().out


def test_local_executor_two_tasks(job_env, tmp_path, capsys):
    run_dir = tmp_path / "elsewhere"
    job = submit(["pretrain", "--config", str(standin_config(tmp_path, steps=4)), f"output_dir={run_dir}",
                  "--job-dir", str(tmp_path / "job"), "--cluster", "local", "--tasks-per-node", "2"])
    out = capsys.readouterr().out
    assert f"Submitted job {job.job_id}" in out and f"tail -f {job.paths.stdout}" in out
    wait_done(job)
    assert job.results() == [0, 0], tail(job.paths.stderr)
    state = torch.load(run_dir / "last.pt", weights_only=True)  # an explicit output_dir wins over the job dir
    assert state["world_size"] == 2 and state["ranks_seen"] == [1.0, 1.0] and state["master_addr"]
    assert state["x"].item() == expected_x(4, world_size=2)
    assert (tmp_path / "job" / "logs").is_dir() and not (tmp_path / "job" / "last.pt").exists()


# -------------------------------------------------------------------------------------- real Slurm, stand-in


def test_slurm_preempted_job_requeues_and_resumes(slurm, job_env, tmp_path, capsys):
    """A 2-task job in the low partition is preempted by a job in the high one: SIGUSR2, checkpoint(), requeue;
    the second attempt resumes from last.pt and ends exactly where an uninterrupted run ends."""
    steps, job_dir = 12, tmp_path / "job"
    job = submit(["pretrain", "--config", str(standin_config(tmp_path, steps, step_seconds=0.5)),
                  "--job-dir", str(job_dir), "--partition", slurm, "--tasks-per-node", "2", "--timeout-min", "30"])
    out = capsys.readouterr().out
    assert f"squeue -j {job.job_id}" in out and f"tail -f {job.paths.stdout}" in out
    wait_for(lambda: checkpoint_step(job_dir / "last.pt") >= 1, "the first checkpoint", job=job)
    high = subprocess.run(["sbatch", "--parsable", "-p", "high", "-n", "2", "-o", str(tmp_path / "high.out"),
                           "--wrap", "sleep 1"], capture_output=True, text=True, timeout=30, check=True)
    wait_done(job)
    assert job.results() == [0, 0], tail(job.paths.stderr)
    state = torch.load(job_dir / "last.pt", weights_only=True)
    assert state["step"] == steps and state["x"].item() == expected_x(steps, world_size=2)
    assert len(state["starts"]) == 2 and 0 < state["starts"][1] < steps, state["starts"]  # resumed, mid-run
    assert state["ranks_seen"] == [1.0, 1.0] and state["master_addr"] == os.uname().nodename.split(".")[0]
    log = job.paths.stdout.read_text()
    assert "this job is preempted" in log and "requeuing (requeue 1 of at most 20)" in log
    assert f"attempt 2 (requeues left: 19) of job {job.job_id} resumes from {job_dir / 'last.pt'}" in log
    assert sacct_states(job.job_id) == ["REQUEUED", "COMPLETED"]
    assert sacct_states(high.stdout.strip().split(";")[0]) == ["COMPLETED"]


def test_slurm_failing_job_stops_with_its_error(slurm, job_env, tmp_path):
    job_dir = tmp_path / "job"
    job = submit(["pretrain", "--config", str(standin_config(tmp_path, steps=4, fail_at_step=2)),
                  "--job-dir", str(job_dir), "--partition", slurm, "--timeout-min", "30"])
    wait_done(job)
    with pytest.raises(submitit.core.utils.FailedJobError, match="stand-in failure at step 2"):
        job.results()
    # The result file can land before the task's traceback is flushed to its log.
    wait_for(lambda: "stand-in failure at step 2" in tail(job.paths.stderr), "the error in the job's log", 30)
    assert torch.load(job_dir / "last.pt", weights_only=True)["starts"] == [0]  # not requeued
    assert sacct_states(job.job_id) == ["FAILED"]


def test_slurm_requeues_are_bounded(slurm, job_env, tmp_path):
    """With --max-requeues 0 the first preemption ends the job, with the reason in its error."""
    job_dir = tmp_path / "job"
    job = submit(["pretrain", "--config", str(standin_config(tmp_path, steps=40, step_seconds=0.5)),
                  "--job-dir", str(job_dir), "--partition", slurm, "--timeout-min", "30", "--max-requeues", "0"])
    wait_for(lambda: checkpoint_step(job_dir / "last.pt") >= 1, "the first checkpoint", job=job)
    subprocess.run(["scancel", "--signal=USR2", job.job_id], timeout=30, check=True)
    wait_done(job)
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="checkpoint function returned None"):
        job.results()
    assert "not requeuing: the job was requeued 0 times already (--max-requeues 0)" in job.paths.stdout.read_text()
    assert checkpoint_step(job_dir / "last.pt") < 40 and "REQUEUED" not in sacct_states(job.job_id)


# ------------------------------------------------------------------------------- real Slurm, fcmae pretrain


def pretrain_argv(job_dir: Path, *extra: str) -> list[str]:
    return ["pretrain", "--config", str(PRETRAIN_CONFIG), *PRETRAIN_OVERRIDES, "--job-dir", str(job_dir), *extra]


def model_state(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["format"] == "fcmae" and ckpt["step"] > 0
    return ckpt["model"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, slurm, fcmae_commands) -> Path:
    """An uninterrupted 2-task pretraining job on Slurm, submitted with `fcmae submit`; its run directory."""
    job_dir = tmp_path_factory.mktemp("pretrain") / "job"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), fcmae_commands,
                                                                  os.environ.get("PYTHONPATH", "")) if p))
    cmd = [sys.executable, "-m", "fcmae", "submit",
           *pretrain_argv(job_dir, "--partition", slurm, "--tasks-per-node", "2", "--timeout-min", "30", "--wait")]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=JOB_TIMEOUT_S * 2, env=env)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--name=fcmae-pretrain"], timeout=30)
        pytest.fail(f"fcmae submit --wait did not return in {JOB_TIMEOUT_S * 2} s")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Submitted job" in done.stdout and "Job " in done.stdout and "finished" in done.stdout
    return job_dir


def test_slurm_pretrain_job_writes_its_checkpoint(pretrained):
    state = model_state(pretrained / "last.pt")
    assert any(k.startswith("encoder.") for k in state) and any(k.startswith("decoder.") for k in state)
    assert (pretrained / "config.yaml").exists() and (pretrained / "logs").is_dir()


def test_slurm_pretrain_preempted_resumes_to_the_same_weights(pretrained, slurm, job_env, tmp_path):
    job_dir = tmp_path / "job"
    job = submit(pretrain_argv(job_dir, "--partition", slurm, "--tasks-per-node", "2", "--timeout-min", "30"),
                 entry="fcmae.cli:main")
    wait_for(lambda: (job_dir / "last.pt").exists(), "the first checkpoint", job=job)
    subprocess.run(["scancel", "--signal=USR2", job.job_id], timeout=30, check=True)
    wait_done(job, JOB_TIMEOUT_S * 2)
    assert job.results() == [0, 0], tail(job.paths.stderr)
    log = job.paths.stdout.read_text()
    assert "requeuing (requeue 1" in log, "the job finished before it was preempted: lengthen PRETRAIN_OVERRIDES"
    assert f"resumes from {job_dir / 'last.pt'}" in log and sacct_states(job.job_id) == ["REQUEUED", "COMPLETED"]
    ref, got = model_state(pretrained / "last.pt"), model_state(job_dir / "last.pt")
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_local_pretrain_job(job_env, tmp_path):
    job = submit(pretrain_argv(tmp_path / "job", "--cluster", "local", "--tasks-per-node", "2"),
                 entry="fcmae.cli:main")
    wait_done(job, JOB_TIMEOUT_S * 2)
    assert job.results() == [0, 0], tail(job.paths.stderr)
    assert model_state(tmp_path / "job" / "last.pt")


def test_slurm_two_nodes_preempted_resumes_to_the_same_weights(slurm_two_nodes, pretrained, job_env, tmp_path,
                                                               monkeypatch):
    """`fcmae submit --nodes 2` on two real slurmd, each node a network namespace with its own address and hostname:
    one task per node (LOCAL_RANK 0 on both), rendezvous on the first node; preempted (SIGUSR2) after its first
    checkpoint, requeued on both nodes, resumed, and ends with the weights of the one-node, two-task job."""
    monkeypatch.setenv("SLURM_CONF", slurm_two_nodes)
    job_dir = tmp_path / "job"
    job = submit(pretrain_argv(job_dir, "--partition", "two", "--nodes", "2", "--timeout-min", "30"),
                 entry="fcmae.cli:main")
    wait_for(lambda: (job_dir / "last.pt").exists(), "the first checkpoint", job=job)
    subprocess.run(["scancel", "--signal=USR2", job.job_id], timeout=30, check=True)
    wait_done(job, JOB_TIMEOUT_S * 2)
    assert job.results() == [0, 0], tail(job.paths.stderr)
    log, log1 = job.paths.stdout.read_text(), job.task(1).paths.stdout.read_text()
    assert "hostname=fcmae-n1, local_rank=0(1), node=0(2), global_rank=0(2)" in log
    assert "hostname=fcmae-n2, local_rank=0(1), node=1(2), global_rank=1(2)" in log1
    assert "rendezvous fcmae-n1:" in log and "world size 2" in log and "requeuing (requeue 1" in log
    assert f"resumes from {job_dir / 'last.pt'}" in log
    ref, got = model_state(pretrained / "last.pt"), model_state(job_dir / "last.pt")
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
