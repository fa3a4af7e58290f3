"""`fcmae bench` runs end to end on a tiny setting and rejects bad options (no timings are asserted)."""
import contextlib

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fcmae import FCMAE
from fcmae.bench import count_flops, useful_flops
from fcmae.cli import main


def test_bench_prints_every_backend(capsys):
    argv = ["bench", "--model", "convnextv2_atto", "--batch-size", "2", "--image-size", "64", "--decoder-dim", "32",
            "--steps", "1", "--warmup", "0", "--device", "cpu", "--backends", "masked,packed,dense", "--channels-last"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("backend"))
    rows = {line.split()[0]: line.split() for line in lines[header + 1:]}
    assert set(rows) == {"masked", "packed", "dense"}
    assert rows["masked"][5] == "1.00"  # the ratio column is relative to masked
    assert all(float(r[1]) > 0 for r in rows.values())
    assert all(0 < float(r[7].rstrip("%")) < 100 for r in rows.values())  # MFU, also on CPU


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
