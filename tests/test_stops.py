"""A training run stopped from outside (issue 28): Ctrl-C / SIGTERM stop after the optimizer step in progress with
last.pt written there, a full disk stops at the failed write with the previous last.pt intact. Each ends with one
stderr line (where it stopped, what last.pt holds), exit status 130 / 143 / 1 and no traceback, and the same command
then resumes to weights bit-equal to an uninterrupted run's (CPU). Real processes, real signals, a real full tmpfs."""
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from convnextv2.checkpoint.io import TMP_PREFIX
from fcmae.cli import main
from fcmae.engine.stop import Interrupted, StopSignals
from test_bad_input import one_line

ROOT = Path(__file__).resolve().parents[1]
# atto at 64 px, 24 images / batch 8 = 3 steps an epoch, 3 epochs; last.pt only at epoch ends unless a stop writes it
ARGS = ["pretrain", "device=cpu", "model.decoder_dim=32", "model.mask_ratio=0.5", "data.image_size=64",
        "data.batch_size=8", "data.num_workers=1", "optim.epochs=3", "optim.warmup_epochs=0", "optim.lr=2e-3",
        "checkpoint.every_steps=1000", "checkpoint.keep_every_epochs=0", "log.every_steps=1",
        "log.vis_every_epochs=0", "log.progress=false", "log.tensorboard=false"]
TOTAL_STEPS = 9
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def command(out, data, *extra) -> list[str]:
    return [sys.executable, "-m", "fcmae", *ARGS, f"output_dir={out}", f"data.path={data}", *extra]


def start(cmd: list[str]) -> subprocess.Popen:
    """In a session of its own, as a shell runs a foreground job: a signal to its group reaches its loader workers."""
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)


def wait_for_step_row(proc: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    """Until metrics.jsonl holds a complete step row: the run is training."""
    deadline = time.time() + timeout
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and any('"kind": "step"' in row for row in metrics.read_text().split("\n")[:-1])):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no step row"
        time.sleep(0.02)


def state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_bit_equal(got_path, want_path) -> None:
    got, want = state(got_path), state(want_path)
    assert got["step"] == want["step"] == TOTAL_STEPS
    for k, w in want["model"].items():
        assert torch.equal(got["model"][k], w), k
    for s_got, s_want in zip(got["optimizer"]["state"].values(), want["optimizer"]["state"].values()):
        assert torch.equal(s_got["exp_avg_sq"], s_want["exp_avg_sq"])


