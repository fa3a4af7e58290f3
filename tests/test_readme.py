"""Every Python block of README.md is run by a test, as printed (read from README, so the two cannot drift), and the
outputs README shows for its example commands are what they print."""
from __future__ import annotations

import shlex
from collections import Counter

import torch

from conftest import require_backend
from convnextv2 import create_encoder
from convnextv2.checkpoint import timm_to_reference
from fcmae.cli import main
from readme import code_block, code_blocks

CONVERT = "## Converting checkpoints (`fcmae convert`)"
# README section -> its Python blocks, and where they run
TESTED = {
    "## Python API": 1,  # test_python_api_block
    "### Training from Python": 1,  # test_api.py::test_readme_example_runs
    "## Fine-tuning and evaluation (`fcmae finetune`, `fcmae eval`)": 1,  # test_load_lines.py, in a fresh process
    CONVERT: 1,  # test_checkpoint_api_block
    "## Detection and segmentation (the encoder as a timm backbone)": 4,  # test_downstream.py
    "## MinkowskiEngine backend (`minkowski`)": 1,  # test_minkowski_block
}


def test_every_python_block_is_tested():
    assert dict(Counter(heading for heading, _ in code_blocks("python"))) == TESTED


def test_python_api_block():
    scope: dict = {}
    exec(code_block("## Python API"), scope)
    loss, pred, mask = scope["loss"], scope["pred"], scope["mask"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert mask.shape == (8, 7, 7) and pred.shape == (8, 49, 32 * 32 * 3)  # as its comments say
    assert scope["features"].shape == (8, 320, 7, 7)
    assert ((scope["features"] != 0).any(1) == (mask == 0)).all()  # zero exactly at the masked patches


def test_minkowski_block():
    require_backend("minkowski")
    scope: dict = {}
    exec(code_block("## Python API"), scope)
    exec(code_block("## MinkowskiEngine backend (`minkowski`)"), scope)
    from convnextv2 import SparseEncoder

    masked = SparseEncoder(scope["enc"], backend="masked")(scope["imgs"], scope["mask"])
    assert (scope["features"] - masked).abs().max() <= 1e-4 * masked.abs().max()
    assert any(k.startswith("encoder.") for k in scope["sd"])


def test_checkpoint_api_block(in_demo_dir, capsys):
    """convnextv2.checkpoint's example after the demo's pretraining, with a reference pt_only file beside it; and the
    convert example prints the load line README shows."""
    released = create_encoder("convnextv2_atto").state_dict()
    torch.save({"model": {f"encoder.{k}": v for k, v in timm_to_reference(released).items() if "head" not in k
                          and not k.startswith("norm.")}}, "convnextv2_atto_1k_224_fcmae.pt")
    scope: dict = {}
    exec(code_block(CONVERT), scope)
    said = capsys.readouterr().out.splitlines()
    assert said[0].startswith("loaded 136 tensors (this project's FCMAE checkpoint")
    assert "fresh: head.fc, head.norm" in said[0]
    assert said[1].startswith("reference repo dense state_dict (fine-tuned or pt_only) [reference], convnextv2_atto ")
    assert scope["model"].stem[0].in_channels == 1 and scope["model"].num_classes == 10

    command = code_block(CONVERT, "bash", 1).strip()
    assert main(shlex.split(command)[1:]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert code_block(CONVERT, "text").strip("\n") in printed, printed
