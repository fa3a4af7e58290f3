"""A run owns its output_dir (issue 28): a live run's folder refuses a second run, naming the holder, and a kill -9
leaves no lock behind; a run never overwrites or deletes a file it did not make; resuming with a changed config is
refused unless the change is accepted on purpose, and every segment's config is kept."""
import datetime
import errno
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

from fcmae.config import load_config, to_dict
from fcmae.engine import lock as lock_mod
from fcmae.engine.changes import resume_changes
from fcmae.engine.lock import LOCK_NAME, RunLock
from fcmae.finetune_config import FinetuneConfig
from fcmae.pretrain import pretrain
from fcmae.pretrain_config import PretrainConfig
from test_bad_input import cli, one_line

# atto, 64 px, decoder 32; 24 images / batch 8 = 3 steps per epoch, a checkpoint and a row after every step
BASE = ["device=cpu", "model.decoder_dim=32", "model.mask_ratio=0.5", "data.image_size=64", "data.batch_size=8",
        "data.num_workers=0", "optim.epochs=2", "optim.warmup_epochs=0", "optim.lr=2e-3", "checkpoint.every_steps=1",
        "checkpoint.keep_every_epochs=0", "log.every_steps=1", "log.vis_every_epochs=0", "log.progress=false",
        "log.tensorboard=false"]

# A real pretraining that stops at step 2 (last.pt of step 2 written) and stays alive, holding its output_dir.
HOLDER = r"""
import sys, time
from fcmae.config import load_config
from fcmae.pretrain import pretrain
from fcmae.pretrain_config import PretrainConfig

def hold_at_step_2(step, loss):
    if step == 2:
        open(sys.argv[1], "w").close()
        time.sleep(600)
    return loss

pretrain(load_config(PretrainConfig, None, sys.argv[2:]), on_loss=hold_at_step_2)
"""


def snapshot(folder) -> dict:
    """{relative path: bytes} of every file under `folder`, hidden ones included."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = open(path, "rb").read()
    return found


def step_rows(out) -> list[int]:
    return [r["step"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if r["kind"] == "step"]


def history(out) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out, "config-history.jsonl"))]


def test_a_live_run_holds_its_folder_and_kill_9_frees_it(tmp_path, folder):
    out, marker = tmp_path / "run", tmp_path / "holding"
    args = [*BASE, f"output_dir={out}", f"data.path={folder}"]
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(marker), *args], stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert holder.poll() is None, holder.stderr.read()
            assert time.monotonic() < deadline, "the holder never reached step 2"
            time.sleep(0.2)
        before = snapshot(out)
        r = cli("pretrain", *args)  # the same command, while the first run lives
        assert r.returncode == 2
        one_line(r.stderr, f"fcmae pretrain: error: output_dir '{out}' is in use by another run "
                           f"(pid {holder.pid} on host {socket.gethostname()}, since ", "choose another output_dir")
        assert snapshot(out) == before and step_rows(out) == [1, 2]  # nothing written, no row twice
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    r = cli("pretrain", *args)  # the dead run's lock died with it: the rerun resumes
    assert r.returncode == 0, r.stderr
    assert f"resumed from {out / 'last.pt'}: epoch 0, step 2" in r.stdout
    assert step_rows(out) == [1, 2, 3, 4, 5, 6]
    assert [(h["segment"], h["start_step"]) for h in history(out)] == [(1, 0), (2, 2)]


def test_a_folder_of_the_users_files_is_refused_or_left_intact(tmp_path, folder):
    """A fresh run refuses a folder where a name it writes holds the user's file (nothing written), and leaves every
    other file alone: submitit's logs/, notes, a hidden file that looks like a temp file."""
    out = tmp_path / "mine"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "123_submitted.pkl").write_bytes(b"submitit")
    (out / "notes.txt").write_text("my notes")
    (out / ".draft.tmp-1").write_text("a draft")
    (out / "config.yaml").write_text("my: config\n")
    args = [*BASE, "optim.epochs=1", f"output_dir={out}", f"data.path={folder}"]
    before = snapshot(out)
    r = cli("pretrain", *args)
    assert r.returncode == 2
    one_line(r.stderr, f"output_dir '{out}' already holds config.yaml, which this run would overwrite",
             "move them away, or choose another output_dir")
    assert snapshot(out) == before
    (out / "config.yaml").rename(tmp_path / "config.yaml")  # moved away: the run goes ahead beside the rest
    del before["config.yaml"]
    r = cli("pretrain", *args)
    assert r.returncode == 0, r.stderr
    after = snapshot(out)
    assert {k: after[k] for k in before} == before  # every file of the user's, byte for byte
    assert {"last.pt", "config.yaml", "metrics.jsonl", LOCK_NAME} <= set(after)


