"""`fcmae predict`: each row is the softmax of the classifier on the image as timm's own eval transform prepares it
(timm reading the run folder: the independent oracle), the top-1 over a labeled folder is `fcmae eval`'s; files and
folders in the order given, unreadable files listed and left out; bad input fails with one line before the model."""
from __future__ import annotations

import csv
import json
import math
import os
import shlex
import shutil

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from conftest import randomize_grn
from convnextv2.checkpoint import save_state_dict
from convnextv2.checkpoint.hub import metadata, timm_hub_config
from convnextv2.encoder import create_convnextv2
from fcmae.cli import main
from fcmae.config import load_config
from fcmae.finetune import finetune
from fcmae.finetune_config import FinetuneConfig
from imagegen import make_imagefolder, smooth_image, write_broken
from test_bad_input import cli, one_line

# atto at 64 px with crop_pct 0.95 and its own mean/std (timm's defaults would give other numbers), one epoch
FINETUNE = ["device=cpu", "data.image_size=64", "data.crop_pct=0.95", "data.mean=[0.5,0.4,0.3]",
            "data.std=[0.2,0.25,0.3]", "data.batch_size=8", "data.eval_batch_size=16", "data.num_workers=0",
            "optim.epochs=1", "optim.warmup_epochs=0", "optim.lr=2e-3", "model.init=none", "aug.mixup=0",
            "aug.cutmix=0", "checkpoint.keep_every_epochs=0", "log.progress=false", "log.tensorboard=false"]
QUIET = ["--num-workers", "0", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A fine-tune's output_dir (best.pt, model.safetensors + config.json) and its labeled val folder."""
    root = tmp_path_factory.mktemp("predict")
    data = root / "data"
    make_imagefolder(str(data / "train"), classes=3, per_class=6, seed=0, size=80)
    make_imagefolder(str(data / "val"), classes=3, per_class=4, seed=1, size=80)
    out = root / "run"
    finetune(load_config(FinetuneConfig, None, FINETUNE + [f"output_dir={out}", f"data.path={data}"]))
    return out, data / "val"


def read_rows(path) -> list[dict]:
    """CSV or JSONL predictions -> [{"filename", "index", "label", "prob"}] (CSV's _i columns gathered)."""
    if str(path).endswith(".jsonl"):
        return [json.loads(line) for line in open(path)]
    rows = []
    for r in csv.DictReader(open(path, newline="")):
        k = sum(c.startswith("prob_") for c in r)
        rows.append({"filename": r["filename"], "index": [int(r[f"index_{i}"]) for i in range(k)],
                     "label": [r[f"label_{i}"] for i in range(k)], "prob": [float(r[f"prob_{i}"]) for i in range(k)]})
    return rows


def timm_probs(model, files: list[str], transform, mode: str = "RGB") -> torch.Tensor:
    """The oracle: PIL decode, `transform`, the model's softmax, one image at a time."""
    x = torch.stack([transform(Image.open(f).convert(mode)) for f in files])
    with torch.no_grad():
        return model.eval()(x).softmax(1)


def assert_rows_match(rows: list[dict], files: list[str], probs: torch.Tensor, classes: list[str], k: int) -> None:
    assert [r["filename"] for r in rows] == files
    for r, p in zip(rows, probs):
        want_p, want_i = p.topk(k)
        assert r["index"][0] == want_i[0].item() and r["label"] == [classes[i] for i in r["index"]], r
        assert np.allclose(r["prob"], p[r["index"]].numpy(), atol=1e-6, rtol=0), r  # the named classes' own values
        assert np.allclose(r["prob"], want_p.numpy(), atol=1e-6, rtol=0), r  # and the top k, descending


def test_predictions_are_timm_softmax_and_eval_top1(run, tmp_path, capsys):
    out, val = run
    oracle = timm.create_model(f"local-dir:{out}", pretrained=True)  # timm reads model.safetensors + config.json
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=oracle))
    classes = oracle.pretrained_cfg["label_names"]
    files = [os.path.join(str(val), c, f) for c in sorted(os.listdir(val)) for f in sorted(os.listdir(val / c))]
    probs = timm_probs(oracle, files, transform)
    best = torch.load(out / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(v, best[k]) for k, v in oracle.state_dict().items())  # one epoch: best.pt = the export

    hf = tmp_path / "hf"  # a transformers folder: its config.json's id2label, its preprocessor_config.json
    assert main(["convert", str(out / "best.pt"), str(hf), "--to", "hf"]) == 0
    capsys.readouterr()
    for ckpt, name in ((out / "best.pt", "p.csv"), (out / "model.safetensors", "p.jsonl"), (out, "dir.csv"),
                       (hf, "hf.csv")):
        dst = tmp_path / name
        assert main(["predict", str(ckpt), str(val), "--out", str(dst), "--topk", "2", "--batch-size", "5",
                     *QUIET]) == 0
        said = capsys.readouterr().out
        if ckpt == hf:
            assert "preprocessing from" in said and "config.json + preprocessor_config.json" in said
        assert f"{len(files)} images -> {dst} (top-2 of 3 classes, 64 px, crop_pct 0.95); none unreadable" in said
        assert_rows_match(read_rows(dst), files, probs, classes, 2)
        assert (tmp_path / name).with_suffix(".skipped.txt").read_text() == ""
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temp file left

    # the top-1 over the labeled folder is fcmae eval's
    assert main(["eval", str(out / "best.pt"), f"data.path={val.parent}", "data.num_workers=0"]) == 0
    eval_top1 = float(capsys.readouterr().out.split("top-1 ", 1)[1].split()[0])
    rows = read_rows(tmp_path / "p.csv")
    ours = 100.0 * np.mean([r["label"][0] == r["filename"].split(os.sep)[-2] for r in rows])
    assert ours == pytest.approx(eval_top1, abs=0.005)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Nested folders, mixed sizes and modes, one corrupt file, one non-image file."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a").mkdir()
    smooth_image(rng, 70).save(root / "z.jpg", quality=95)
    smooth_image(rng, 50).resize((90, 50)).save(root / "a" / "wide.png")
    smooth_image(rng, 64).convert("L").save(root / "b" / "deep" / "grey.png")
    write_broken(str(root / "b" / "broken.jpg"), "truncated")
    (root / "b" / "notes.txt").write_text("not an image")
    smooth_image(rng, 40).save(root / "single.jpg", quality=95)  # given as a file too
    return root


