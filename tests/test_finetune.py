"""`fcmae finetune` / `fcmae eval` end to end on CPU: from a converted FCMAE checkpoint on a generated ImageFolder,
exported weights reproduce the reported accuracy in plain timm, exact resume (model, EMA, optimizer, schedule, best),
and clear errors for bad inputs."""
import json
import os

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.data import create_transform
from torchvision.datasets import ImageFolder

from fcmae.cli import main
from fcmae.config import load_config
from fcmae.finetune import finetune
from fcmae.finetune_config import FinetuneConfig
from fcmae.model import FCMAE
from imagegen import make_imagefolder

# atto at 64 px; 24 train images / batch 8 = 3 steps per epoch; RandAug, erasing, mixup/cutmix, EMA all on
BASE = ["device=cpu", "data.image_size=64", "data.batch_size=8", "data.eval_batch_size=16", "data.num_workers=0",
        "optim.epochs=2", "optim.warmup_epochs=0.5", "optim.lr=1e-3", "optim.layer_decay=0.9", "model.drop_path=0.1",
        "ema.decay=0.9", "checkpoint.every_steps=1", "checkpoint.keep_every_epochs=0", "log.progress=false",
        "log.tensorboard=false"]


def config(out, *extra):
    return load_config(FinetuneConfig, None, BASE + [f"output_dir={out}", *extra])


def fcmae_checkpoint(path, name="convnextv2_atto", in_chans=3):
    torch.manual_seed(1)
    model = FCMAE(name, decoder_dim=32, mask_ratio=0.5, in_chans=in_chans)
    args = {"encoder_name": name, "in_chans": in_chans, "mask_ratio": 0.5, "decoder_dim": 32, "decoder_depth": 1,
            "norm_pix_loss": True}
    torch.save({"format": "fcmae", "version": 1, "model": model.state_dict(), "model_args": args}, path)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("labeled")
    make_imagefolder(str(root / "train"), classes=3, per_class=8, seed=0, size=72)
    make_imagefolder(str(root / "val"), classes=3, per_class=4, seed=1, size=72)
    return str(root)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return fcmae_checkpoint(tmp_path_factory.mktemp("pre") / "last.pt")


