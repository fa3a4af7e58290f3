"""bench/roofline.py: its FLOP count is torch's (FlopCounterMode, on the CPU), its useful FLOPs and parameter count
are `fcmae bench`'s and the model's, and it reads a real `fcmae bench --profile` (measured against predicted)."""
import importlib.util
import os
import sys

import pytest
import torch

from fcmae import FCMAE
from fcmae.bench import count_flops, useful_flops
from fcmae.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("roofline", os.path.join(ROOT, "bench", "roofline.py"))
roofline = importlib.util.module_from_spec(spec)
sys.modules["roofline"] = roofline  # its dataclasses look their module up
spec.loader.exec_module(roofline)


@pytest.mark.parametrize("name,size,patch", [("convnextv2_atto", 64, 32), ("convnextv2_tiny", 64, 32),
                                             ("convnextv2_atto", 96, 16), ("convnextv2_atto", 32, 8)])
def test_dense_step_flops_match_flop_counter(name, size, patch):
    """The dense step (encoder on the whole image, decoder, loss; forward + backward): the roofline's GEMM + conv
    FLOPs against FlopCounterMode's (with fcmae.bench's depthwise-backward correction), within 1%; the same for the
    useful FLOPs (the MFU numerator) and the trainable parameter count."""
    torch.manual_seed(0)
    model = FCMAE(name, decoder_dim=64, patch_size=patch)
    imgs = torch.randn(2, 3, size, size)
    mask = model.random_mask(imgs)
    with count_flops() as counted:
        pred = model.decoder(model.encoder.forward_features(imgs), mask).flatten(2).transpose(1, 2)
        model.loss(imgs, pred, mask).backward()
    g = roofline.Geometry(name, size, 2, 0.6, patch, decoder_dim=64)
    step = roofline.predict(g, "dense", fused=False)
    predicted = step.costs["gemm"].flops + step.costs["dwconv"].flops
    assert predicted == pytest.approx(counted.get_total_flops(), rel=0.01)
    model.zero_grad(set_to_none=True)
    useful = useful_flops(model, imgs, mask, lambda: torch.autocast("cpu", enabled=False))
    assert roofline.useful_flops(g) == pytest.approx(useful, rel=0.01)
    assert roofline.parameter_count(g) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_packed_does_the_visible_share_of_the_gemms():
    g = roofline.Geometry("convnextv2_base", 224, 64)
    packed, dense = (roofline.predict(g, b, fused=False).costs["gemm"].flops for b in ("packed", "dense"))
    decoder = dense - roofline.predict(g, "dense", fused=False, encoder_only=True).costs["gemm"].flops
    assert (packed - decoder) == pytest.approx((dense - decoder) * 19 / 49, rel=1e-6)


def test_report_reads_a_bench_profile(tmp_path, capsys):
    assert main(["bench", "--model", "convnextv2_atto", "--batch-size", "2", "--image-size", "64", "--decoder-dim",
                 "32", "--steps", "1", "--warmup", "0", "--device", "cpu", "--dtype", "fp32",
                 "--backends", "packed,dense", "--profile", str(tmp_path)]) == 0
    capsys.readouterr()
    roofline.main(["--model", "convnextv2_atto", "--image-size", "64", "--batch", "2", "--decoder-dim", "32",
                   "--dtype", "fp32", "--device", "h100", "--profile", str(tmp_path)])
    out = capsys.readouterr().out
    assert "packed (eager): measured" in out and "dense (eager): measured" in out
    section = out.split("packed (eager): measured")[1].split("dense (eager)")[0]
    rows = {line.split()[0]: line.split()[1:] for line in section.splitlines()[2:] if line.strip()}
    assert float(rows["gemm"][0]) > 0 and float(rows["dwconv"][0]) > 0  # measured ms per step, from the profile
    assert float(rows["total"][1]) > 0
