"""Experiment trackers (issue 29, point 3): MLflow (a sqlite store) and W&B (offline mode) receive what metrics.jsonl
and TensorBoard receive, read back with MLflow's own client and from W&B's run file; a resumed run continues the
same tracked run with no step logged twice; nothing of a tracker is loaded when it is off; a missing package is
refused before anything runs; a failing tracker never stops the training."""
import json
import os
import socket
import subprocess
import sys

import pytest

from fcmae.engine.trackers import Guarded
from fcmae.pretrain import pretrain
from fcmae.config import load_config
from fcmae.pretrain_config import PretrainConfig
from fcmae.recipes import find_config
from test_bad_input import one_line
from wandb_records import offline_runs

# atto, 64 px, decoder 32; 24 images / batch 8 = 3 steps per epoch, 2 epochs; a reconstruction grid every epoch
BASE = ["device=cpu", "model.decoder_dim=32", "model.mask_ratio=0.5", "data.image_size=64", "data.batch_size=8",
        "data.num_workers=0", "optim.epochs=2", "optim.warmup_epochs=0", "optim.lr=2e-3", "checkpoint.every_steps=2",
        "checkpoint.keep_every_epochs=0", "log.every_steps=1", "log.vis_every_epochs=1", "log.vis_images=2",
        "log.progress=false", "log.tensorboard=false"]
NUMBERS = {"step": ["loss", "lr", "skipped", "img_per_s", "data_wait"],
           "epoch": ["loss", "lr", "skipped", "img_per_s", "data_wait", "seconds"]}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """W&B offline and silent, its own folders in tmp_path; MLflow only where a test points it."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts (./mlruns) land here


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """One sqlite store for the module's runs (creating its tables takes seconds); each test its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def expected(first, second):
    """What a tracker holds after a resume: every row the first process logged, then the second's rows after the
    last step the first one logged (the replayed ones are not sent again)."""
    want = {}
    for kind in NUMBERS:
        logged = [r for r in first if r["kind"] == kind]
        until = max(r["step"] for r in logged)
        want[kind] = logged + [r for r in second if r["kind"] == kind and r["step"] > until]
    return want


def test_mlflow_and_wandb_get_the_run_and_a_resume_continues_it(folder, tmp_path, offline, mlflow_uri):
    from mlflow import MlflowClient

    out, uri = str(tmp_path / "run"), mlflow_uri
    tracked = [*BASE, f"output_dir={out}", f"data.path={folder}", "log.mlflow=true", f"log.mlflow_uri={uri}",
               "log.wandb=true", "log.experiment=fcmae-test"]

    def die_at_step_5(step, loss):  # mid epoch 2; the last checkpoint is step 4's, so step 5 is replayed
        if step == 5:
            raise KeyboardInterrupt("killed")
        return loss

    with pytest.raises(KeyboardInterrupt):
        pretrain(load_config(PretrainConfig, None, tracked), on_loss=die_at_step_5)
    first, ids = rows(out), json.load(open(os.path.join(out, "trackers.json")))
    client = MlflowClient(uri)
    assert client.get_run(ids["mlflow"]["run_id"]).info.status == "KILLED"
    pretrain(load_config(PretrainConfig, None, [*tracked, "log.vis_images=3"]))  # an accepted change
    second = rows(out)
    assert [r["step"] for r in second if r["kind"] == "step"] == [1, 2, 3, 4, 5, 6]  # metrics.jsonl: 5 replaced
    assert json.load(open(os.path.join(out, "trackers.json"))) == ids  # the same tracked runs
    want = expected(first, second)
    pictures = {f"reconstruction-epoch{e}.png": open(os.path.join(out, f"reconstruction-epoch{e}.png"), "rb").read()
                for e in (1, 2)}
    checkpoint = os.path.join(out, "last.pt")

    # MLflow, read back with its own client
    (run,) = client.search_runs([client.get_experiment_by_name("fcmae-test").experiment_id])
    assert run.info.run_id == ids["mlflow"]["run_id"] and run.info.status == "FINISHED"
    for kind, names in NUMBERS.items():
        for name in names:
            got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"{kind}/{name}"))
            assert got == [(r["step"], pytest.approx(r[name], rel=1e-12)) for r in want[kind]], (kind, name)
    params, tags = run.data.params, run.data.tags
    assert params["optim.epochs"] == "2" and params["log.vis_images"] == "2" and params["data.path"] == folder
    assert tags["config.log.vis_images"] == "3"  # params never change: the resumed run's value is a tag
    assert tags["output.checkpoint"] == checkpoint
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "reconstructions")]
    assert artifacts == [f"reconstructions/{name}" for name in pictures]
    local = client.download_artifacts(run.info.run_id, "reconstructions", str(tmp_path / "downloaded"))
    assert {name: open(os.path.join(local, name), "rb").read() for name in pictures} == pictures

    # W&B offline: one folder per process, the same run id, read back from its run files
    segments = offline_runs(out)
    assert [s.run.run_id for s in segments] == [ids["wandb"]["id"]] * 2
    assert [s.run.resume for s in segments] == [False, True] and segments[0].run.project == "fcmae-test"
    for kind, names in NUMBERS.items():
        for name in names:
            got = [p for s in segments for p in s.series(f"{kind}/{name}")]
            assert got == [(r["step"], pytest.approx(r[name], rel=1e-12)) for r in want[kind]], (kind, name)
    assert segments[0].config["log"]["vis_images"] == 2 and segments[1].config["log"]["vis_images"] == 3
    assert segments[0].config["optim"]["epochs"] == 2 and segments[0].config["data"]["path"] == folder
    assert [[open(p, "rb").read() for p in s.images()] for s in segments] == [[v] for v in pictures.values()]
    assert segments[1].summary["output/checkpoint"] == checkpoint