@pytest.fixture(scope="module")
def reference(data, pretrained, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref"))
    summary = finetune(config(out, f"data.path={data}", f"model.init={pretrained}"))
    return out, summary


def timm_top1(path, val_root, k):
    """Accuracy computed independently: timm loads the export, timm's eval transform, torchvision's ImageFolder."""
    model = timm.create_model("convnextv2_atto", pretrained=True, num_classes=k,
                              pretrained_cfg_overlay=dict(file=path, num_classes=k)).eval()
    ds = ImageFolder(val_root, transform=create_transform(64, is_training=False, crop_pct=0.875,
                                                          interpolation="bicubic"))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor(ds.targets)
    with torch.no_grad():
        return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def test_from_fcmae_checkpoint_export_reproduces_accuracy(reference, data, capsys):
    out, summary = reference
    assert summary["epoch"] == 2 and summary["step"] == 6
    val = os.path.join(data, "val")
    assert timm_top1(summary["exported"]["model"], val, 3) == pytest.approx(summary["top1"], abs=1e-6)
    assert timm_top1(summary["exported"]["ema"], val, 3) == pytest.approx(summary["ema_top1"], abs=1e-6)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and all("ema_top5" in r for r in epochs)
    best = max(r["top1"] for r in epochs)
    assert summary["best"]["top1"] == best
    # the best checkpoint holds the weights that scored `best`: fcmae eval reproduces it and prints the table
    assert main(["eval", os.path.join(out, "best.pt")]) == 0
    printed = capsys.readouterr().out
    assert f"top-1 {best:.2f}" in printed and "class_2" in printed
    pre = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    assert pre["format"] == "fcmae-finetune" and pre["classes"] == ["class_0", "class_1", "class_2"]


def test_pretrained_encoder_is_loaded(data, pretrained, tmp_path, capsys):
    cfg = config(str(tmp_path), f"data.path={data}", f"model.init={pretrained}", "optim.epochs=1", "ema.enabled=false")
    from fcmae.engine.distributed import DistInfo
    from fcmae.finetune import FinetuneTask

    task = FinetuneTask(cfg, DistInfo())
    enc = torch.load(pretrained, weights_only=True)["model"]
    sd = task.model.state_dict()
    assert torch.equal(sd["stages.2.blocks.3.mlp.fc1.weight"].flatten(), enc["encoder.stages.2.blocks.3.mlp.fc1.weight"].flatten())
    assert torch.equal(sd["head.norm.weight"], torch.ones(320))  # fresh, not the FCMAE's frozen one
    assert sd["head.fc.weight"].std().item() == pytest.approx(0.02 * 1e-3, rel=0.15)  # std .02 x head init scale
    assert torch.equal(sd["head.fc.bias"], torch.zeros(3))
    assert "head.fc, head.norm" in task.load_info.summary()


def test_resume_mid_run_equals_uninterrupted(reference, data, pretrained, tmp_path):
    ref_out, ref = reference
    out = str(tmp_path)
    cfg = config(out, f"data.path={data}", f"model.init={pretrained}")

    def kill(step, loss):
        if step == 4:  # epoch 2, after one of its steps was checkpointed
            raise KeyboardInterrupt
        return loss

    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, on_loss=kill)
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["step"] == 4
    resumed = finetune(cfg)
    assert resumed["best"] == ref["best"]
    for key in ("model", "ema"):
        a, b = load_file(resumed["exported"][key]), load_file(ref["exported"][key])
        assert all(torch.equal(a[k], b[k]) for k in a), key
    a = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    b = torch.load(os.path.join(ref_out, "last.pt"), weights_only=True)
    for s in a["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][s]["exp_avg_sq"], b["optimizer"]["state"][s]["exp_avg_sq"])
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [g["lr"] for g in b["optimizer"]["param_groups"]]


def test_bad_inputs(data, tmp_path):
    extra = tmp_path / "extra"
    make_imagefolder(str(extra / "train"), classes=2, per_class=2, size=64)
    make_imagefolder(str(extra / "val"), classes=3, per_class=1, size=64)
    with pytest.raises(ValueError, match="val split .* has classes the train split lacks: class_2"):
        finetune(config(str(tmp_path / "a"), f"data.path={extra}"))
    with pytest.raises(ValueError, match="model.num_classes=5 but the training data has 3 classes"):
        finetune(config(str(tmp_path / "b"), f"data.path={data}", "model.num_classes=5"))
    femto = fcmae_checkpoint(tmp_path / "femto.pt", "convnextv2_femto")
    with pytest.raises(ValueError, match="holds convnextv2_femto.*but model.name=convnextv2_atto"):
        finetune(config(str(tmp_path / "c"), f"data.path={data}", f"model.init={femto}"))
    assert main(["finetune", f"data.path={data}", "model.init=/nope.pt"]) == 2
    assert not os.path.exists(tmp_path / "c" / "last.pt")



def test_greyscale_pretrained_finetunes_and_evaluates_on_one_channel(data, tmp_path, capsys):
    """A 1-channel FCMAE checkpoint: in_chans comes from it, images are decoded grey (RandAugment included), the export
    is a 1-channel timm model, and `fcmae eval` of it reproduces the fine-tune's top-1 on the same grey images."""
    grey = fcmae_checkpoint(tmp_path / "grey.pt", in_chans=1)
    summary = finetune(config(str(tmp_path / "ft"), f"data.path={data}", f"model.init={grey}", "optim.epochs=1"))
    ckpt = torch.load(os.path.join(tmp_path, "ft", "last.pt"), weights_only=True)
    assert ckpt["model_args"]["in_chans"] == 1
    stem = ckpt["model"]["stem.0.weight"]
    assert stem.shape == (40, 1, 4, 4)
    exported = load_file(summary["exported"]["model"])
    assert exported["stem.0.weight"].shape == (40, 1, 4, 4)
    assert main(["eval", summary["exported"]["model"], f"data.path={data}", "data.image_size=64", "data.num_workers=0",
                 "device=cpu"]) == 0
    assert f"top-1 {summary['top1']:.2f}" in capsys.readouterr().out


def test_channel_counts_without_a_pil_mode_from_scratch(data, tmp_path):
    """in_chans=2 (no PIL mode): decoded grey, RandAugment on the grey image, repeated to 2 channels, then normalised."""
    from fcmae.engine.distributed import DistInfo
    from fcmae.finetune import FinetuneTask

    task = FinetuneTask(config(str(tmp_path), f"data.path={data}", "model.in_chans=2"), DistInfo())
    batch = next(iter(task.batches(0, 0)))
    imgs = batch[0]
    assert imgs.shape == (8, 2, 64, 64) and torch.equal(imgs[:, 0], imgs[:, 1])
    assert task.model.stem[0].in_channels == 2
    assert task.loss(task.model, batch, 0, 0).isfinite()  # mixup, model, soft-target loss


def test_channel_mismatches_fail_before_training(data, tmp_path):
    grey = fcmae_checkpoint(tmp_path / "grey.pt", in_chans=1)
    with pytest.raises(ValueError, match="pretrained on 1-channel images, but model.in_chans=3"):
        finetune(config(str(tmp_path / "a"), f"data.path={data}", f"model.init={grey}", "model.in_chans=3"))
    with pytest.raises(ValueError, match="data.mean has 3 values but the model takes 1 input channels"):
        finetune(config(str(tmp_path / "b"), f"data.path={data}", f"model.init={grey}", "data.mean=[0.5,0.5,0.5]"))
    with pytest.raises(ValueError, match="RandAugment cannot transform 4-channel"):
        finetune(config(str(tmp_path / "c"), f"data.path={data}", "model.in_chans=4"))
    with pytest.raises(ValueError, match="in_chans=2 every channel is the same grey image"):
        finetune(config(str(tmp_path / "d"), f"data.path={data}", "model.in_chans=2", "data.mean=[0.4,0.5]"))
    assert not any(os.path.exists(tmp_path / d / "last.pt") for d in "abcd")

# docs/method.md's fine-tuning table, written out: size -> (blr, wd, layer decay, scheme, epochs, warmup, drop path, mixup, cutmix, smoothing)
RECIPES = {
    "atto": (2e-4, 0.3, 0.9, "single", 600, 0, 0.1, 0, 0, 0.2),
    "femto": (2e-4, 0.05, 0.9, "single", 600, 0, 0.0, 0.3, 0.3, 0.2),
    "pico": (2e-4, 0.3, 0.9, "single", 600, 0, 0.0, 0.3, 0.3, 0.2),
    "nano": (2e-4, 0.3, 0.9, "single", 600, 0, 0.1, 0.5, 0.5, 0.2),
    "tiny": (8e-4, 0.05, 0.9, "single", 300, 40, 0.2, 0.8, 1.0, 0.1),
    "base": (6.25e-4, 0.05, 0.6, "group", 100, 20, 0.1, 0.8, 1.0, 0.1),
    "large": (6.25e-4, 0.05, 0.6, "group", 100, 20, 0.2, 0.8, 1.0, 0.1),
    "huge": (1.25e-3, 0.05, 0.75, "single", 50, 10, 0.3, 0.8, 1.0, 0.1),
}


@pytest.mark.parametrize("size", sorted(RECIPES))
def test_recipes_match_spec(size):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = load_config(FinetuneConfig, os.path.join(root, "configs", "finetune", f"{size}.yaml"), ["data.path=/d"])
    o, a, d = c.optim, c.aug, c.data
    got = (o.blr, o.weight_decay, o.layer_decay, o.layer_decay_scheme, o.epochs, o.warmup_epochs, c.model.drop_path,
           a.mixup, a.cutmix, a.smoothing)
    assert got == RECIPES[size]
    assert c.model.name == f"convnextv2_{size}" and d.batch_size * o.accum_steps == 1024
    assert tuple(o.betas) == (0.9, 0.999) and d.auto_augment == "rand-m9-mstd0.5-inc1" and d.reprob == 0.25
    assert c.model.head_init_scale == 0.001 and c.ema.decay == 0.9999 and d.crop_pct == 0.875


def test_eval_every_epochs_evaluates_on_schedule_and_after_the_last(tmp_path):
    """data.eval_every_epochs=2 over 3 epochs: val metrics at epochs 2 and 3 only (the last always)."""
    import json

    from fcmae.config import load_config
    from fcmae.finetune import finetune
    from fcmae.finetune_config import FinetuneConfig

    cfg = load_config(FinetuneConfig, None, [
        "data.format=digits", "data.image_size=32", "model.patch_size=16", "data.digits_per_class=2",
        "data.digits_val=20", "data.batch_size=10", "data.num_workers=0", "data.auto_augment=null", "data.reprob=0",
        "data.eval_every_epochs=2", "aug.mixup=0", "aug.cutmix=0", "optim.epochs=3", "optim.warmup_epochs=0",
        "log.progress=false", "log.tensorboard=false", "device=cpu", f"output_dir={tmp_path / 'ft'}"])
    summary = finetune(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "ft" / "metrics.jsonl")]
    evaluated = [r["epoch"] for r in rows if r.get("kind") == "epoch" and "top1" in r]
    assert evaluated == [2, 3]
    assert 0 <= summary["top1"] <= 100
