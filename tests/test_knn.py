"""The kNN probe (docs/method.md) against a hand-written numpy oracle; the pretraining monitor (baseline, schedule, exact
resume, no effect on training); `fcmae knn` on a run's checkpoint."""
import json
import os

import numpy as np
import pytest
import timm
import torch

from conftest import randomize_grn
from fcmae.cli import build_parser, main
from fcmae.config import load_config
from fcmae.finetune_config import FinetuneDataConfig
from fcmae.knn import knn_probe, knn_scores, knn_top1, probe_splits
from fcmae.pretrain import pretrain
from fcmae.pretrain_config import PretrainConfig


def oracle_knn(train, train_labels, val, num_classes, k=20, T=0.07):
    """Loop/numpy kNN in float64: cosine similarity, the k nearest vote exp(sim / T), first argmax."""
    train = np.asarray(train, np.float64)
    val = np.asarray(val, np.float64)
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    preds, all_votes = [], []
    for v in val:
        v = v / np.linalg.norm(v)
        sims = [float(np.dot(t, v)) for t in train]
        nearest = sorted(range(len(train)), key=lambda j: -sims[j])[:k]
        votes = [0.0] * num_classes
        for j in nearest:
            votes[int(train_labels[j])] += float(np.exp(sims[j] / T))
        preds.append(max(range(num_classes), key=lambda c: (votes[c], -c)))  # ties: the lowest class
        all_votes.append(votes)
    return np.array(preds), np.array(all_votes)


@pytest.mark.parametrize("k,T,chunk", [(20, 0.07, 1024), (5, 0.07, 3), (7, 0.5, 4), (200, 0.07, 16)])
def test_knn_equals_numpy_oracle(k, T, chunk):
    g = torch.Generator().manual_seed(0)
    num_classes = 4
    centers = torch.randn(num_classes, 16, generator=g)
    train_labels = torch.randint(0, num_classes, (60,), generator=g)
    val_labels = torch.randint(0, num_classes, (25,), generator=g)
    train = centers[train_labels] + 1.5 * torch.randn(60, 16, generator=g)  # unnormalised: the probe normalises
    val = centers[val_labels] + 1.5 * torch.randn(25, 16, generator=g)
    want_pred, want_votes = oracle_knn(train.numpy(), train_labels.numpy(), val.numpy(), num_classes, k, T)
    scores = knn_scores(train, train_labels, val, num_classes, k, T, chunk)
    np.testing.assert_allclose(scores.numpy(), want_votes, rtol=1e-4)
    top1 = knn_top1(train, train_labels, val, val_labels, num_classes, k, T, chunk)
    want = 100.0 * (want_pred == val_labels.numpy()).mean()
    assert top1 == pytest.approx(want) and 25.0 < top1 < 100.0  # far from chance and from trivial


def test_knn_votes_are_temperature_weighted_and_ties_go_to_the_lowest_class():
    # one class-0 neighbour at cosine 0.9 against two class-1 neighbours at cosine 0.5
    a, b = np.arccos(0.9), np.arccos(0.5)
    train = torch.tensor([[np.cos(a), np.sin(a)], [np.cos(b), np.sin(b)], [np.cos(b), -np.sin(b)]],
                         dtype=torch.float32)
    labels, val, target = torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    # T = 0.07: e^(0.9/0.07) > 2 e^(0.5/0.07), the single close neighbour wins; T = 1: 2 e^0.5 > e^0.9, majority wins
    assert knn_top1(train, labels, val, target, 2, k=3, temperature=0.07) == 100.0
    assert knn_top1(train, labels, val, target, 2, k=3, temperature=1.0) == 0.0
    scores = knn_scores(train, labels, val, 2, k=3, temperature=0.07)
    assert scores[0].tolist() == pytest.approx([np.exp(0.9 / 0.07), 2 * np.exp(0.5 / 0.07)], rel=1e-5)
    # two neighbours at the same similarity, one per class: equal votes, the lower class index wins
    tie = torch.tensor([[np.cos(b), np.sin(b)], [np.cos(b), -np.sin(b)]], dtype=torch.float32)
    for tie_labels in ([0, 1], [1, 0]):
        assert knn_top1(tie, torch.tensor(tie_labels), val, torch.tensor([0]), 2, k=2) == 100.0
        assert knn_top1(tie, torch.tensor(tie_labels), val, torch.tensor([1]), 2, k=2) == 0.0
    # k = 1 uses only the single nearest
    assert knn_top1(train, labels, val, target, 2, k=1, temperature=1.0) == 100.0


