"""Config schema: YAML + overrides, and clear errors before any data or GPU work."""
import os

import pytest
import yaml

from fcmae.cli import main
from fcmae.config import load_config, parse_overrides, save_config, to_dict
from fcmae.pretrain_config import PretrainConfig

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs", "pretrain")


def test_recipes_carry_spec_numbers():
    for size in ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge"):
        cfg = load_config(PretrainConfig, os.path.join(CONFIGS, f"{size}.yaml"), ["data.path=/data"])
        assert cfg.model.name == f"convnextv2_{size}"
        assert (cfg.data.batch_size, cfg.optim.blr, cfg.optim.warmup_epochs, cfg.optim.epochs) == (4096, 1.5e-4, 40, 800)
        assert (cfg.optim.weight_decay, cfg.optim.betas, cfg.model.mask_ratio) == (0.05, [0.9, 0.95], 0.6)
        assert (cfg.model.decoder_dim, cfg.model.decoder_depth, cfg.model.norm_pix_loss) == (512, 1, True)
        assert (cfg.data.image_size, cfg.data.min_scale) == (224, 0.2)


def test_overrides_and_roundtrip(tmp_path):
    cfg = load_config(PretrainConfig, os.path.join(CONFIGS, "tiny.yaml"),
                      ["data.path=/d", "optim.epochs=3", "optim.warmup_epochs=1", "optim.blr=1e-4", "model.norm_pix_loss=false", "resume=null"])
    assert (cfg.data.path, cfg.optim.epochs, cfg.optim.blr, cfg.model.norm_pix_loss) == ("/d", 3, 1e-4, False)
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(PretrainConfig, tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert yaml.safe_load(open(tmp_path / "config.yaml"))["optim"]["epochs"] == 3
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


@pytest.mark.parametrize("override, words", [
    ("data.pth=/x", ["data.pth", "valid keys", "path"]),
    ("optimizer.epochs=3", ["optimizer", "valid keys", "optim"]),
    ("optim.epochs=ten", ["optim.epochs", "int"]),
    ("data.format=zip", ["data.format", "imagefolder", "webdataset"]),
    ("model.name=convnextv2_giant", ["model.name", "convnextv2_atto"]),
    ("model.backend=nope", ["model.backend", "masked"]),
    ("data.image_size=100", ["data.image_size", "multiple of 32"]),
    ("model.mask_ratio=1.0", ["model.mask_ratio", "(0, 1)"]),
    ("model.mask_ratio=0", ["model.mask_ratio", "(0, 1)"]),
    ("data.batch_size=100", ["data.batch_size", "divisible", "3"]),  # 100 % (1 process x 3 accum)
    ("optim.betas=[0.9]", ["optim.betas", "2 items"]),
    ("badoverride", ["key=value"]),
])
def test_bad_config_names_the_key(override, words):
    overrides = ["data.path=/nonexistent", "optim.accum_steps=3", override]
    with pytest.raises(ValueError) as e:
        load_config(PretrainConfig, None, overrides)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_global_batch_smaller_than_world(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="smaller than the 4 processes"):
        load_config(PretrainConfig, None, ["data.path=/x", "data.batch_size=2"])
    with pytest.raises(ValueError, match="divisible by processes x optim.accum_steps = 4 x 1"):
        load_config(PretrainConfig, None, ["data.path=/x", "data.batch_size=6"])


def test_cli_bad_config_fails_fast(tmp_path, capsys):
    """Exit code 2, one line naming the key, and nothing written (no data or run directory touched)."""
    out = tmp_path / "run"
    code = main(["pretrain", "--config", os.path.join(CONFIGS, "atto.yaml"), f"output_dir={out}",
                 "data.path=/nonexistent", "data.image_size=65"])
    assert code == 2
    err = capsys.readouterr().err
    assert "data.image_size=65" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert main(["pretrain", f"output_dir={out}", "data.format=digits", "data.batch_size=8", "data.image_size=64",
                 "data.num_workers=0", "model.mask_ratio=0.5", "resume=/no/such.pt"]) == 2
    assert "resume" in capsys.readouterr().err