@pytest.fixture(scope="module")
def grey_classifier(tmp_path_factory):
    """A random grey atto at patch 16 with 4 classes, exported with its preprocessing but no class names."""
    torch.manual_seed(0)
    model = randomize_grn(create_convnextv2("convnextv2_atto", 16, num_classes=4, in_chans=1)).eval()
    with torch.no_grad():
        model.head.fc.weight.normal_(0, 0.5)  # spread the probabilities: the top-k order is well defined
    path = tmp_path_factory.mktemp("grey") / "grey.safetensors"
    config = timm_hub_config("convnextv2_atto_s16", 4, 1, 48, 0.9, [0.45], [0.2])
    save_state_dict(model.state_dict(), path, metadata(config))
    return model, str(path)


def test_files_and_folders_in_order_unreadable_listed(photos, grey_classifier, tmp_path, capsys):
    model, ckpt = grey_classifier
    out = tmp_path / "new" / "preds.jsonl"  # its folder does not exist yet: created
    single = str(photos / "single.jpg")
    assert main(["predict", ckpt, single, str(photos / "b"), str(photos), "--out", str(out), "--topk", "9",
                 "--batch-size", "2", *QUIET]) == 0
    std = capsys.readouterr()
    assert "--topk 9 > the model's 4 classes: writing the top 4" in std.out
    assert "carries no class names: the labels are the class indices" in std.out
    assert "; 2 unreadable" in std.out and "2 of 8 images unreadable" in std.err  # b/broken.jpg, walked twice
    rows = read_rows(out)
    files = [single, *(str(photos / f) for f in ("b/deep/grey.png", "single.jpg", "z.jpg", "a/wide.png",
                                                   "b/deep/grey.png"))]
    transform = T.Compose([T.Resize(math.floor(48 / 0.9), interpolation=InterpolationMode.BICUBIC), T.CenterCrop(48),
                           T.ToTensor(), T.Normalize([0.45], [0.2])])
    probs = timm_probs(model, files, transform, mode="L")
    assert_rows_match(rows, files, probs, ["0", "1", "2", "3"], 4)
    assert (tmp_path / "new" / "preds.skipped.txt").read_text().splitlines() == [str(photos / "b" / "broken.jpg")] * 2

    # AMP: the same run under bf16 autocast is close to, and not the same as, float32
    amp = tmp_path / "amp.jsonl"
    assert main(["predict", ckpt, str(photos), "--out", str(amp), "--amp", "bf16", *QUIET]) == 0
    bf16, fp32 = read_rows(amp), rows[2:]
    assert [r["filename"] for r in bf16] == [r["filename"] for r in fp32]
    diff = max(abs(a - b) for r, s in zip(bf16, fp32) for a, b in zip(sorted(r["prob"]), sorted(s["prob"])))
    assert 0 < diff < 0.05


