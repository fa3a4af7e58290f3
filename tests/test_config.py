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
    ("data.image_size=200", ["data.image_size", "multiple of 32"]),  # model.patch_size=auto: 32 from 128 px
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


def test_config_takes_a_recipe_name(tmp_path, capsys):
    """--config: a path, `kind/name`, a bare name for the command's kind, or configs/... as README writes it."""
    from fcmae.recipes import find_config, recipe_names

    tiny = os.path.join(os.path.dirname(CONFIGS), "pretrain", "tiny.yaml")
    assert "pretrain/tiny" in recipe_names() and "finetune/demo" in recipe_names("finetune")
    for value in ("pretrain/tiny", "configs/pretrain/tiny.yaml"):
        assert os.path.samefile(find_config(value), tiny)
    assert os.path.samefile(find_config("tiny", "pretrain"), tiny)
    own = tmp_path / "tiny"  # an existing file wins over a recipe of the same name
    own.write_text("seed: 3\n")
    assert find_config(str(own), "pretrain") == str(own)
    with pytest.raises(ValueError, match=r"'tiny' is neither a file nor a recipe.*pretrain/tiny"):
        find_config("tiny")
    assert main(["pretrain", "--config", "tinyy", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "atto, base, demo, femto, huge, large, nano, pico, tiny" in err
    assert not (tmp_path / "run").exists()


def test_print_config_shows_value_default_and_source(tmp_path, capsys):
    argv = ["pretrain", "--config", "demo", "--print-config", "optim.epochs=2", f"output_dir={tmp_path / 'r'}"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:] if not line.startswith("#")}
    from fcmae.config import to_dict

    def leaves(d, prefix=""):
        return [k for key, v in d.items() for k in (leaves(v, f"{prefix}{key}.") if isinstance(v, dict)
                                                    else [prefix + key])]
    assert sorted(rows) == sorted(leaves(to_dict(PretrainConfig())))  # every key, once
    assert rows["optim.epochs"] == ["2", "800", "override"] and rows["model.patch_size"] == ["16", "auto", "recipe"]
    assert rows["optim.lr"] == ["null", "null", "default"]
    assert not (tmp_path / "r").exists()  # printed, nothing run
