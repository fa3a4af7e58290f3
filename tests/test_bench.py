"""`fcmae bench` runs end to end on a tiny setting and rejects bad options (no timings are asserted)."""
import contextlib
import json
import os
import shlex

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fcmae import FCMAE
from fcmae import bench
from fcmae.bench import count_flops, useful_flops
from fcmae.cli import build_parser, main


def test_bench_prints_every_backend_and_writes_json(capsys, tmp_path):
    path = tmp_path / "bench.json"
    argv = ["bench", "--model", "convnextv2_atto", "--batch-size", "2", "--image-size", "64", "--decoder-dim", "32",
            "--steps", "2", "--warmup", "0", "--device", "cpu", "--backends", "masked,packed,dense", "--channels-last",
            "--json", str(path)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("backend"))
    rows = {line.split()[0]: line.split() for line in lines[header + 1:header + 4]}
    assert set(rows) == {"masked", "packed", "dense"}
    assert rows["masked"][5] == "1.00"  # the ratio column is relative to masked
    assert all(float(r[1]) > 0 for r in rows.values())
    assert all(0 < float(r[7].rstrip("%")) < 100 for r in rows.values())  # MFU, also on CPU

    doc = json.loads(path.read_text())
    assert os.listdir(tmp_path) == ["bench.json"]  # no temporary file left behind
    assert (doc["model"], doc["batch_size"], doc["image_size"], doc["dtype"]) == ("convnextv2_atto", 2, 64, "fp32")
    assert (doc["compile"], doc["channels_last"], doc["variant"]) == (False, True, "eager-channels_last")
    assert doc["device_type"] == "cpu" and doc["device"] and doc["torch"] == torch.__version__
    assert {"cuda", "cudnn", "timm", "python", "date"} <= doc.keys()
    # the recorded command reproduces the run: it parses back to the same options
    assert shlex.split(doc["command"])[:2] == ["fcmae", "bench"]
    again = build_parser().parse_args(shlex.split(doc["command"])[1:] + ["--json", str(path)])
    assert vars(again) == {**vars(build_parser().parse_args(argv)), "func": again.func}
    assert doc["matmul_peak_tflops"] > 0 and doc["matmul_peak"]["shape"] == [1024] * 3
    assert doc["useful_gflop_per_img"] > 0
    assert set(doc["backends"]) == {"masked", "packed", "dense"}
    for name, b in doc["backends"].items():
        printed = rows[name]
        assert b["img_s"] == pytest.approx(2 / (b["step_ms"] / 1e3))
        assert f"{b['img_s']:.2f}" == printed[1]
        assert len(b["step_ms_all"]) == 2 and b["step_ms_min"] <= b["step_ms"] <= b["step_ms_max"]
        assert 0 < b["mfu"] < 1 and f"{100 * b['mfu']:.1f}%" == printed[7]
        assert b["peak_mem_gib"] is None and b["peak_mem_x_masked"] is None  # CPU: not measured
    assert doc["backends"]["masked"]["img_s_x_masked"] == 1.0
    packed = doc["backends"]["packed"]
    assert packed["img_s_x_masked"] == pytest.approx(packed["img_s"] / doc["backends"]["masked"]["img_s"])


def test_bench_profile_writes_top_ops(tmp_path):
    assert main(["bench", "--model", "convnextv2_atto", "--batch-size", "2", "--image-size", "64", "--decoder-dim", "16",
                 "--steps", "1", "--warmup", "0", "--device", "cpu", "--backends", "packed",
                 "--profile", str(tmp_path)]) == 0
    text = (tmp_path / "profile-packed.txt").read_text()
    assert text.startswith("# 3 steps, sorted by self_cpu_time_total") and "aten::convolution" in text
    assert sorted(os.listdir(tmp_path)) == ["profile-packed.json", "profile-packed.txt"]
    doc = json.loads((tmp_path / "profile-packed.json").read_text())
    assert (doc["schema"], doc["backend"], doc["device_type"], doc["steps"]) == ("fcmae-profile/1", "packed", "cpu", 3)
    ops = {op["name"]: op for op in doc["ops"]}
    assert ops["aten::convolution"]["calls"] >= 3 and ops["aten::addmm"]["self_cpu_us"] > 0