def test_errors_before_the_model_runs(run, photos, grey_classifier, tmp_path, capsys, monkeypatch):
    out, val = run
    _, ckpt = grey_classifier
    import fcmae.commands.predict as command

    def never(*a, **k):
        raise AssertionError("the model ran")

    monkeypatch.setattr(command, "predict_files", never)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "bad.pt").write_text("not a checkpoint")
    (tmp_path / "adir.csv").mkdir()
    encoder = tmp_path / "encoder.safetensors"
    save_state_dict(create_convnextv2("convnextv2_atto", num_classes=0).state_dict(), encoder)
    dst = str(tmp_path / "p.csv")
    img = str(photos / "z.jpg")
    cases = [
        ([ckpt, str(tmp_path / "missing.jpg"), "--out", dst], "does not exist; give image files or folders"),
        ([ckpt, str(tmp_path / "empty"), "--out", dst], "no image files under"),
        ([str(tmp_path / "nope.pt"), img, "--out", dst], "is not a file"),
        ([str(tmp_path), img, "--out", dst], "is a folder without model.safetensors"),
        ([str(tmp_path / "bad.pt"), img, "--out", dst], "is not a checkpoint"),
        ([str(encoder), img, "--out", dst], "has no classifier (head.fc)"),
        ([str(out / "best.pt"), img, "--out", dst, "--ema"], "holds no EMA weights"),
        ([ckpt, img, "--out", str(tmp_path / "p.txt")], "name it *.csv or *.jsonl"),
        ([ckpt, img, "--out", str(tmp_path / "adir.csv")], "is a folder; give a file name"),
        ([ckpt, img, "--out", str(tmp_path / "afile" / "p.csv")], "--out"),
        ([ckpt, img, "--out", dst, "--topk", "0"], "--topk must be >= 1, got 0"),
        ([ckpt, img, "--out", dst, "--batch-size", "0"], "--batch-size must be >= 1"),
    ]
    if not torch.cuda.is_available():
        cases.append(([ckpt, img, "--out", dst, "--device", "cuda"], "CUDA is not available"))
    for argv, message in cases:
        assert main(["predict", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("fcmae predict: error: ") and message in err and err.count("\n") == 1, (argv, err)
    assert sorted(os.listdir(tmp_path)) == ["adir.csv", "afile", "bad.pt", "empty", "encoder.safetensors"]


def test_all_unreadable_is_an_error_subprocess(grey_classifier, tmp_path):
    _, ckpt = grey_classifier
    write_broken(str(tmp_path / "a.jpg"), "truncated")
    write_broken(str(tmp_path / "b.png"), "zero")
    dst = tmp_path / "out" / "p.csv"
    done = cli("predict", ckpt, str(tmp_path), "--out", str(dst), *QUIET)
    assert done.returncode == 2
    err = [line for line in done.stderr.splitlines() if not line.startswith("skipping unreadable image")]
    one_line("\n".join(err), "fcmae predict: error: none of the 2 image files could be decoded")
    assert not dst.exists() and not dst.with_suffix(".skipped.txt").exists()


def test_readme_command_runs_as_printed(demo_finetune_run, photos, tmp_path, capsys, monkeypatch):
    """README's command, in a folder holding runs/demo-finetune, photos/ and scan.png: the CSV header README shows,
    a row per readable image, the digits' class names."""
    from readme import code_block

    shutil.copytree(demo_finetune_run, tmp_path / "runs" / "demo-finetune")
    shutil.copytree(photos, tmp_path / "photos")
    smooth_image(np.random.default_rng(1), 30).save(tmp_path / "scan.png")
    monkeypatch.chdir(tmp_path)
    section = "## Predicting (`fcmae predict`)"
    command = [line for line in code_block(section, "bash").splitlines() if line.startswith("fcmae ")]
    assert len(command) == 1
    assert main([*shlex.split(command[0])[1:], "--num-workers", "0", "--no-progress"]) == 0
    assert "preprocessing" not in capsys.readouterr().out  # a checkpoint of this project: its config says it all
    lines = open("preds.csv").read().splitlines()
    assert lines[0] == code_block(section, "text").strip()
    rows = read_rows("preds.csv")
    assert [r["filename"] for r in rows] == ["photos/single.jpg", "photos/z.jpg", "photos/a/wide.png",
                                             "photos/b/deep/grey.png", "scan.png"]
    assert all(r["label"] == [str(i) for i in r["index"]] and len(r["prob"]) == 3 for r in rows)
    assert open("preds.skipped.txt").read() == "photos/b/broken.jpg\n"