def test_resuming_with_another_config_is_refused_unless_accepted(tmp_path, folder):
    out = str(tmp_path / "run")
    pretrain(load_config(PretrainConfig, None, [*BASE, "optim.epochs=1", f"output_dir={out}", f"data.path={folder}"]))
    before = snapshot(out)
    args = [*BASE, f"output_dir={out}", f"data.path={folder}", "seed=1", "data.image_size=96", "log.every_steps=2"]
    r = cli("pretrain", *args)
    assert r.returncode == 2
    line = one_line(r.stderr, f"output_dir='{out}' (its last.pt) was trained with another config",
                    "seed: 0 in the existing run, 1 now", "data.image_size: 64 in the existing run, 96 now",
                    "choose another output_dir", "'accept_changes=[seed,data.image_size]'")
    assert "optim.epochs" not in line and "log.every_steps" not in line  # free to change
    assert snapshot(out) == before
    accept = [t for t in shlex.split(line) if t.startswith("accept_changes=")]  # the line's own advice
    r = cli("pretrain", *args, *accept)
    assert r.returncode == 0, r.stderr
    assert ("config changed on resume (recorded in config-history.jsonl): seed 0 -> 1 (accepted); optim.epochs "
            "1 -> 2; log.every_steps 1 -> 2; data.image_size 64 -> 96 (accepted)\n") in r.stdout
    first, second = history(out)
    assert (first["start_step"], first["config"]["seed"], first["config"]["data"]["image_size"]) == (0, 0, 64)
    assert (second["start_step"], second["config"]["seed"], second["config"]["data"]["image_size"]) == (3, 1, 96)
    assert second["changes"]["seed"] == {"old": 0, "new": 1, "accepted": True}
    assert second["changes"]["optim.epochs"] == {"old": 1, "new": 2, "accepted": False}
    assert load_config(PretrainConfig, os.path.join(out, "config.yaml")).seed == 1  # config.yaml: the latest


def test_killed_before_its_first_checkpoint_reruns_without_rows_twice(tmp_path, folder):
    out = str(tmp_path / "run")
    cfg = load_config(PretrainConfig, None, [*BASE, "checkpoint.every_steps=100", f"output_dir={out}",
                                             f"data.path={folder}"])

    def die_at_step_2(step, loss):
        if step == 2:
            raise KeyboardInterrupt("killed")
        return loss

    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, on_loss=die_at_step_2)
    assert not os.path.exists(os.path.join(out, "last.pt")) and step_rows(out) == [1, 2]
    assert pretrain(cfg)["step"] == 6  # its own folder (the lock file says so): a fresh start
    assert step_rows(out) == [1, 2, 3, 4, 5, 6]
    assert [h["start_step"] for h in history(out)] == [0, 0]


def fork(fn) -> int:
    """Run fn() (-> an exit status) in a forked child, another process as far as POSIX locks go; -> its pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = fn()
        finally:
            os._exit(code)  # never back into pytest
    return pid


def exit_status(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def forked(fn) -> int:
    """Exit status of fn() run in a forked child."""
    return exit_status(fork(fn))


def try_lock(folder) -> int:
    """0: took the lock; 3: refused, naming this test's process as the holder."""
    try:
        RunLock.take(str(folder), create=False).release()
        return 0
    except ValueError as e:
        return 3 if f"pid {os.getppid()} on host" in str(e) else 4


