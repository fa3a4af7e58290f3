"""timm names for patch 16 / 8 (`convnextv2_<size>_s16` / `_s8`, convnextv2.timm_names) and the backbone export:
the layouts against timm's own building blocks, `feature_info`'s true strides, offline loading by name with
`pretrained_cfg_overlay` and `local-dir:`, and the mismatch message naming what differs."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors import safe_open

from conftest import randomize_grn
from convnextv2 import create_encoder, encoder_patch_size
from convnextv2.checkpoint import load_encoder_weights
from convnextv2.timm_names import SIZES, timm_name
from fcmae.cli import main


def stage_outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Our encoder's stage outputs: stem, then each stage in turn (what a feature pyramid takes)."""
    out, x = [], model.stem(x)
    for stage in model.stages:
        x = stage(x)
        out.append(x)
    return out


@pytest.mark.parametrize("name", sorted(SIZES))
def test_every_size_has_both_names(name):
    """Every size at 16 and 8: no stage-0 downsample, the size's widths, and feature_info's strides are the model's."""
    depths, dims, _ = SIZES[name]
    for patch in (16, 8):
        arch = timm_name(name, patch)
        assert arch == f"{name}_s{patch}" and arch in timm.list_models("convnextv2_*")
        with torch.device("meta"):
            model = timm.create_model(arch, in_chans=2)
            features = timm.create_model(arch, in_chans=2, features_only=True)
        assert isinstance(model.stages[0].downsample, torch.nn.Identity) and encoder_patch_size(model) == patch
        assert model.stem[0].kernel_size == (patch // 8,) * 2 and model.stem[0].in_channels == 2
        assert [len(s.blocks) for s in model.stages] == list(depths)
        assert features.feature_info.reduction() == [patch // 8 * 2 ** i for i in range(4)]
        assert features.feature_info.channels() == list(dims)
        assert model.pretrained_cfg["architecture"] == arch
    assert timm_name(name, 32) == name


def test_layouts_match_timm_and_transformers_own():
    """s8 is timm's own patch_size=1 network; s16 is timm's patch_size=2 network without its stage-0 downsample (the
    layout of transformers' ConvNextV2 with patch_size=2, tested in test_patch_checkpoints.py): same weights, same
    outputs."""
    x = torch.randn(2, 3, 48, 64)
    for patch, stem in ((16, 2), (8, 1)):
        own = randomize_grn(timm.create_model("convnextv2_atto", patch_size=stem, num_classes=4)).eval()
        own.stages[0].downsample = torch.nn.Identity()
        ours = timm.create_model(timm_name("convnextv2_atto", patch), num_classes=4).eval()
        ours.load_state_dict(own.state_dict(), strict=True)
        with torch.no_grad():
            assert torch.equal(ours(x), own(x))


def test_the_name_fixes_the_stride():
    with pytest.raises(ValueError, match="convnextv2_atto_s16 has total stride 16 by its name; drop patch_size"):
        timm.create_model("convnextv2_atto_s16", patch_size=4)
    with pytest.raises(ValueError, match="drop output_stride"):
        timm.create_model("convnextv2_atto_s8", output_stride=16)
    with pytest.raises(ValueError, match="no timm name"):
        timm_name("convnextv2_atto", 4)


@pytest.fixture
def encoder16(tmp_path):
    """A grey patch-16 encoder with every parameter random, saved as a timm state_dict."""
    enc = create_encoder("convnextv2_atto", in_chans=1, patch_size=16)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    src = tmp_path / "enc.pt"
    torch.save(randomize_grn(enc).state_dict(), src)
    return enc.eval(), src


def test_backbone_export_loads_by_name_and_as_local_dir(encoder16, tmp_path, no_network, capsys):
    enc, src = encoder16
    x = torch.randn(2, 1, 64, 48)
    with torch.no_grad():
        want = stage_outputs(enc, x)
    # a file: the printed line (features_only, by name, overlay) gives our stage outputs exactly
    assert main(["convert", str(src), str(tmp_path / "enc.safetensors"), "--to", "backbone"]) == 0
    out = capsys.readouterr().out
    assert ("timm convnextv2_atto_s16 backbone (no classifier), stage channels [40, 80, 160, 320], "
            "strides [2, 4, 8, 16]") in out
    scope: dict = {}
    exec(out.split("  load: ", 1)[1].strip(), scope)
    model = scope["model"].eval()
    assert model.feature_info.reduction() == [2, 4, 8, 16]
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x), want, strict=True))
    with safe_open(str(tmp_path / "enc.safetensors"), "pt") as f:
        config = json.loads(f.metadata()["timm_config"])
        assert not any(k.startswith("head.fc") for k in f.keys())
    assert (config["architecture"], config["num_classes"], config["model_args"]) == ("convnextv2_atto_s16", 0,
                                                                                      {"in_chans": 1})
    assert [(s["num_chs"], s["reduction"]) for s in config["feature_info"]] == [(40, 2), (80, 4), (160, 8), (320, 16)]
    assert config["pretrained_cfg"]["mean"] == [0.449] and config["pretrained_cfg"]["input_size"] == [1, 224, 224]
    # a folder: timm's local-dir reads config.json (architecture, in_chans) and loads strictly, with or without features
    assert main(["convert", str(src), str(tmp_path / "backbone"), "--to", "backbone"]) == 0
    assert json.loads((tmp_path / "backbone" / "config.json").read_text()) == config
    features = timm.create_model(f"local-dir:{tmp_path / 'backbone'}", pretrained=True, features_only=True).eval()
    pooled = timm.create_model(f"local-dir:{tmp_path / 'backbone'}", pretrained=True).eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(features(x), want, strict=True))
        assert torch.equal(pooled.forward_features(x), want[-1]) and pooled.num_classes == 0
    assert main(["convert", str(src), str(tmp_path / "x.safetensors"), "--to", "backbone", "--num-classes", "3"]) == 2
    assert "a backbone has no classifier" in capsys.readouterr().err
    (tmp_path / "taken").write_text("a file")
    assert main(["convert", str(src), str(tmp_path / "taken"), "--to", "backbone"]) == 2
    assert "is a file; --to backbone writes a folder there" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists() and (tmp_path / "taken").read_text() == "a file"


def test_mismatch_names_in_chans_and_patch_size(encoder16):
    """Loading into a model of another channel count / patch size says so, and which timm name to build."""
    _, src = encoder16
    with pytest.raises(ValueError) as e:
        load_encoder_weights(timm.create_model("convnextv2_atto", num_classes=10), str(src))
    said = str(e.value)
    assert "differ in in_chans (1 vs 3) and patch size (16 vs 32)" in said and "--model" not in said
    assert "timm.create_model('convnextv2_atto_s16', in_chans=1, ...) after `import convnextv2`" in said
    with pytest.raises(ValueError, match=r"differ in size \(convnextv2_atto vs convnextv2_femto\): build the model as "
                                         r"timm.create_model\('convnextv2_atto_s16', in_chans=1"):
        load_encoder_weights(timm.create_model("convnextv2_femto_s16", in_chans=1), str(src))