def test_knn_bad_inputs():
    with pytest.raises(ValueError, match="same D"):
        knn_scores(torch.randn(4, 3), torch.zeros(4), torch.randn(2, 5), 2)
    with pytest.raises(ValueError, match="one label per train feature"):
        knn_scores(torch.randn(4, 3), torch.zeros(3), torch.randn(2, 3), 2)
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn_scores(torch.randn(4, 3), torch.zeros(4), torch.randn(2, 3), 2, k=0)


def digits_cfg(**kw):
    return FinetuneDataConfig(format="digits", image_size=32, digits_per_class=5, digits_val=40, eval_batch_size=16,
                              num_workers=0, **kw)


def test_probe_on_digits_equals_oracle_on_per_image_features():
    torch.manual_seed(3)
    encoder = randomize_grn(timm.create_model("convnextv2_atto", num_classes=0)).eval()
    splits = probe_splits(digits_cfg(), 3)
    assert (len(splits.train), len(splits.val)) == (50, 40)
    rng = torch.get_rng_state()
    result = knn_probe(encoder, splits.train, splits.val, 10, torch.device("cpu"), batch_size=16)
    assert torch.equal(torch.get_rng_state(), rng)  # drew nothing from the global RNG
    assert (result.train_images, result.val_images, result.skipped) == (50, 40, 0)

    def features(ds):  # one image at a time, timm's own forward, the pooling of docs/method.md
        with torch.no_grad():
            rows = [encoder.forward_features(ds[i][0][None]).mean((2, 3))[0] for i in range(len(ds))]
        return torch.stack(rows).numpy(), np.array([ds[i][1] for i in range(len(ds))])

    tr, tr_labels = features(splits.train)
    va, va_labels = features(splits.val)
    pred, _ = oracle_knn(tr, tr_labels, va, 10)
    assert result.top1 == pytest.approx(100.0 * (pred == va_labels).mean())
    assert result.top1 > 20.0  # a random ConvNeXt already separates digits well above chance (10%)
    assert encoder.training is False
    encoder.train()  # as in pretraining: the probe runs in eval mode and hands the encoder back in train mode
    assert knn_probe(encoder, splits.train, splits.val, 10, torch.device("cpu"), batch_size=64).top1 == result.top1
    assert encoder.training is True


# --- the monitor in pretraining ---------------------------------------------------------------------------------
BASE = ["device=cpu", "model.decoder_dim=32", "model.mask_ratio=0.5", "data.image_size=64", "model.patch_size=32",
        "data.batch_size=8", "data.num_workers=0", "optim.epochs=2", "optim.warmup_epochs=0", "optim.lr=2e-3",
        "checkpoint.every_steps=1", "checkpoint.keep_every_epochs=0", "log.every_steps=1", "log.vis_every_epochs=0",
        "log.progress=false", "log.tensorboard=false"]
MONITOR = ["monitor.every_epochs=1", "monitor.data.format=digits", "monitor.data.image_size=32",
           "monitor.data.digits_per_class=5", "monitor.data.digits_val=40", "monitor.data.eval_batch_size=32",
           "monitor.data.num_workers=0"]


def config(out, data, *extra):
    return load_config(PretrainConfig, None, BASE + [f"output_dir={out}", f"data.path={data}", *extra])


def rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def plain_run(folder, tmp_path_factory):
    """Two epochs without the monitor: the weights a monitored (and a killed + resumed) run must end with."""
    out = str(tmp_path_factory.mktemp("plain"))
    pretrain(config(out, folder))
    return out