CHECK_IMPORTS = r"""
import json, sys
from fcmae.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "loaded": sorted(m for m in sys.modules if m.split(".")[0] == "mlflow"
                  or m in ("fcmae.engine.mlflow_tracker", "fcmae.engine.wandb_tracker"))}))
"""


def test_trackers_off_load_nothing(tmp_path):
    """A run with the trackers off (the default) imports neither MLflow nor our W&B tracker, and leaves no tracker
    files. (W&B itself is imported by `import timm` when installed: timm.utils.summary; it is never started.)"""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", CHECK_IMPORTS, "pretrain", "--config", "pretrain/demo",
                        f"output_dir={out}", "optim.epochs=1", "optim.warmup_epochs=0", "data.num_samples=64",
                        "monitor.every_epochs=0", "log.vis_every_epochs=0", "log.progress=false",
                        "log.tensorboard=false"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.splitlines()[-1]) == {"code": 0, "loaded": []}
    assert "last.pt" in os.listdir(out) and not {"trackers.json", "wandb"} & set(os.listdir(out))
    assert not os.path.exists(tmp_path / "mlflow.db") and not os.path.exists(tmp_path / "mlruns")


HIDE = "import sys; sys.modules[{name!r}] = None; from fcmae.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize("name", ["mlflow", "wandb"])
def test_tracker_without_its_package_is_refused_before_anything_runs(tmp_path, name):
    """log.X=true where X is not installed (hidden here): one line naming the key and the install command, exit 2,
    nothing written."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", HIDE.format(name=name), "pretrain", "--config", "pretrain/demo",
                        f"output_dir={out}", f"log.{name}=true"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert r.returncode == 2
    one_line(r.stderr, f"fcmae pretrain: error: log.{name}=true needs the {name} package: pip install 'fcmae[{name}]'")
    assert os.listdir(tmp_path) == []


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_warns_once_and_the_run_finishes(tmp_path):
    """MLflow at a port nobody listens on: one warning line, exit 0, the run and its metrics.jsonl complete."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    r = subprocess.run([sys.executable, "-m", "fcmae", "pretrain", "--config", "pretrain/demo", f"output_dir={out}",
                        "optim.epochs=1", "optim.warmup_epochs=0", "data.num_samples=64", "monitor.every_epochs=0",
                        "log.vis_every_epochs=0", "log.progress=false", "log.tensorboard=false", "log.every_steps=1",
                        "log.mlflow=true", f"log.mlflow_uri=http://127.0.0.1:{closed_port()}"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    one_line(r.stderr, "fcmae: warning: MLflow tracking stopped (", "training goes on without it")
    assert [row["kind"] for row in rows(out)] == ["step", "epoch"]
    assert "epoch 1/1" in r.stdout


class Flaky:
    """A tracker whose second row fails."""
    label, state, reopened = "Flaky tracking", {}, False

    def __init__(self):
        self.calls = []

    def log(self, kind, step, numbers, images):
        self.calls.append(("log", step))
        if len(self.calls) == 2:
            raise OSError(28, "No space left on device")

    def log_outputs(self, paths):
        self.calls.append(("outputs",))

    def close(self, status):
        self.calls.append(("close", status))


def test_a_tracker_error_turns_that_tracker_off_with_one_warning(capsys):
    flaky = Flaky()
    guarded = Guarded.open("Flaky tracking", lambda: flaky, {"step": 10})  # a new run: nothing is skipped
    for step in (1, 2, 3):
        guarded.log("step", step, {"loss": 1.0}, {})
    guarded.log_outputs({"checkpoint": "/x/last.pt"})
    guarded.close("finished")
    assert flaky.calls == [("log", 1), ("log", 2)]
    one_line(capsys.readouterr().err, "fcmae: warning: Flaky tracking stopped (OSError: [Errno 28] No space left on "
             "device); training goes on without it")


def test_finetune_records_its_evaluation_and_exported_files(tmp_path, offline, mlflow_uri):
    """A fine-tune's tracked run gets the evaluation metrics of its epoch rows and the paths of the files it leaves:
    the exported weights (model, ema), best checkpoints and last.pt."""
    from mlflow import MlflowClient

    from fcmae.finetune import finetune
    from fcmae.finetune_config import FinetuneConfig

    out, uri = tmp_path / "ft", mlflow_uri
    summary = finetune(load_config(FinetuneConfig, find_config("finetune/demo"), [
        f"output_dir={out}", "optim.epochs=1", "optim.warmup_epochs=0", "data.digits_val=50",
        "log.mlflow=true", f"log.mlflow_uri={uri}", "log.experiment=fcmae-finetune-test"]))
    client = MlflowClient(uri)
    run = client.get_run(json.load(open(out / "trackers.json"))["mlflow"]["run_id"])
    files = {"model": out / "model.safetensors", "ema": out / "model-ema.safetensors", "best": out / "best.pt",
             "best-ema": out / "best-ema.pt", "checkpoint": out / "last.pt"}
    assert {k[len("output."):]: v for k, v in run.data.tags.items() if k.startswith("output.")} == \
        {k: str(v) for k, v in files.items()}
    assert all(path.is_file() for path in files.values())
    assert summary["exported"] == {"model": str(files["model"]), "ema": str(files["ema"])}
    (row,) = [r for r in rows(out) if r["kind"] == "epoch"]
    for name in ("top1", "ema_top1", "best_top1"):
        (metric,) = client.get_metric_history(run.info.run_id, f"epoch/{name}")
        assert (metric.step, metric.value) == (row["step"], pytest.approx(row[name])), name
