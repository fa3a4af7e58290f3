"""Checkpoints at mask patch 16 / 8 (stem stride 2 / 1): every format tells the stem stride by the stem kernel, an
FCMAE checkpoint pretrained at 16 converts to timm / Hugging Face / FCMAE and loads there with stride 2, mismatches
are one clear error."""
import json

import pytest
import timm
import torch
from safetensors import safe_open

from conftest import randomize_grn, rel_err, trained_fcmae
from convnextv2 import SparseEncoder, create_convnextv2
from convnextv2.checkpoint import (
    CheckpointError, load_encoder_weights, read_encoder, save_state_dict, timm_to_hf, timm_to_minkowski,
    timm_to_reference,
)
from fcmae import FCMAE
from fcmae.cli import main
from fcmae.convert import fcmae_checkpoint


def known_model(patch, num_classes=10):
    """A timm classifier at total stride `patch` with every parameter random (no mapping error can hide)."""
    model = create_convnextv2("convnextv2_atto", patch, num_classes=num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return randomize_grn(model).eval()


def build_format(fmt, model, patch):
    sd = model.state_dict()
    if fmt == "timm":
        return sd
    if fmt == "reference":
        return {"model": timm_to_reference(sd)}
    if fmt == "minkowski":
        mk, _ = timm_to_minkowski(sd)
        return {"model": {f"encoder.{k}": v for k, v in mk.items()}}
    if fmt == "hf":
        return timm_to_hf(sd)
    if fmt == "fcmae":
        fcmae = FCMAE("convnextv2_atto", decoder_dim=32, patch_size=patch)
        fcmae.encoder.load_state_dict({k: v for k, v in sd.items() if not k.startswith("head.fc")})
        return fcmae_checkpoint(fcmae, {"encoder_name": "convnextv2_atto", "decoder_dim": 32, "patch_size": patch})
    raise AssertionError(fmt)


@pytest.mark.parametrize("patch", [16, 8])
@pytest.mark.parametrize("fmt", ["timm", "reference", "minkowski", "hf", "fcmae"])
def test_every_format_reads_the_stem_stride(fmt, patch, tmp_path):
    model = known_model(patch)
    path = tmp_path / "ckpt.pth"
    torch.save(build_format(fmt, model, patch), path)
    weights = read_encoder(path)
    assert (weights.format, weights.arch.name) == (fmt, "convnextv2_atto")
    assert (weights.arch.stem_stride, weights.arch.patch_size) == (patch // 8, patch)
    assert f"patch size {patch}" in weights.describe()
    fresh = create_convnextv2("convnextv2_atto", patch, num_classes=10).eval()
    load_encoder_weights(fresh, weights)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(fresh.forward_features(x), model.forward_features(x)) <= 1e-5
    standard = timm.create_model("convnextv2_atto", num_classes=10)
    with pytest.raises(ValueError, match=f"holds convnextv2_atto .*patch size {patch}: stem {patch // 8}x.*stem.0.weight"):
        load_encoder_weights(standard, weights)


@pytest.fixture
def fcmae16(tmp_path):
    """An FCMAE checkpoint pretrained at patch 16 (a few steps, so GRN is non-zero) and its encoder's features."""
    fcmae = trained_fcmae(patch_size=16)
    ckpt = tmp_path / "last.pt"
    torch.save(fcmae_checkpoint(fcmae, {"encoder_name": "convnextv2_atto", "decoder_dim": 32, "patch_size": 16}), ckpt)
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        feats = SparseEncoder(fcmae.encoder)(x, torch.zeros(2, 3, 4))
    return ckpt, x, feats


def test_fcmae16_to_timm_loads_in_timm_by_name(fcmae16, tmp_path, no_network, capsys):
    ckpt, x, feats = fcmae16
    dst = tmp_path / "clf.safetensors"
    assert main(["convert", str(ckpt), str(dst), "--num-classes", "5"]) == 0
    out = capsys.readouterr().out
    assert "patch size 16: stem 2x2" in out and "timm.create_model('convnextv2_atto_s16', in_chans=3" in out
    with safe_open(str(dst), "pt") as f:
        meta = f.metadata()
    assert (meta["patch_size"], meta["stem_stride"], meta["model"]) == ("16", "2", "convnextv2_atto")
    # what the printed line says, run verbatim (tests/test_load_lines.py: in a fresh process, every layout)
    scope: dict = {}
    exec(out.split("load: ", 1)[1].strip(), scope)
    clf = scope["model"].eval()
    with torch.no_grad():
        assert rel_err(clf.forward_features(x), feats) <= 1e-5
    assert clf(x).shape == (2, 5)


def test_patch8_export_is_timms_own_layout(tmp_path, no_network, capsys):
    model = known_model(8, num_classes=0)
    src = tmp_path / "p8.pth"
    torch.save(build_format("fcmae", model, 8), src)
    dst = tmp_path / "p8.safetensors"
    assert main(["convert", str(src), str(dst), "--num-classes", "3"]) == 0
    assert "timm.create_model('convnextv2_atto_s8', in_chans=3, num_classes=3" in capsys.readouterr().out
    clf = timm.create_model("convnextv2_atto", patch_size=1, pretrained=True, num_classes=3,
                            pretrained_cfg_overlay=dict(file=str(dst), num_classes=3)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(clf.forward_features(x), model.forward_features(x)) <= 1e-5


def test_fcmae16_to_hf_loads_in_transformers(fcmae16, tmp_path, no_network):
    transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install '.[dev]')")
    ckpt, x, feats = fcmae16
    assert main(["convert", str(ckpt), str(tmp_path / "hf"), "--to", "hf", "--num-classes", "0"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["patch_size"] == 2
    hf = transformers.ConvNextV2Model.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.patch_size == 2
    with torch.no_grad():
        assert rel_err(hf(pixel_values=x).last_hidden_state, feats) <= 1e-4
    # and back: the HF file reads as patch 16
    assert read_encoder(tmp_path / "hf" / "model.safetensors").arch.patch_size == 16


def test_fcmae16_to_fcmae_keeps_the_patch_size(fcmae16, tmp_path):
    ckpt, x, feats = fcmae16
    dst = tmp_path / "again.pt"
    assert main(["convert", str(ckpt), str(dst), "--to", "fcmae"]) == 0
    new = torch.load(dst, map_location="cpu", weights_only=True)
    assert new["model_args"]["patch_size"] == 16
    model = FCMAE(**new["model_args"])
    model.load_state_dict(new["model"])
    with torch.no_grad():
        assert rel_err(SparseEncoder(model.encoder)(x, torch.zeros(2, 3, 4)), feats) <= 1e-5


def test_timm_own_stride2_layout_is_refused(tmp_path):
    """timm's plain patch_size=2 model has a stage-0 downsample (total stride 32): named, not silently misread."""
    path = tmp_path / "timm2.safetensors"
    save_state_dict(timm.create_model("convnextv2_atto", patch_size=2).state_dict(), path)
    with pytest.raises(CheckpointError, match="stage-0 downsample after a 2x2 stem"):
        read_encoder(path)
