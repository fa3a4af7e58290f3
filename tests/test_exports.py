"""What an exported classifier carries (preprocessing, class names, file modes) and the commands around exports:
`fcmae eval` of an export, `fcmae convert` (EMA weights, messages), `fcmae visualize` on the wrong checkpoint."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fcmae.cli import main
from fcmae.config import load_config
from fcmae.finetune import finetune
from fcmae.finetune_config import FinetuneConfig
from imagegen import make_imagefolder

# atto trained at 64 px with crop_pct 0.95 and its own mean/std: evaluating at timm's defaults would differ
BASE = ["device=cpu", "data.image_size=64", "data.crop_pct=0.95", "data.mean=[0.5,0.4,0.3]", "data.std=[0.2,0.25,0.3]",
        "data.batch_size=8", "data.eval_batch_size=16", "data.num_workers=0", "optim.epochs=2",
        "optim.warmup_epochs=0.5", "optim.lr=2e-3", "model.init=none", "ema.decay=0.5", "aug.mixup=0", "aug.cutmix=0",
        "checkpoint.keep_every_epochs=0", "log.progress=false", "log.tensorboard=false"]


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fcmae", *argv], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    data = root / "data"
    make_imagefolder(str(data / "train"), classes=3, per_class=8, seed=0, size=80)
    make_imagefolder(str(data / "val"), classes=3, per_class=6, seed=1, size=80)
    out = root / "run"
    summary = finetune(load_config(FinetuneConfig, None, BASE + [f"output_dir={out}", f"data.path={data}"]))
    return out, data, summary


def eval_top1(stdout: str) -> float:
    return float(stdout.split("top-1 ", 1)[1].split()[0])


def test_export_carries_its_preprocessing_and_classes(run):
    out, _, _ = run
    cfg = json.loads((out / "config.json").read_text())
    pc = cfg["pretrained_cfg"]
    assert cfg["architecture"] == "convnextv2_atto" and cfg["num_classes"] == 3
    assert cfg["label_names"] == ["class_0", "class_1", "class_2"]
    assert pc["input_size"] == [3, 64, 64] and pc["crop_pct"] == 0.95 and pc["interpolation"] == "bicubic"
    assert pc["mean"] == [0.5, 0.4, 0.3] and pc["std"] == [0.2, 0.25, 0.3]
    for name in ("model.safetensors", "model-ema.safetensors"):
        with safe_open(str(out / name), framework="pt") as f:
            assert json.loads(f.metadata()["timm_config"]) == cfg
    # timm itself reads the run folder as a hub folder: the weights, and the eval transform from pretrained_cfg
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert model.num_classes == 3 and model.pretrained_cfg["label_names"] == cfg["label_names"]
    data_cfg = timm.data.resolve_data_config(model=model)
    assert data_cfg["input_size"] == (3, 64, 64) and data_cfg["crop_pct"] == 0.95
    assert tuple(data_cfg["mean"]) == (0.5, 0.4, 0.3)
    ref = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


def test_eval_of_an_export_uses_its_preprocessing(run, tmp_path, capsys):
    """The export evaluated with nothing but the data gives the fine-tune's own final top-1 (and the EMA file the
    EMA's); a lone .safetensors carries the same in its metadata."""
    out, data, summary = run
    for name, key in (("model.safetensors", "top1"), ("model-ema.safetensors", "ema_top1")):
        assert main(["eval", str(out / name), f"data.path={data}", "data.num_workers=0"]) == 0
        said = capsys.readouterr().out
        assert "preprocessing from" in said and "64 px, crop_pct 0.95" in said
        assert eval_top1(said) == pytest.approx(summary[key], abs=0.005)
    alone = tmp_path / "alone.safetensors"
    alone.write_bytes((out / "model.safetensors").read_bytes())
    assert main(["eval", str(alone), f"data.path={data}", "data.num_workers=0"]) == 0
    said = capsys.readouterr().out
    assert "alone.safetensors's metadata" in said
    assert eval_top1(said) == pytest.approx(summary["top1"], abs=0.005)


def test_exported_files_follow_the_umask(run, tmp_path):
    out, _, _ = run
    want = 0o666 & ~umask()
    for name in ("model.safetensors", "model-ema.safetensors", "config.json"):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == want, name
    assert main(["convert", str(out / "best.pt"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE(os.stat(tmp_path / "hf" / name).st_mode) == want, name


def test_convert_a_finetune_checkpoint_keeps_labels_and_preprocessing(run, tmp_path, capsys):
    out, data, _ = run
    best = torch.load(out / "best.pt", weights_only=True)
    dst = tmp_path / "best.safetensors"
    assert main(["convert", str(out / "best.pt"), str(dst)]) == 0
    said = capsys.readouterr().out
    assert "fresh: nothing;" in said and "init scale" not in said  # nothing fresh: no head init to speak of
    assert main(["eval", str(dst), f"data.path={data}", "data.num_workers=0"]) == 0
    assert eval_top1(capsys.readouterr().out) == pytest.approx(best["metrics"]["top1"], abs=0.005)
    assert main(["convert", str(out / "best.pt"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["id2label"] == {"0": "class_0", "1": "class_1", "2": "class_2"} and hf["label2id"]["class_2"] == 2
    pre = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert pre["size"] == {"shortest_edge": 64} and pre["crop_pct"] == 0.95 and pre["image_mean"] == [0.5, 0.4, 0.3]


def test_convert_exports_the_ema_of_last_pt(run, tmp_path, capsys):
    out, _, _ = run
    dst = tmp_path / "ema.safetensors"
    assert main(["convert", str(out / "last.pt"), str(dst), "--ema"]) == 0
    assert "(EMA weights)" in capsys.readouterr().out
    got, want = load_file(str(dst)), load_file(str(out / "model-ema.safetensors"))
    plain = load_file(str(out / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not all(torch.equal(got[k], plain[k]) for k in plain)  # really the EMA, not the model
    assert main(["convert", str(out / "best.pt"), str(tmp_path / "x.safetensors"), "--ema"]) == 2
    assert "holds no EMA weights" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()


def test_visualize_refuses_a_classifier_and_a_bad_out_before_running(run, tmp_path):
    out, data, _ = run
    image = str(next((data / "val" / "class_0").iterdir()))
    for ckpt, dst, message in ((out / "best.pt", tmp_path / "g.png", "is a fine-tuned classifier"),
                               (out / "best.pt", tmp_path / "grid", "image extension, e.g. grid.png")):
        done = cli("visualize", str(ckpt), image, "--out", str(dst))
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
        assert not dst.exists()