def test_bench_json_is_rewritten_as_backends_are_measured(tmp_path, monkeypatch):
    """A run cut short keeps what it measured: the JSON is written after every interleaved round."""
    path, written = tmp_path / "b.json", []
    real = bench.write_json_atomic
    monkeypatch.setattr(bench, "write_json_atomic", lambda p, doc: written.append(doc) or real(p, doc))
    assert main(["bench", "--model", "convnextv2_atto", "--batch-size", "1", "--image-size", "64", "--decoder-dim",
                 "16", "--steps", "2", "--warmup", "0", "--device", "cpu", "--backends", "packed,dense",
                 "--json", str(path)]) == 0
    assert [{b: r["steps_done"] for b, r in doc["backends"].items()} for doc in written] == [
        {"packed": 1, "dense": 1}, {"packed": 2, "dense": 2}]
    assert [doc["complete"] for doc in written] == [False, True] and written[-1]["patch_size"] == 32


def test_bench_json_folder_checked_before_any_model(tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the --json path was checked")

    monkeypatch.setattr(bench, "FCMAE", no_model)
    assert main(["bench", "--device", "cpu", "--json", str(tmp_path / "missing" / "b.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fcmae bench: error: --json") and "does not exist" in err and len(err.splitlines()) == 1
    assert main(["bench", "--device", "cpu", "--json", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["bench", "--device", "cpu", "--profile", str(tmp_path / "missing")]) == 2
    assert "--profile" in capsys.readouterr().err


def test_bench_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: convnextv2_tiny)" in out and "(default: 8)" in out and "(default: masked,packed,dense)" in out


@pytest.mark.parametrize("groups", [1, 16, 64])
def test_conv_backward_flops_respect_groups(groups):
    """A conv's backward (input and weight gradients) costs twice its forward, grouped or not; for groups=1 our count
    equals torch's own formula, which for groups > 1 counts the weight gradient `groups` times too high."""
    conv = torch.nn.Conv2d(64, 64, 7, padding=3, groups=groups)
    x = torch.randn(2, 64, 12, 12, requires_grad=True)
    with count_flops() as ours:
        conv(x).sum().backward()
    with FlopCounterMode(display=False) as torchs:
        conv(x).sum().backward()
    counts = {str(k): v for k, v in ours.get_flop_counts()["Global"].items()}
    forward = 2 * 2 * 12 * 12 * 64 * (64 // groups) * 7 * 7  # 2 FLOPs per multiply-add
    assert counts["aten.convolution"] == forward
    assert counts["aten.convolution_backward"] == 2 * forward
    if groups == 1:
        assert ours.get_total_flops() == torchs.get_total_flops()


def test_useful_flops_is_visible_encoder_plus_decoder_forward_and_backward():
    """The MFU numerator: (visible fraction x dense encoder + decoder) FLOPs, forward and backward. A backward costs
    2x its forward for every conv/linear except those whose input needs no gradient (the stem: 1x), so the total lies
    in (2x, 3x] of the forward count."""
    model = FCMAE("convnextv2_atto", decoder_dim=32)
    imgs = torch.randn(2, 3, 96, 96)
    mask = model.random_mask(imgs)
    visible = (1 - mask).mean().item()
    assert 0 < visible < 1
    with torch.no_grad(), FlopCounterMode(display=False) as enc:
        features = model.encoder.forward_features(imgs)
    with torch.no_grad(), FlopCounterMode(display=False) as dec:
        model.decoder(features, mask)
    forward = visible * enc.get_total_flops() + dec.get_total_flops()
    flops = useful_flops(model, imgs, mask, contextlib.nullcontext)
    assert 2 * forward < flops <= 3 * forward
    assert all(p.grad is None for p in model.parameters())  # counting leaves no gradients behind


@pytest.mark.parametrize("option,message", [
    (["--backends", "masked,sparse"], "unknown backend"),
    (["--image-size", "100"], "multiple of the patch size 32"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_bench_bad_options(option, message, capsys):
    assert main(["bench", "--device", "cpu", *option]) == 2
    assert message in capsys.readouterr().err
