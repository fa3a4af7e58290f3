"""`model.patch_size` 32 / 16 / 8: pretraining at 16 on 32-px images records it, fine-tuning takes the stem stride
from the checkpoint (stride 2 without being told), the export loads in plain timm with patch_size=2, and bad sizes
are one clear error before any data is read."""
import os

import pytest
import timm
import torch
from safetensors.torch import load_file

from fcmae.cli import main
from fcmae.config import load_config, to_dict
from fcmae.finetune import finetune
from fcmae.finetune_config import FinetuneConfig
from fcmae.model import FCMAE
from fcmae.pretrain import pretrain
from fcmae.pretrain_config import PretrainConfig
from imagegen import make_imagefolder

PRE = ["device=cpu", "model.decoder_dim=32", "model.mask_ratio=0.5", "data.batch_size=8", "data.num_workers=0",
       "optim.epochs=1", "optim.warmup_epochs=0", "optim.lr=2e-3", "log.vis_every_epochs=1", "log.vis_images=2",
       "log.progress=false", "log.tensorboard=false", "checkpoint.keep_every_epochs=0"]
FT = ["device=cpu", "data.batch_size=8", "data.eval_batch_size=16", "data.num_workers=0", "optim.epochs=1",
      "optim.warmup_epochs=0", "optim.lr=1e-3", "ema.enabled=false", "log.progress=false", "log.tensorboard=false",
      "checkpoint.keep_every_epochs=0", "aug.mixup=0", "aug.cutmix=0"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("labeled")
    make_imagefolder(str(root / "train"), classes=2, per_class=8, seed=0, size=40)
    make_imagefolder(str(root / "val"), classes=2, per_class=4, seed=1, size=40)
    return str(root)


@pytest.fixture(scope="module")
def pretrained16(images, tmp_path_factory):
    """One epoch of FCMAE at patch 16 on 32-px images (2x2 patches, 2 masked)."""
    out = tmp_path_factory.mktemp("pre16")
    pretrain(load_config(PretrainConfig, None, PRE + [f"output_dir={out}", f"data.path={images}/train",
                                                      "data.image_size=32", "model.patch_size=16"]))
    return out


def test_pretrain_at_patch_16_records_it(pretrained16):
    ckpt = torch.load(pretrained16 / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["model_args"]["patch_size"] == 16
    sd = ckpt["model"]
    assert sd["encoder.stem.0.weight"].shape == (40, 3, 2, 2)  # timm stem stride 16 // 8
    assert sd["decoder.pred.weight"].shape[0] == 16 * 16 * 3  # one 16x16 RGB patch per position
    assert (pretrained16 / "reconstruction-epoch1.png").is_file()
    model = FCMAE(**ckpt["model_args"])  # the header alone rebuilds it
    model.load_state_dict(sd)
    assert model.patch_size == 16 and model.random_mask(torch.zeros(1, 3, 32, 32)).shape == (1, 2, 2)


def test_finetune_takes_the_stem_stride_from_the_checkpoint(pretrained16, images, tmp_path, capsys):
    init = str(pretrained16 / "last.pt")
    summary = finetune(load_config(FinetuneConfig, None, FT + [f"output_dir={tmp_path}", f"data.path={images}",
                                                               "data.image_size=32", f"model.init={init}"]))
    ckpt = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["model_args"]["patch_size"] == 16
    assert ckpt["model"]["stem.0.weight"].shape == (40, 3, 2, 2)
    # plain timm rebuilds the export: stem stride 2 and no stage-0 downsample (timm adds one after a stride-2 stem)
    path = summary["exported"]["model"]
    sd = load_file(path)
    assert sd["stem.0.weight"].shape == (40, 3, 2, 2) and not any(k.startswith("stages.0.downsample") for k in sd)
    model = timm.create_model("convnextv2_atto", patch_size=2, num_classes=2)
    model.stages[0].downsample = torch.nn.Identity()
    model.load_state_dict(sd)
    assert model.eval().forward_features(torch.zeros(1, 3, 32, 32)).shape == (1, 320, 2, 2)  # total stride 16
    assert main(["eval", path, f"data.path={images}", "data.image_size=32", "data.num_workers=0", "device=cpu"]) == 0
    assert f"top-1 {summary['top1']:.2f}" in capsys.readouterr().out


def test_finetune_patch_size_mismatch_fails_before_data(pretrained16, tmp_path):
    init = str(pretrained16 / "last.pt")
    cfg = load_config(FinetuneConfig, None, FT + [f"output_dir={tmp_path}", "data.path=/nonexistent",
                                                  "data.image_size=32", f"model.init={init}", "model.patch_size=32"])
    with pytest.raises(ValueError, match="pretrained with patch size 16 .stem stride 2., but model.patch_size=32"):
        finetune(cfg)
    cfg = load_config(FinetuneConfig, None, FT + [f"output_dir={tmp_path}", "data.path=/nonexistent",
                                                  "data.image_size=40", f"model.init={init}"])
    with pytest.raises(ValueError, match="data.image_size=40 must be a positive multiple of the patch size 16"):
        finetune(cfg)


@pytest.mark.parametrize("overrides, message", [
    (["model.patch_size=12"], "model.patch_size=12 is not valid; choose one of: 32, 16, 8"),
    (["model.patch_size=4"], "model.patch_size=4 is not valid"),
    (["data.image_size=48", "model.patch_size=32"], "data.image_size=48 must be a positive multiple of 32, the mask "),
    (["data.image_size=40", "model.patch_size=16"], "data.image_size=40 must be a positive multiple of 16, the mask"),
])
def test_pretrain_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(PretrainConfig, None, ["data.path=/x", *overrides])


def test_pretrain_config_accepts_small_patches():
    for size, patch in ((48, 16), (40, 8), (16, 8)):
        cfg = load_config(PretrainConfig, None, ["data.path=/x", f"data.image_size={size}", f"model.patch_size={patch}"])
        assert cfg.model.patch_size == patch


@pytest.mark.parametrize("overrides, message", [
    (["model.patch_size=24"], "model.patch_size=24 is not valid; choose one of: 32, 16, 8"),
    (["data.image_size=48"], "data.image_size=48 must be a positive multiple of the patch size 32 .from scratch"),
    (["data.image_size=40", "model.patch_size=16"], "multiple of the patch size 16 .model.patch_size."),
])
def test_finetune_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(FinetuneConfig, None, ["data.path=/x", *overrides])


def test_cli_reports_a_bad_patch_size_in_one_line(capsys):
    assert main(["pretrain", "data.path=/x", "model.patch_size=64"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.patch_size=64 is not valid" in err


def test_visualize_and_bench_at_small_patches(pretrained16, images, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    img = os.path.join(images, "train", "class_0", "img_000.jpg")
    assert main(["visualize", str(pretrained16 / "last.pt"), img, "--out", str(grid)]) == 0
    from PIL import Image
    assert Image.open(grid).size == (4 * 32 + 5 * 2, 32 + 2 * 2)  # the run's 32 px, one row
    assert main(["visualize", str(pretrained16 / "last.pt"), img, "--size", "40"]) == 2
    assert "--size 40 must be a multiple of 16" in capsys.readouterr().err
    argv = ["bench", "--model", "convnextv2_atto", "--batch-size", "2", "--image-size", "32", "--patch-size", "8",
            "--decoder-dim", "32", "--steps", "1", "--warmup", "0", "--device", "cpu", "--backends", "masked,packed"]
    assert main(argv) == 0
    assert "image 32px  patch 8" in capsys.readouterr().out
    assert main(["bench", "--device", "cpu", "--image-size", "40", "--patch-size", "16"]) == 2
    assert "multiple of the patch size 16" in capsys.readouterr().err


# --- model.patch_size=auto (issue 29, point 6) ----------------------------------------------------------------------
@pytest.mark.parametrize("size, patch", [(32, 8), (48, 8), (56, 8), (64, 16), (96, 16), (112, 16), (128, 32),
                                         (224, 32), (512, 32)])
def test_auto_patch_is_the_largest_giving_a_4x4_grid(size, patch):
    cfg = load_config(PretrainConfig, None, ["data.path=/x", f"data.image_size={size}"])
    assert cfg.model.patch_size == patch and cfg.model.patch_size_auto and size // patch >= 4
    assert cfg.coarse_grid_warning() is None and cfg.patch_summary().startswith(f"patch size {patch} (auto: ")
    saved = to_dict(cfg)["model"]
    assert saved["patch_size"] == patch and "patch_size_auto" not in saved  # config.yaml: the number, not "auto"


@pytest.mark.parametrize("size, words", [
    (16, ["data.image_size=16 is too small for model.patch_size=auto", "model.patch_size=8"]),
    (24, ["data.image_size=24 is too small"]),
    (36, ["data.image_size=36 must be a multiple of 8", "model.patch_size=auto", "e.g. 32"]),
    (100, ["data.image_size=100 must be a multiple of 16", "from 64 px up", "e.g. 96"]),
    (200, ["data.image_size=200 must be a multiple of 32", "from 128 px up", "e.g. 192"]),
])
def test_auto_patch_refuses_sizes_it_cannot_serve_in_one_line(size, words):
    with pytest.raises(ValueError) as e:
        load_config(PretrainConfig, None, ["data.path=/x", f"data.image_size={size}"])
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_recipes_resolve_to_the_papers_32_at_224_and_16_at_64():
    for size in ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge"):
        assert load_config(PretrainConfig, f"configs/pretrain/{size}.yaml", ["data.path=/x"]).model.patch_size == 32
        small = load_config(PretrainConfig, f"configs/pretrain/{size}.yaml", ["data.path=/x", "data.image_size=64"])
        assert (small.model.patch_size, small.model.patch_size_auto) == (16, True)
    demo = load_config(PretrainConfig, "configs/pretrain/demo.yaml")
    assert (demo.model.patch_size, demo.model.patch_size_auto) == (16, False)  # the demo states its 16


def test_small_images_train_with_the_auto_patch_and_an_explicit_coarse_grid_warns(tmp_path, capsys, monkeypatch):
    """The issue's command, `fcmae pretrain --config pretrain/atto data.image_size=64` on 64-px images: patch 16
    (a 4x4 grid), said in the first line and recorded; the same run with an explicit 32 warns in one stderr line."""
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    make_imagefolder(str(tmp_path / "img"), classes=1, per_class=16, size=64)
    run = ["pretrain", "--config", "pretrain/atto", "data.image_size=64", f"data.path={tmp_path / 'img'}", *PRE]
    head, keys = run[:3], run[3:]
    assert main(run + [f"output_dir={tmp_path / 'auto'}", "log.vis_every_epochs=0"]) == 0
    out, err = capsys.readouterr()
    assert "patch size 16 (auto: 4x4 grid at 64 px)" in out.splitlines()[0] and err == ""
    ckpt = torch.load(tmp_path / "auto" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["model_args"]["patch_size"] == 16 and ckpt["model"]["encoder.stem.0.weight"].shape[-1] == 2
    assert ckpt["config"]["model"]["patch_size"] == 16
    assert main(run + [f"output_dir={tmp_path / 'auto'}", "log.vis_every_epochs=0"]) == 0  # resolves to the same 16
    assert "is complete" in capsys.readouterr().out
    assert main([*head, "--print-config", *keys, f"output_dir={tmp_path / 'x'}"]) == 0
    row = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("model.patch_size ")]
    assert row == [["model.patch_size", "16", "(auto)", "auto", "recipe"]]
    assert main(run + [f"output_dir={tmp_path / 'p32'}", "model.patch_size=32", "log.vis_every_epochs=0"]) == 0
    out, err = capsys.readouterr()
    assert "patch size 32 (2x2 grid at 64 px)" in out.splitlines()[0]
    assert err.splitlines() == [
        "fcmae pretrain: warning: model.patch_size=32 gives a 2x2 mask grid at data.image_size=64, too coarse a "
        "pretext task (on the digits such an encoder ended worse than random init); model.patch_size=auto picks 16 "
        "here"]