def test_the_lock_is_the_process_s_alone(tmp_path):
    """Another process is refused while this one holds the lock; a forked child (a DataLoader worker) does not keep
    it once its parent lets go; two fresh runs racing for a new folder: the second one to create the lock file is
    refused."""
    (tmp_path / LOCK_NAME).touch()
    held = RunLock.take(str(tmp_path), create=False)
    held.record()
    assert forked(lambda: try_lock(tmp_path)) == 3
    worker = os.fork()
    if worker == 0:  # holds the inherited descriptor, alive after the parent releases
        time.sleep(5)
        os._exit(0)
    try:
        held.release()
        assert forked(lambda: try_lock(tmp_path)) == 0
    finally:
        os.kill(worker, signal.SIGKILL)
        os.waitpid(worker, 0)
    with pytest.raises(ValueError, match=f"was taken by another run \\(pid {os.getpid()} on host .*while this one "
                                         "was loading its data"):
        RunLock.take(str(tmp_path), create=True)


def test_a_filesystem_without_locks_warns_and_runs(tmp_path, monkeypatch, capsys):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(lock_mod.fcntl, "lockf", no_locks)
    lock = RunLock.take(str(tmp_path), create=True)
    assert not lock.held
    one_line(capsys.readouterr().err, "fcmae: warning:", "cannot be locked (No locks available",
             "start one run per output_dir")
    lock.record()
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_finetune_keys_that_may_change_on_resume(tmp_path):
    """Evaluation cadence and batch, workers, epochs, logs: free. Augmentation or EMA: refused unless accepted (a
    section accepts its keys). The model keys are the header's (a checkpoint cannot hold another model)."""
    base = ["data.format=digits", f"output_dir={tmp_path}"]
    old = to_dict(load_config(FinetuneConfig, None, base))
    resume = (str(tmp_path / "last.pt"), {"config": old})
    header = {"model_args": {"name": None, "num_classes": None, "in_chans": None, "patch_size": None}}

    def changes(*overrides):
        return [str(c) for c in resume_changes(load_config(FinetuneConfig, None, base + list(overrides)), resume,
                                               header)]

    assert changes() == []
    assert changes("data.eval_batch_size=8", "data.eval_every_epochs=2", "data.num_workers=0", "optim.epochs=300",
                   "model.num_classes=10") == ["optim.epochs 100 -> 300", "data.eval_batch_size 256 -> 8",
                                               "data.eval_every_epochs 1 -> 2", "data.num_workers 8 -> 0"]
    with pytest.raises(ValueError, match=r"\(aug.mixup: 0.8 in the existing run, 0.0 now; ema.decay: 0.9999 in the "
                                         r"existing run, 0.99 now\).*'accept_changes=\[aug.mixup,ema.decay\]'"):
        changes("aug.mixup=0", "ema.decay=0.99")
    assert changes("aug.mixup=0", "ema.decay=0.99", "accept_changes=[aug,ema.decay]") == [
        "aug.mixup 0.8 -> 0.0 (accepted)", "ema.decay 0.9999 -> 0.99 (accepted)"]


def test_every_rank_of_a_job_stops_with_rank_0_s_line(tmp_path, folder):
    """A two-process job (gloo, as torchrun runs it) started in a folder a live run holds: rank 0 is refused and both
    ranks raise its one line (none waits for rank 0 in a collective); rank 1 never touches the folder."""
    import torch.distributed as dist

    from fcmae.engine.distributed import DistInfo
    from fcmae.engine.rundir import claim
    from fcmae.pretrain import checkpoint_header

    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).touch()
    held = RunLock.take(str(out), create=False)  # this process: the live run
    held.record()
    cfg = load_config(PretrainConfig, None, [*BASE, f"output_dir={out}", f"data.path={folder}"])

    def rank(r: int) -> int:  # a rank left waiting for rank 0 fails after 60 s instead of hanging
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=r, world_size=2,
                                timeout=datetime.timedelta(seconds=60))
        try:
            claim(cfg, DistInfo(rank=r, world_size=2), None, checkpoint_header(cfg), ())
        except ValueError as e:
            (tmp_path / f"rank{r}.txt").write_text(str(e))
        dist.destroy_process_group()
        return 0

    pids = [fork(lambda r=r: rank(r)) for r in (0, 1)]
    assert [exit_status(pid) for pid in pids] == [0, 0]
    said = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert said[0] == said[1] and f"is in use by another run (pid {os.getpid()} on host" in said[0]
    held.release()