def resume_to_the_end(out, folder, reference) -> None:
    """The same command again: resumes, finishes, no error, and equals the uninterrupted run."""
    r = subprocess.run(command(out, folder), capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "resumed from" in r.stdout
    assert_bit_equal(out / "last.pt", reference / "last.pt")
    assert not [n for n in os.listdir(out) if n.startswith(TMP_PREFIX)]  # no temp file left


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    r = subprocess.run(command(out, folder), capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    return out


def test_ctrl_c_stops_after_the_step_then_resumes_bit_equal(folder, reference, tmp_path):
    """SIGINT to the whole process group, as Ctrl-C in a terminal sends it (the loader worker gets it too)."""
    out = tmp_path / "run"
    proc = start(command(out, folder))
    wait_for_step_row(proc, out)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    step = state(out / "last.pt")["step"]
    assert 1 <= step < TOTAL_STEPS
    one_line(err, "fcmae pretrain: interrupted (SIGINT) at epoch ", f", step {step}; {out / 'last.pt'} holds step "
             f"{step}: rerun the same command to resume")
    resume_to_the_end(out, folder, reference)


def test_sigterm_in_an_epoch_s_last_step_then_resumes_bit_equal(folder, reference, tmp_path):
    """A real SIGTERM (sent by the process to itself while its 3rd optimizer step runs: the last of epoch 1): last.pt
    holds the whole epoch's steps, before the epoch's end (its line, its row); the resumed run does that end and
    finishes equal to the uninterrupted one."""
    out = tmp_path / "run"
    code = ("import os, signal, sys; from fcmae.engine import loop; real, n = loop.optimizer_step, []\n"
            "def step(*a, **k):\n"
            "    n.append(1)\n"
            "    if len(n) == 3: os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return real(*a, **k)\n"
            "loop.optimizer_step = step\n"
            "from fcmae.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, *command(out, folder)[3:]], capture_output=True, text=True,
                       env=ENV, timeout=300)
    assert r.returncode == 143
    one_line(r.stderr, f"fcmae pretrain: interrupted (SIGTERM) at epoch 1, step 3; {out / 'last.pt'} holds step 3: "
             "rerun the same command to resume")
    ckpt = state(out / "last.pt")
    assert (ckpt["epoch"], ckpt["epoch_step"], ckpt["step"]) == (0, 3, 3)
    rows = [json.loads(row) for row in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in rows] == [("step", 1), ("step", 2), ("step", 3)]  # none past the stop
    assert "epoch 1/3" not in r.stdout
    resume_to_the_end(out, folder, reference)
    rows = [json.loads(row) for row in (out / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(row) for row in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"], r["loss"]) for r in rows] == [(r["kind"], r["step"], r["loss"]) for r in want]


def test_second_ctrl_c_stops_at_once(folder, tmp_path, capsys, monkeypatch):
    """The first SIGINT asks for a stop after the step; a second one, during that step, stops there and then: no
    checkpoint of a step that did not finish, one line saying what a rerun starts from."""
    from fcmae.engine import loop

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("this process's SIGINT handler is not Python's default")
    real_step = loop.optimizer_step

    def step_twice_interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "optimizer_step", step_twice_interrupted)
    out = tmp_path / "run"
    assert main([*ARGS, f"output_dir={out}", f"data.path={folder}", "data.num_workers=0"]) == 130
    one_line(capsys.readouterr().err, "fcmae pretrain: interrupted (SIGINT) at epoch 1, step 0;",
             "no checkpoint was written yet: rerun the same command to start again")
    assert not (out / "last.pt").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the command's handlers are gone


def test_handlers_leave_a_job_runner_s_own_alone():
    """Under submitit, SIGTERM is submitit's (it requeues on SIGUSR2 and bypasses SIGTERM): a command run in a job
    keeps it; Python's default SIGINT is replaced for the command only."""
    def theirs(signum, frame):
        raise AssertionError("not called")

    before = signal.signal(signal.SIGTERM, theirs)
    try:
        with StopSignals() as stop:
            assert signal.getsignal(signal.SIGTERM) is theirs
            assert StopSignals.installed() is stop
            with stop.deferred():
                os.kill(os.getpid(), signal.SIGINT)
                assert stop.signum == signal.SIGINT  # recorded, not raised
                stop.signum = None
            with pytest.raises(Interrupted) as raised:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # the handler runs between bytecodes
            assert raised.value.exit_status == 130
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert StopSignals.installed() is None
    finally:
        signal.signal(signal.SIGTERM, before)


# --- a full disk -------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A real tmpfs of `size` mounted at `path` (root only: skipped with the reason elsewhere)."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                           text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no mount command to make a small tmpfs")
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], capture_output=True, timeout=60)  # even if a file is open


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill the file system of `folder` up to its last `leave` bytes (pages of 4 KiB) -> the ballast file."""
    ballast = folder / "ballast"
    with open(ballast, "wb", buffering=0) as f:
        free = shutil.disk_usage(folder).free
        if leave:
            f.write(b"\0" * (free - leave))
            return ballast
        for chunk in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * chunk)
    return ballast


def test_full_disk_mid_run_keeps_last_pt_and_resumes_bit_equal(folder, reference, tmp_path):
    """The disk fills up while the run writes (every step: a metrics row, a checkpoint; TensorBoard): whichever
    write fails first ends the run with one line naming the file and the cause, last.pt intact, no temp file; once
    there is space the same command resumes."""
    with tmpfs(tmp_path / "disk", "200m") as disk:
        out = disk / "run"
        cmd = command(out, folder, "checkpoint.every_steps=1", "log.tensorboard=true")
        proc = start(cmd)
        while not (out / "last.pt").exists():
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        ballast = fill(disk)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1
        step = state(out / "last.pt")["step"]  # a complete checkpoint
        line = one_line(err, "fcmae pretrain: error: cannot write ", "No space left on device",
                        f"{out / 'last.pt'} holds step {step}: rerun the same command to resume")
        assert str(out) in line.split("cannot write ")[1].split(":")[0]
        assert not [n for n in os.listdir(out) if n.startswith(TMP_PREFIX)]
        ballast.unlink()
        cmd_again = command(out, folder, "checkpoint.every_steps=1", "log.tensorboard=true")
        assert cmd_again == cmd
        resume_to_the_end(out, folder, reference)


# --- several processes -------------------------------------------------------------------------------------------
def rank_pid(agent: int, rank: int) -> int:
    """The pid of the torchrun worker of `rank` among the agent's children (from /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == agent:  # its parent
                if f"RANK={rank}".encode() in (stat.parent / "environ").read_bytes().split(b"\0"):
                    return int(stat.parent.name)
    raise AssertionError(f"no worker of rank {rank} under torchrun {agent}")


def test_sigterm_to_one_rank_stops_every_rank_at_one_step(folder, tmp_path):
    """Only rank 1 gets SIGTERM: its request rides the step's all-reduce, so both processes stop after the same
    step (a process stopping alone would leave the other waiting in its next all-reduce), rank 0 writes last.pt
    there and says so; the same torchrun command resumes it to the end."""
    out = tmp_path / "ddp"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           *command(out, folder, "data.num_workers=0")[1:]]
    proc = start(cmd)
    wait_for_step_row(proc, out)
    os.kill(rank_pid(proc.pid, 1), signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0
    step = state(out / "last.pt")["step"]
    assert 1 <= step < TOTAL_STEPS
    assert (f"fcmae pretrain: interrupted (SIGTERM) at epoch {(step - 1) // 3 + 1}, step {step}; "
            f"{out / 'last.pt'} holds step {step}") in err
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert state(out / "last.pt")["step"] == TOTAL_STEPS