def test_monitor_logs_baseline_and_epochs_and_resume_stays_exact(tmp_path, folder, plain_run, capsys):
    out = str(tmp_path / "run")

    def die_at_step_4(step, loss):  # in the middle of epoch 2, after the epoch-1 kNN
        if step == 4:
            raise KeyboardInterrupt("killed")
        return loss

    with pytest.raises(KeyboardInterrupt):
        pretrain(config(out, folder, *MONITOR, "log.tensorboard=true"), on_loss=die_at_step_4)
    pretrain(config(out, folder, *MONITOR, "log.tensorboard=true"))  # resumes: no second baseline
    printed = capsys.readouterr().out
    assert "epoch 0/2  knn_top1 " in printed and "kNN monitor: digits" in printed
    knn = [r for r in rows(out) if "knn_top1" in r]
    assert [(r["kind"], r["epoch"], r["step"]) for r in knn] == [("epoch", 0, 0), ("epoch", 1, 3), ("epoch", 2, 6)]
    assert all(0.0 <= r["knn_top1"] <= 100.0 and r["knn_seconds"] >= 0 for r in knn)
    assert [r["epoch"] for r in rows(out) if r["kind"] == "epoch" and "loss" in r] == [1, 2]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = EventAccumulator(os.path.join(out, "tb")).Reload()
    assert [e.step for e in tb.Scalars("epoch/knn_top1")] == [0, 3, 6]
    # the monitor neither consumed training randomness nor broke exact resume: same weights as the plain run
    got = torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=True)
    want = torch.load(os.path.join(plain_run, "last.pt"), map_location="cpu", weights_only=True)
    for k in want["model"]:
        assert torch.equal(got["model"][k], want["model"][k]), k

    # `fcmae knn` on the final checkpoint defaults to the monitor's data and reproduces its last figure
    args = build_parser().parse_args(["knn", os.path.join(out, "last.pt"), "device=cpu"])
    result = args.func(args)
    assert result["top1"] == pytest.approx(knn[-1]["knn_top1"], abs=1e-9)
    assert (result["train_images"], result["val_images"]) == (50, 40)
    assert "kNN top-1" in capsys.readouterr().out


def test_monitor_every_n_epochs_and_the_last(tmp_path, folder):
    out = str(tmp_path / "run")
    pretrain(config(out, folder, *MONITOR, "monitor.every_epochs=2", "optim.epochs=3", "data.num_samples=16"))
    assert [r["epoch"] for r in rows(out) if "knn_top1" in r] == [0, 2, 3]


def test_monitor_config_errors(tmp_path, folder, capsys):
    common = ["pretrain", *BASE, f"output_dir={tmp_path / 'run'}", f"data.path={folder}"]
    assert main([*common, "monitor.every_epochs=1"]) == 2
    assert "monitor.data.path is not set" in capsys.readouterr().err
    assert main([*common, "monitor.every_epochs=-1"]) == 2
    assert "monitor.every_epochs must be >= 0" in capsys.readouterr().err
    assert main([*common, "monitor.every_epochs=1", f"monitor.data.path={folder}"]) == 2
    assert "monitor.data" in capsys.readouterr().err  # an ImageFolder without train/ and val/
    assert not os.path.exists(tmp_path / "run" / "last.pt")


def test_knn_command_on_a_timm_file_and_errors(tmp_path, capsys):
    from convnextv2.checkpoint import save_state_dict

    torch.manual_seed(0)
    model = randomize_grn(timm.create_model("convnextv2_atto", num_classes=0))
    path = tmp_path / "atto.safetensors"
    save_state_dict(model.state_dict(), path)
    data = ["data.format=digits", "data.image_size=32", "data.digits_per_class=5", "data.digits_val=40",
            "data.num_workers=0", "device=cpu"]
    args = build_parser().parse_args(["knn", str(path), *data])
    got = args.func(args)["top1"]
    splits = probe_splits(digits_cfg(), 3)
    want = knn_probe(model.eval(), splits.train, splits.val, 10, torch.device("cpu"), batch_size=16).top1
    assert got == pytest.approx(want)
    assert main(["knn", str(tmp_path / "missing.pt"), *data]) == 2
    assert "is not a file" in capsys.readouterr().err
    assert main(["knn", str(path), "device=cpu"]) == 2  # no data: a bare timm file has no config to default to
    assert "data.path is not set" in capsys.readouterr().err
    assert main(["knn", str(path), *data, "k=0"]) == 2
    assert "k must be >= 1" in capsys.readouterr().err


def test_monitor_under_torchrun_two_processes(tmp_path, folder, plain_run):
    """Rank 0 probes while rank 1 waits: no hang, one set of rows, and the weights of the unmonitored 1-process run."""
    import socket
    import subprocess
    import sys

    out = tmp_path / "ddp"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "fcmae", "pretrain", *BASE, *MONITOR, f"output_dir={out}", f"data.path={folder}"]
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("kNN monitor: digits") == 1
    assert [r["epoch"] for r in rows(out) if "knn_top1" in r] == [0, 1, 2]
    got = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["model"]
    want = torch.load(os.path.join(plain_run, "last.pt"), map_location="cpu", weights_only=True)["model"]
    for k, w in want.items():
        torch.testing.assert_close(got[k], w, rtol=1e-4, atol=1e-5, msg=k)
