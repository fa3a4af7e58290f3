"""One job on two "nodes": two torchrun processes on this machine (`--nnodes=2 --nproc_per_node=1`, c10d rendezvous on
127.0.0.1, gloo on CPU), the way a two-node cluster job starts (LOCAL_RANK 0 on both, RANK 0 and 1).

They run the demo recipes, shortened, as a user would: a pretraining, then a fine-tuning from it. Each is killed
mid-run by SIGKILL to one node's torchrun and its worker at once (the node hosting rank 1 for the pretraining,
rank 0 for the fine-tuning), which must fail the job; rerunning both nodes must resume from last.pt and end with the weights of an
uninterrupted single-process run with the same global batch (fp32, reduction-order tolerance), which only holds when
each rank trained on its own share of every global batch. Python's audit hooks (tests/fcmae_audited.py) record
every file each process writes: only global rank 0 may write into the run folder.

What one machine cannot show: the nodes share a filesystem here. A node-local output_dir is emulated by giving
each node its own folder: a rerun where only one node sees last.pt must be refused before data is read or anything
is written.
"""
from __future__ import annotations

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

from fcmae.config import load_config
from fcmae.finetune import finetune
from fcmae.finetune_config import FinetuneConfig
from fcmae.pretrain import pretrain
from fcmae.pretrain_config import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]
AUDITED = Path(__file__).resolve().parent / "fcmae_audited.py"
LAUNCH_TIMEOUT_S = 150
# configs/pretrain/demo.yaml shortened: 64 digits / global batch 16 = 4 steps per epoch, 2 epochs, small decoder
PRETRAIN = ["--config", str(ROOT / "configs/pretrain/demo.yaml"), "optim.epochs=2", "data.num_samples=64",
            "data.batch_size=16", "model.decoder_dim=32", "monitor.every_epochs=0", "log.vis_every_epochs=2",
            "log.vis_images=2", "checkpoint.every_steps=1", "log.every_steps=1", "log.progress=false"]
# configs/finetune/demo.yaml shortened: 100 labeled digits / global batch 20 = 5 steps per epoch, 2 epochs, EMA
FINETUNE = ["--config", str(ROOT / "configs/finetune/demo.yaml"), "optim.epochs=2", "data.batch_size=20",
            "data.digits_val=50", "data.eval_every_epochs=1", "checkpoint.every_steps=1", "log.every_steps=1"]
KILL_AT_STEP = 3  # a node dies once the job has logged this step


def close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k, w in want.items():
        torch.testing.assert_close(got[k], w, rtol=1e-4, atol=1e-5, msg=k)


def rows(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (from /proc: torchrun starts each worker in a session of its own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree = [pid]
    for p in tree:
        tree.extend(children.get(p, []))
    return tree


class Node:
    """One torchrun (one "node"): its agent and its worker."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str]):
        self.log = log
        with open(log, "w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL to the agent and its worker at once, as when a node dies."""
        for pid in process_tree(self.proc.pid) if self.proc.poll() is None else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()


class Job:
    """Two torchrun nodes running `fcmae_audited.py WATCH RECORDS ARGS` (i.e. `fcmae ARGS`) as one job."""

    def __init__(self, tmp: Path, name: str, watch: Path, *node_args: list[str]):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.records = tmp / f"records-{name}"
        self.records.mkdir()
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p))
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                    "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={name}",
                    "--local_addr=127.0.0.1", str(AUDITED), str(watch), str(self.records)]
        self.nodes = [Node(torchrun + args, tmp / f"{name}-node{i}.log", env) for i, args in enumerate(node_args)]

    def logs(self) -> str:
        return "\n".join(f"--- {n.log.name} (exit {n.proc.poll()}):\n{n.text()[-2500:]}" for n in self.nodes)

    def wait(self) -> list[int]:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        try:
            return [n.proc.wait(timeout=max(1.0, deadline - time.monotonic())) for n in self.nodes]
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the two nodes did not finish within {LAUNCH_TIMEOUT_S} s:\n{self.logs()}")

    def kill(self) -> None:
        for n in self.nodes:
            n.kill()

    def main_node(self, banner: str) -> int:
        """Which node hosts global rank 0 (the c10d rendezvous decides): the one that printed the banner."""
        found = [i for i, n in enumerate(self.nodes) if banner in n.text()]
        assert len(found) == 1, f"rank 0's banner {banner!r} should be in one node's output:\n{self.logs()}"
        return found[0]

    def wait_for_step(self, out: Path, step: int) -> None:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while time.monotonic() < deadline:
            if any(n.proc.poll() is not None for n in self.nodes):
                self.kill()
                pytest.fail(f"a node ended before step {step}:\n{self.logs()}")
            metrics = out / "metrics.jsonl"
            if metrics.exists() and f'"step": {step},' in metrics.read_text():  # a row of that step is written
                return
            time.sleep(0.05)
        self.kill()
        pytest.fail(f"no step {step} within {LAUNCH_TIMEOUT_S} s:\n{self.logs()}")

    def writes(self) -> dict[int, list[list[str]]]:
        """Global rank -> the writes its process made in the watched folder, as [event, relative path]."""
        found: dict[int, list[list[str]]] = {}
        for f in self.records.glob("rank*-*.jsonl"):
            found.setdefault(int(f.name[4:].split("-")[0]), []).extend(map(json.loads, f.read_text().splitlines()))
        assert sorted(found) == [0, 1], f"expected the records of ranks 0 and 1: {sorted(found)}"
        return found


