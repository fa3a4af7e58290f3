"""`fcmae convert --to onnx / onnx-backbone`: onnxruntime's outputs equal torch's (timm's own model, loaded by timm)
within 1e-4 for batch 1 and 3 and another height/width, for patch 32 / 16 / 8 and 1 / 3 / 4 channels; the printed
onnxruntime line runs as printed in a fresh interpreter; the preprocessing rides in the metadata; README's commands
print what README shows; refusals are one line before SRC is read, and nothing is written."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch

from conftest import randomize_grn
from convnextv2.checkpoint import load_encoder_weights, save_state_dict
from convnextv2.checkpoint.hub import metadata, timm_backbone_config
from convnextv2.encoder import create_convnextv2
from fcmae.cli import main
from fcmae.knn import pooled_features
from fcmae.onnx_export import ONNX_OPSET, save_checked
from fresh import run_fresh
from readme import code_blocks
from test_bad_input import cli, one_line

try:  # the dev extra installs them (`make test` does); a venv without them skips, visibly, except under CI
    import onnx
    import onnxruntime as ort
    import onnxscript  # noqa: F401 - torch's exporter needs it
except ImportError as e:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise
    pytest.skip(f"{e}: install the dev extra (pip install -e '.[dev]'; make test does)", allow_module_level=True)

CONVERT = "## Converting checkpoints (`fcmae convert`)"


def ort_outputs(path, x: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x.numpy()})


def assert_onnx_equals_torch(path, forward, in_chans: int, size: int, patch: int) -> None:
    """onnxruntime == torch within 1e-4 (relative to the output's scale, at least 1): batch 1 and 3 at the export's
    size, and batch 2 at another height and width (the dynamic axes)."""
    for shape in ((1, in_chans, size, size), (3, in_chans, size, size), (2, in_chans, size + patch, size + 2 * patch)):
        x = torch.randn(*shape)
        with torch.no_grad():
            want = forward(x)
        want = list(want) if isinstance(want, (list, tuple)) else [want]
        got = ort_outputs(path, x)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == tuple(w.shape), shape
            assert np.abs(g - w.numpy()).max() <= 1e-4 * max(1.0, w.abs().max().item()), shape


def printed_load_line(out: str) -> str:
    return out.split("  load: ", 1)[1].splitlines()[0]


def stages(model):
    """timm's own stage outputs (forward_intermediates), the oracle of a backbone export."""
    return lambda x: model.forward_intermediates(x, intermediates_only=True)


@pytest.fixture(scope="module")
def in_runs(demo_pretrain, demo_finetune_run, tmp_path_factory):
    """A working directory holding runs/demo/last.pt and runs/demo-finetune, as after the demo recipes."""
    root = tmp_path_factory.mktemp("onnx-runs")
    (root / "runs" / "demo").mkdir(parents=True)
    shutil.copy(demo_pretrain, root / "runs" / "demo" / "last.pt")
    shutil.copytree(demo_finetune_run, root / "runs" / "demo-finetune")
    return root


def readme_onnx_commands() -> tuple[list[str], list[str]]:
    """README's `fcmae convert ... --to onnx*` command lines and the lines of its ```text blocks, in its convert
    section."""
    commands = [line for heading, code in code_blocks("bash") if heading == CONVERT for line in code.splitlines()
                if "--to onnx" in line]
    shown = [line for heading, code in code_blocks("text") if heading == CONVERT for line in code.splitlines()]
    return commands, shown


def test_readme_exports_match_timm_and_run_as_printed(in_runs, capsys, monkeypatch):
    """README's two commands (the demo fine-tune's classifier, the demo pretraining's encoder), run as printed: they
    print README's load lines, equal timm's model on the same weights, and carry the run's timm config."""
    monkeypatch.chdir(in_runs)
    commands, shown = readme_onnx_commands()
    assert [c.split()[-1] for c in commands] == ["onnx", "onnx-backbone"], commands
    lines = []
    for command in commands:
        assert main(shlex.split(command)[1:]) == 0
        printed = capsys.readouterr().out
        assert f"ONNX opset {ONNX_OPSET}" in printed
        lines.append(printed_load_line(printed))
        assert f"  load: {lines[-1]}" in shown, (lines[-1], shown)

    # the classifier: timm loads the fine-tune's EMA export itself (best-ema.pt after one epoch)
    classifier = timm.create_model("convnextv2_atto_s16", in_chans=1, num_classes=10, pretrained=True,
                                   pretrained_cfg_overlay=dict(file="runs/demo-finetune/model-ema.safetensors",
                                                               num_classes=10, input_size=(1, 64, 64))).eval()
    assert_onnx_equals_torch("digits.onnx", classifier, 1, 64, 16)
    meta = ort.InferenceSession("digits.onnx", providers=["CPUExecutionProvider"]).get_modelmeta()
    carried = json.loads(meta.custom_metadata_map["timm_config"])
    assert carried == json.loads(open("runs/demo-finetune/config.json").read())
    assert carried["label_names"] == [str(i) for i in range(10)]
    assert onnx.load("digits.onnx").opset_import[0].version == ONNX_OPSET

    # the encoder: timm's stage outputs of the pretraining's encoder
    encoder = timm.create_model("convnextv2_atto_s16", in_chans=1, num_classes=0).eval()
    load_encoder_weights(encoder, "runs/demo/last.pt")
    assert_onnx_equals_torch("encoder.onnx", stages(encoder), 1, 64, 16)

    # each printed line, pasted into a fresh interpreter, runs the zero image: the outputs torch gives for it
    zero = torch.zeros(1, 1, 64, 64)
    script = (f"{lines[0]}\nnp.save('digits.npy', logits)\n"
              f"{lines[1]}\nnp.save('stage3.npy', stage3)\nimport sys; print('torch' in sys.modules)")
    assert run_fresh(script, in_runs).strip() == "False"  # onnxruntime and numpy only
    with torch.no_grad():
        assert np.abs(np.load("digits.npy") - classifier(zero).numpy()).max() <= 1e-4
        want = encoder.forward_intermediates(zero, intermediates_only=True)[3]
        assert np.abs(np.load("stage3.npy") - want.numpy()).max() <= 1e-4 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("in_chans, patch, backbone", [(4, 32, False), (3, 8, True)],
                         ids=["rgba-p32", "rgb-p8-backbone"])
def test_other_layouts(in_chans, patch, backbone, tmp_path, capsys):
    """A random classifier of 4 channels at patch 32 (a bare torch state_dict: exported at the default 224 px), a
    random encoder of 3 channels at patch 8 (safetensors carrying a backbone config of 32 px): onnxruntime == the torch
    model they were saved from."""
    torch.manual_seed(0)
    model = randomize_grn(create_convnextv2("convnextv2_atto", patch, in_chans=in_chans,
                                            num_classes=0 if backbone else 5)).eval()
    if backbone:
        size, src = 32, tmp_path / "encoder.safetensors"
        info = [dict(i) for i in model.feature_info]
        config = timm_backbone_config("convnextv2_atto_s8", in_chans, info, size, [0.5] * 3, [0.2] * 3)
        save_state_dict(model.state_dict(), src, metadata(config))
    else:
        size, src = 224, tmp_path / "classifier.pt"
        save_state_dict(model.state_dict(), src)
    dst = tmp_path / "out" / "model.onnx"  # its folder does not exist yet
    assert main(["convert", str(src), str(dst), "--to", "onnx-backbone" if backbone else "onnx"]) == 0
    printed = capsys.readouterr().out
    forward = stages(model) if backbone else model
    assert_onnx_equals_torch(dst, forward, in_chans, size, patch)
    assert sorted(os.listdir(dst.parent)) == ["model.onnx"]  # no temp folder, no external data for a small model
    line = printed_load_line(printed)
    assert f"np.zeros((1, {in_chans}, {size}, {size}), np.float32)" in line
    out = "stage3" if backbone else "logits"
    run_fresh(f"{line}\nnp.save('out.npy', {out})", tmp_path)
    with torch.no_grad():
        want = forward(torch.zeros(1, in_chans, size, size))
    want = want[3] if backbone else want
    assert np.abs(np.load(tmp_path / "out.npy") - want.numpy()).max() <= 1e-4 * max(1.0, want.abs().max().item())
    carried = json.loads(ort.InferenceSession(str(dst)).get_modelmeta().custom_metadata_map["timm_config"])
    if backbone:  # the pooled last stage is fcmae embed's vector
        x = torch.randn(2, in_chans, size, size)
        pooled = ort_outputs(dst, x)[3].mean(axis=(2, 3))
        assert np.abs(pooled - pooled_features(model, x).detach().numpy()).max() <= 1e-4
        said = printed.split("wrote ", 1)[1]
        assert "stage0 (batch, 40, height/1, width/1)" in said and "stage3 (batch, 320, height/8, width/8)" in said
        assert carried == config
    else:
        assert carried["pretrained_cfg"]["input_size"] == [4, 224, 224] and "label_names" not in carried


def test_refusals_before_the_source_is_read(demo_pretrain, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")  # read only if the check came too late
    (tmp_path / "adir.onnx").mkdir()
    cases = [
        ([str(bad), str(tmp_path / "m.onnx")], "is an ONNX file name: add --to onnx"),
        ([str(bad), str(tmp_path / "m.safetensors"), "--to", "onnx"], "writes an ONNX file: name DST *.onnx"),
        ([str(bad), str(tmp_path / "m.onnx"), "--to", "onnx", "--num-classes", "3"], "leave out --num-classes"),
        ([str(bad), str(tmp_path / "adir.onnx"), "--to", "onnx"], "is a folder"),
        ([str(demo_pretrain), str(tmp_path / "m.onnx"), "--to", "onnx"],
         "has no classifier (head.fc): --to onnx-backbone exports its encoder"),
    ]
    for argv, message in cases:
        assert main(["convert", *argv]) == 2, argv
        captured = capsys.readouterr()
        assert captured.err.startswith("fcmae convert: error: ") and message in captured.err, captured.err
        assert captured.err.count("\n") == 1 and ("read " in captured.out) == (argv[0] != str(bad)), captured
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if it were not installed
    assert main(["convert", str(bad), str(tmp_path / "m.onnx"), "--to", "onnx-backbone"]) == 2
    one_line(capsys.readouterr().err, "--to onnx-backbone needs onnxscript: pip install onnx onnxscript onnxruntime")
    assert sorted(os.listdir(tmp_path)) == ["adir.onnx", "bad.pt"]


def test_refusal_subprocess(demo_pretrain, tmp_path):
    done = cli("convert", str(demo_pretrain), str(tmp_path / "m.onnx"))
    assert done.returncode == 2
    one_line(done.stderr, "fcmae convert: error:", "m.onnx is an ONNX file name: add --to onnx (the classifier) or "
             "--to onnx-backbone")
    assert os.listdir(tmp_path) == []


class FakeProgram:
    """What save_checked needs of torch's ONNXProgram: metadata_props and save (with `external`, the weights in
    PATH.data beside it, as the exporter saves a model over 2 GB)."""

    def __init__(self, external: bool = False):
        self.model, self.external = SimpleNamespace(metadata_props={}), external

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(json.dumps(self.model.metadata_props))
        if self.external:
            with open(path + ".data", "w") as f:
                f.write("weights")


def test_a_failed_check_writes_nothing(tmp_path, monkeypatch):
    import fcmae.onnx_export as onnx_export

    dst = tmp_path / "m.onnx"
    monkeypatch.setattr(onnx_export, "onnxruntime_error", lambda *a: 0.5)
    with pytest.raises(ValueError, match="differs from torch by 0.5 .* nothing written"):
        save_checked(FakeProgram(), dst, {"timm_config": "{}"}, None, None)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(onnx_export, "onnxruntime_error", lambda *a: 1e-7)
    assert save_checked(FakeProgram(), dst, {"timm_config": "{}"}, None, None) == 1e-7
    assert os.listdir(tmp_path) == ["m.onnx"] and json.loads(dst.read_text()) == {"timm_config": "{}"}
    big = tmp_path / "big" / "huge.onnx"
    save_checked(FakeProgram(external=True), big, {}, None, None)
    assert sorted(os.listdir(big.parent)) == ["huge.onnx", "huge.onnx.data"]
