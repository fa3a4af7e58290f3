"""fcmae.api: pretraining and fine-tuning from Python; the README's example runs as written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import fcmae
from fcmae.api import as_overrides, pretrain
from readme import code_block


def readme_example() -> str:
    return code_block("### Training from Python")


def test_overrides_keep_their_types():
    assert as_overrides({"optim.epochs": 2}, output_dir=Path("runs/x"), optim={"betas": [0.9, 0.99], "lr": None},
                        model={"name": "convnextv2_atto"}) == [
        "optim.epochs=2", 'output_dir="runs/x"', "optim.betas=[0.9, 0.99]", "optim.lr=null",
        'model.name="convnextv2_atto"']


def test_bad_key_raises_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'optim.epochz'"):
        pretrain("demo", output_dir=str(tmp_path / "run"), optim={"epochz": 1})
    with pytest.raises(ValueError, match="neither a file nor a recipe"):
        fcmae.api.finetune("nope", output_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), scope)
    pre, ft = scope["pre"], scope["ft"]
    assert pre.run_dir == Path("runs/api/pretrain") and pre.checkpoint.is_file()
    assert pre.metrics["epoch"] == 1 and pre.metrics["loss"] > 0
    epochs = [json.loads(line) for line in open(ft.run_dir / "metrics.jsonl")]
    last = [r for r in epochs if r["kind"] == "epoch"][-1]
    assert ft.metrics["top1"] == pytest.approx(last["top1"]) and ft.metrics["epoch"] == 2
    assert ft.files["model"].is_file() and ft.files["best"].is_file() and ft.config.model.init == str(pre.checkpoint)
    assert f"-> {ft.files['model']}" in capsys.readouterr().out