def run_killed_then_resumed(tmp: Path, name: str, args: list[str], out: Path, banner: str, kill_main: bool,
                            steps: int) -> None:
    """Start the job, kill one node at KILL_AT_STEP (the job must fail), rerun both nodes to the end (`steps`).
    Asserts that the rerun resumed from the killed run's last.pt, that both runs wrote only from global rank 0, and
    that every step was logged once."""
    first = Job(tmp, f"{name}-1", out.parent, args, args)
    try:
        first.wait_for_step(out, KILL_AT_STEP)
        main = first.main_node(banner)
        victim, survivor = (first.nodes[main], first.nodes[1 - main]) if kill_main else \
            (first.nodes[1 - main], first.nodes[main])
        victim.kill()
        try:
            code = survivor.proc.wait(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the surviving node still runs {LAUNCH_TIMEOUT_S} s after the other died:\n{first.logs()}")
        assert code != 0, "the job must fail when a node dies:\n" + first.logs()
    finally:
        first.kill()
    killed_at = state(out / "last.pt")["step"]
    assert 1 <= killed_at < steps
    rerun = Job(tmp, f"{name}-2", out.parent, args, args)
    try:
        assert rerun.wait() == [0, 0], rerun.logs()
    finally:
        rerun.kill()
    said = rerun.nodes[rerun.main_node(banner)].text()
    assert f"resumed from {out / 'last.pt'}: " in said and f"step {killed_at}\n" in said, said[-2000:]
    for job in (first, rerun):
        writes = job.writes()
        assert writes[1] == [], f"rank 1 wrote into the run: {writes[1]}"
        assert ["os.rename", f"{out.name}/last.pt"] in writes[0]  # the audit does see rank 0's checkpoints
    assert [r["step"] for r in rows(out, "step")] == list(range(1, steps + 1))  # each step logged once


@pytest.fixture(scope="module")
def reference_pretraining(tmp_path_factory) -> Path:
    """The same pretraining in one process, uninterrupted: the oracle."""
    out = tmp_path_factory.mktemp("one-process") / "pretrain"
    pretrain(load_config(PretrainConfig, PRETRAIN[1], PRETRAIN[2:] + [f"output_dir={out}"]))
    return out


def test_two_node_pretraining_survives_a_dead_node_and_equals_one_process(tmp_path, reference_pretraining):
    out = tmp_path / "shared" / "pretrain"
    run_killed_then_resumed(tmp_path, "pretrain", ["pretrain", *PRETRAIN, f"output_dir={out}"], out,
                            "fcmae pretrain: ", kill_main=False, steps=8)
    got, want = state(out / "last.pt"), state(reference_pretraining / "last.pt")
    assert got["step"] == want["step"] == 8
    close(got["model"], want["model"])
    for g, w in zip(rows(out, "epoch"), rows(reference_pretraining, "epoch"), strict=True):
        assert g["epoch"] == w["epoch"] and g["loss"] == pytest.approx(w["loss"], abs=1e-4)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference_pretraining.iterdir())


def test_two_node_finetuning_survives_losing_rank_0_and_equals_one_process(tmp_path, reference_pretraining):
    from safetensors.torch import load_file

    init = f"model.init={reference_pretraining / 'last.pt'}"
    ref = tmp_path / "one-process"
    finetune(load_config(FinetuneConfig, FINETUNE[1], FINETUNE[2:] + [init, f"output_dir={ref}"]))
    out = tmp_path / "shared" / "finetune"
    run_killed_then_resumed(tmp_path, "finetune", ["finetune", *FINETUNE, init, f"output_dir={out}"], out,
                            "fcmae finetune: ", kill_main=True, steps=10)
    for name in ("model.safetensors", "model-ema.safetensors"):
        close(load_file(out / name), load_file(ref / name))
    close(state(out / "best.pt")["model"], state(ref / "best.pt")["model"])
    for g, w in zip(rows(out, "epoch"), rows(ref, "epoch"), strict=True):
        assert (g["epoch"], g["top1"], g["ema_top1"]) == (w["epoch"], w["top1"], w["ema_top1"])


def test_a_node_that_cannot_see_last_pt_is_refused(tmp_path, reference_pretraining):
    """A node-local output_dir, emulated: the same path on each node would be a different disk, so give each node its
    own folder; only one holds last.pt (of a finished run). Both must stop before reading data or writing anything."""
    local = [tmp_path / "node0" / "run", tmp_path / "node1" / "run"]
    local[0].mkdir(parents=True)
    shutil.copy(reference_pretraining / "last.pt", local[0] / "last.pt")
    args = ["pretrain", *PRETRAIN]
    job = Job(tmp_path, "local", tmp_path, *[args + [f"output_dir={d}"] for d in local])
    try:
        codes = job.wait()
    finally:
        job.kill()
    assert codes[0] != 0 and codes[1] != 0, job.logs()
    for node in job.nodes:
        line = [x for x in node.text().splitlines() if x.startswith("fcmae pretrain: ")]
        assert len(line) == 1 and line[0].startswith("fcmae pretrain: error: "), job.logs()  # no banner: no data
        assert ("disagree on where to resume" in line[0] and "resumes from step 8 of" in line[0]
                and "finds no checkpoint" in line[0] and "not a node-local disk" in line[0]), line[0]
    assert sorted(p.name for p in local[0].iterdir()) == ["last.pt"] and not local[1].exists()
    assert all(not w for w in job.writes().values()), job.writes()
