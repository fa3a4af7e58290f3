"""Bad input, as a new user meets it (issue 15 item 13): one clear line, exit code 2, no traceback, and nothing
written, before any data, file or device is touched."""
import os
import subprocess
import sys

import pytest
import torch
import yaml

from fcmae.cli import main
from fcmae.config import load_config
from fcmae.pretrain_config import PretrainConfig
from fcmae.recipes import find_config
from imagegen import make_imagefolder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["device=cpu", "model.decoder_dim=32", "model.mask_ratio=0.5", "data.image_size=64", "model.patch_size=32",
         "data.batch_size=8", "data.num_workers=0", "optim.epochs=1", "optim.warmup_epochs=0", "log.progress=false",
         "log.tensorboard=false", "log.vis_every_epochs=0"]


def one_line(err: str, *words: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """`python -m fcmae ARGS` in a fresh process (the real stderr, exit code)."""
    return subprocess.run([sys.executable, "-m", "fcmae", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    make_imagefolder(str(root), classes=1, per_class=8)
    return str(root)


def test_malformed_yaml_file_and_override_subprocess(tmp_path, images):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  epochs: [1,\n")
    out = tmp_path / "run"
    r = cli("pretrain", "--config", str(bad), f"output_dir={out}", f"data.path={images}")
    assert r.returncode == 2
    one_line(r.stderr, "fcmae pretrain: error:", "bad.yaml", "not valid YAML", "line 3")
    r = cli("pretrain", f"output_dir={out}", f"data.path={images}", "optim.betas=[0.9,")
    assert r.returncode == 2
    one_line(r.stderr, "override 'optim.betas=[0.9,' is not valid YAML")
    assert not out.exists()


@pytest.mark.parametrize("text, words", [
    (None, ["is neither a file nor a recipe", "--config"]),
    ("42\n", ["must hold a mapping", "42"]),
])
def test_config_file_missing_or_scalar(tmp_path, capsys, text, words):
    path = tmp_path / "c.yaml"
    if text is not None:
        path.write_text(text)
    assert main(["pretrain", "--config", str(path), f"output_dir={tmp_path / 'run'}", "data.format=digits"]) == 2
    one_line(capsys.readouterr().err, *words)
    assert not (tmp_path / "run").exists()


def test_output_dir_a_file_or_unwritable(tmp_path, images, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, words in ((afile, ["is an existing file, not a folder"]),
                       (afile / "run", ["cannot be created", "is a file"])):
        assert main(["pretrain", *SMALL, f"output_dir={out}", f"data.path={images}"]) == 2
        one_line(capsys.readouterr().err, "output_dir=", *words)
    assert afile.read_text() == "x"
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    assert main(["pretrain", *SMALL, f"output_dir={locked / 'run'}", f"data.path={images}"]) == 2
    one_line(capsys.readouterr().err, "is not writable", str(locked))
    assert os.listdir(locked) == []


def test_shards_into_a_file_subprocess(tmp_path, images):
    dst = tmp_path / "dst"
    dst.write_text("x")
    r = cli("shards", images, str(dst))
    assert r.returncode == 2
    one_line(r.stderr, "fcmae shards: error:", "is an existing file")
    assert dst.read_text() == "x"


def fake_training_checkpoint(path, fmt, model_args):
    torch.save({"format": fmt, "version": 1, "model": {"w": torch.zeros(1)}, "optimizer": {}, "epoch": 1, "step": 3,
                "model_args": model_args}, path)


def test_pretrain_resume_from_a_finetune_checkpoint(tmp_path, images, capsys):
    ft = tmp_path / "ft.pt"
    fake_training_checkpoint(ft, "fcmae-finetune", {"name": "convnextv2_atto", "num_classes": 3, "in_chans": 3})
    out = tmp_path / "run"
    assert main(["pretrain", *SMALL, f"output_dir={out}", f"data.path={images}", f"resume={ft}"]) == 2
    one_line(capsys.readouterr().err, f"resume='{ft}' holds a fine-tuning run, but this is an FCMAE pretraining")
    assert not out.exists()


@pytest.mark.parametrize("explicit", [False, True])
def test_bad_checkpoint_to_resume_one_clean_line(tmp_path, images, explicit, capsys):
    """A truncated last.pt (or resume= file): the same clean line convert/eval/finetune give, not torch's message."""
    out = tmp_path / "run"
    out.mkdir()
    bad = (tmp_path / "x.pt") if explicit else (out / "last.pt")
    bad.write_bytes(b"PK\x03\x04 half a zip")
    before = sorted(os.listdir(out))
    assert main(["pretrain", *SMALL, f"output_dir={out}", f"data.path={images}",
                 *([f"resume={bad}"] if explicit else [])]) == 2
    line = one_line(capsys.readouterr().err, "cannot resume:", "truncated or corrupt")
    assert ("resume=PATH" in line) != explicit  # for last.pt: how to go on
    assert sorted(os.listdir(out)) == before  # no config.yaml, metrics or tb/ written


def test_mask_ratio_checked_against_the_patch_grid_before_anything(tmp_path, images, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", *SMALL, f"output_dir={out}", f"data.path={images}", "model.mask_ratio=0.9"]) == 2
    one_line(capsys.readouterr().err, "model.mask_ratio=0.9 leaves no visible patch of the 4 (2x2)",
             "model.mask_ratio <= 0.75")
    assert not out.exists()
    # one patch per image: no ratio can work; the fix is the image size, not "a lower ratio"
    assert main(["pretrain", *SMALL, f"output_dir={out}", f"data.path={images}", "data.image_size=32",
                 "model.mask_ratio=0.1"]) == 2
    line = one_line(capsys.readouterr().err, "data.image_size=32 gives one 32x32 mask patch", "data.image_size >= 64")
    assert "lower ratio" not in line
    assert not out.exists()
    from fcmae.masking import num_visible
    with pytest.raises(ValueError, match="cannot be both masked and visible, whatever the mask ratio"):
        num_visible(1, 0.1)  # the library says the same to a direct caller
    # the advised bound is right: 0.75 works at 64 px
    assert load_config(PretrainConfig, None, SMALL + ["data.path=/x", "model.mask_ratio=0.75"]).model.mask_ratio == 0.75


def test_text_keys_take_override_text_and_yaml_files_get_a_hint(tmp_path, capsys):
    cfg = load_config(PretrainConfig, None, ["output_dir=2024", "data.path=no"])
    assert (cfg.output_dir, cfg.data.path) == ("2024", "no")
    assert load_config(PretrainConfig, None, ["output_dir=on", "data.path=1e3"]).output_dir == "on"
    assert load_config(PretrainConfig, None, ["data.path=/d", "model.mask_ratio=0.5"]).model.mask_ratio == 0.5
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: 2024\ndata:\n  path: no\n")
    assert main(["pretrain", "--config", str(path)]) == 2
    one_line(capsys.readouterr().err, "'output_dir' = 2024", "expected str", "quote it", 'output_dir: "..."')
    path.write_text("output_dir: runs/x\ndata:\n  path: no\n")
    with pytest.raises(ValueError, match="'data.path' = False .*read the unquoted value as bool.*path: \"...\""):
        load_config(PretrainConfig, path)


# --- issue 24: no traceback, nothing written before a refusal, no silent wrong run ---------------------------------

DEMO = ["--config", "pretrain/demo", "optim.epochs=1", "data.num_samples=64", "monitor.every_epochs=0",
        "log.progress=false"]
FT_DEMO = ["--config", "finetune/demo", "optim.epochs=1", "data.digits_per_class=4", "data.digits_val=20",
           "data.batch_size=8", "log.progress=false"]
NOT_NUMBERS = [  # (override, what the one line says)
    ("optim.lr=.inf", "'optim.lr' = inf is not a finite number"),
    ("optim.lr=.nan", "'optim.lr' = nan is not a finite number"),
    ("optim.weight_decay=.nan", "'optim.weight_decay' = nan is not a finite number"),
    ("optim.blr=-.inf", "'optim.blr' = -inf is not a finite number"),
    ("optim.min_lr=.inf", "'optim.min_lr' = inf is not a finite number"),
    ("optim.min_lr=0.1", "optim.min_lr=0.1 is above the peak lr"),
    ("optim.betas=[.nan,0.9]", "'optim.betas[0]' = nan is not a finite number"),
    ("data.std=[0]", "data.std=[0.0] must be > 0"),
    ("data.mean=[.inf]", "'data.mean[0]' = inf is not a finite number"),
]


def test_issue_command_with_an_infinite_lr_is_refused_subprocess(tmp_path):
    """The issue's command (it exited 0 with 151/153 tensors non-finite), and its --print-config."""
    out = tmp_path / "run"
    for extra in ([], ["--print-config"]):
        r = cli("pretrain", *DEMO, f"output_dir={out}", "optim.lr=.inf", *extra)
        assert r.returncode == 2 and r.stdout == ""
        one_line(r.stderr, "fcmae pretrain: error: config key 'optim.lr' = inf is not a finite number")
    assert not out.exists()


@pytest.mark.parametrize("override, words", NOT_NUMBERS)
def test_non_finite_or_impossible_numbers_refused_everywhere(tmp_path, capsys, monkeypatch, override, words):
    """pretrain, finetune, their --print-config and the Python API refuse them alike, before writing anything."""
    from fcmae import api

    out = tmp_path / "run"
    for argv, flags in ((["pretrain", *DEMO], []), (["pretrain", *DEMO], ["--print-config"]),
                        (["finetune", *FT_DEMO], []), (["finetune", *FT_DEMO], ["--print-config"])):
        assert main([*argv, f"output_dir={out}", override, *flags]) == 2, argv
        one_line(capsys.readouterr().err, f"fcmae {argv[0]}: error:", words)
    key, _, value = override.partition("=")
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        api.finetune("finetune/demo", {key: yaml.safe_load(value)}, output_dir=str(out))
    assert not out.exists()


@pytest.mark.parametrize("decay, ok", [(1.0, False), (-0.1, False), (1.5, False), (0.0, True), (0.999, True)])
def test_ema_decay_in_zero_one(tmp_path, decay, ok):
    from fcmae.finetune_config import FinetuneConfig

    overrides = [f"output_dir={tmp_path / 'run'}", f"ema.decay={decay}"]
    if ok:  # 0: the EMA is the model itself, a valid (if pointless) choice
        assert load_config(FinetuneConfig, find_config("finetune/demo"), overrides).ema.decay == decay
    else:
        with pytest.raises(ValueError, match=r"ema.decay must be in \[0, 1\)"):
            load_config(FinetuneConfig, find_config("finetune/demo"), overrides)


def nan_gradients_at(bad_step: int):
    """on_loss hook: at optimizer step `bad_step` the loss stays finite but every gradient becomes NaN, so the weights
    do after the step (what an infinite lr did): only a check of the weights can see it."""
    def hook(step, loss):
        if step == bad_step:
            loss.register_hook(lambda g: torch.full_like(g, float("nan")))
        return loss
    return hook


def test_non_finite_weights_are_never_saved_or_exported(tmp_path):
    """The last line of defence: weights are checked once an epoch, before evaluation and the epoch's checkpoint."""
    from fcmae.engine.loop import NonFiniteLossError
    from fcmae.finetune import finetune
    from fcmae.finetune_config import FinetuneConfig
    from fcmae.pretrain import pretrain

    out = tmp_path / "pre"  # 1 step per epoch: the NaN weights of step 2 are never followed by a loss
    cfg = load_config(PretrainConfig, find_config("pretrain/demo"), DEMO[2:] + [
        f"output_dir={out}", "optim.epochs=2", "log.vis_every_epochs=0"])
    with pytest.raises(NonFiniteLossError, match=r"weight tensors .* are NaN or inf after epoch 2, step 2; stopped "
                                                 r"before evaluating or saving them; .*last.pt \(step 1\) is kept"):
        pretrain(cfg, on_loss=nan_gradients_at(1))
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert last["step"] == 1 and all(t.isfinite().all() for t in last["model"].values() if t.is_floating_point())

    out = tmp_path / "ft"  # 40 digits / batch 8 = 5 steps, the last one poisoned: no best.pt, no export
    cfg = load_config(FinetuneConfig, find_config("finetune/demo"), FT_DEMO[2:] + [f"output_dir={out}"])
    with pytest.raises(NonFiniteLossError, match="after epoch 1, step 5"):
        finetune(cfg, on_loss=nan_gradients_at(4))
    assert sorted(os.listdir(out)) == [".fcmae-lock", "config-history.jsonl", "config.yaml", "metrics.jsonl"]


@pytest.fixture(scope="module")
def bad_yaml(tmp_path_factory):
    root = tmp_path_factory.mktemp("yaml")
    files = {"malformed.yaml": b"optim:\n  epochs: [1,\n", "list.yaml": b"- a\n- b\n",
             "latin1.yaml": "optim:\n  epochs: 1  # r\xe9sum\xe9\n".encode("latin-1")}
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize("name, words", [
    ("malformed.yaml", ["is not valid YAML", "line 3"]),
    ("list.yaml", ["must hold a mapping of keys", "got list"]),
    ("latin1.yaml", ["is not UTF-8 text (byte 0xe9", "save it as UTF-8"]),
])
def test_bad_config_files_one_line_for_every_command(bad_yaml, tmp_path, capsys, name, words):
    path = str(bad_yaml / name)
    ckpt = tmp_path / "never-read.pt"
    for argv in (["pretrain", "--config", path, "--print-config"], ["finetune", "--config", path, "--print-config"],
                 ["pretrain", "--config", path, "data.format=digits", f"output_dir={tmp_path / 'run'}"],
                 ["knn", str(ckpt), "--config", path], ["eval", str(ckpt), "--config", path]):
        assert main(argv) == 2, argv
        one_line(capsys.readouterr().err, f"fcmae {argv[0]}: error: config file '{path}'", *words)
    assert os.listdir(tmp_path) == []


def test_malformed_config_print_config_subprocess(bad_yaml):
    r = cli("finetune", "--config", str(bad_yaml / "malformed.yaml"), "--print-config")
    assert r.returncode == 2 and r.stdout == ""
    one_line(r.stderr, "fcmae finetune: error:", "malformed.yaml", "is not valid YAML")


def test_minkowski_backend_without_minkowskiengine(tmp_path, capsys):
    from convnextv2.backends.minkowski import import_minkowski
    try:
        import_minkowski()
        pytest.skip("MinkowskiEngine is installed here")
    except ImportError:
        pass
    out = tmp_path / "run"
    assert main(["pretrain", *DEMO, f"output_dir={out}", "model.backend=minkowski"]) == 2
    one_line(capsys.readouterr().err, "model.backend=minkowski", "make minkowski", "model.backend=packed")
    assert not out.exists()


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    """ImageFolders with train/ and val/: two classes; one class; every image corrupt."""
    from imagegen import write_broken

    root = tmp_path_factory.mktemp("labeled")
    for split, n in (("train", 3), ("val", 2)):
        make_imagefolder(str(root / "two" / split), classes=2, per_class=n, size=40)
        make_imagefolder(str(root / "one" / split), classes=1, per_class=n, size=40)
        for c in range(2):
            (root / "corrupt" / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                write_broken(str(root / "corrupt" / split / f"c{c}" / f"{i}.jpg"), "text")
    return root


FT_FOLDER = ["finetune", "device=cpu", "data.image_size=32", "data.batch_size=2", "data.num_workers=0",
             "optim.epochs=1", "optim.warmup_epochs=0", "aug.mixup=0", "aug.cutmix=0", "log.progress=false"]


def test_finetune_on_one_class_or_only_corrupt_images_is_refused(labeled, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*FT_FOLDER, f"data.path={labeled / 'one'}", f"output_dir={out}"]) == 2
    one_line(capsys.readouterr().err, "has 1 class folder (class_0)", "at least 2 classes")
    assert main([*FT_FOLDER, f"data.path={labeled / 'corrupt'}", f"output_dir={out}"]) == 2
    one_line(capsys.readouterr().err, f"'{labeled / 'corrupt' / 'train'}': none of the 6 image files could be decoded")
    assert not out.exists()
    assert main(["pretrain", *DEMO, f"output_dir={out}", "monitor.every_epochs=1",
                 "monitor.data.format=auto", f"monitor.data.path={labeled / 'one'}"]) == 2
    one_line(capsys.readouterr().err, "at least 2 classes")
    assert not out.exists()


@pytest.fixture(scope="module")
def digit_checkpoints(tmp_path_factory):
    """A pretraining checkpoint whose kNN monitor ran on the digits, and a fine-tuning one trained on them."""
    from fcmae.convert import fcmae_checkpoint
    from fcmae.export import FINETUNE_FORMAT
    from fcmae.finetune import build_classifier
    from fcmae.model import FCMAE

    root = tmp_path_factory.mktemp("ckpts")
    digits = {"format": "digits", "image_size": 32, "digits_per_class": 5, "digits_val": 40, "eval_batch_size": 16,
              "num_workers": 0}
    model = FCMAE("convnextv2_atto", decoder_dim=32)
    pre = {**fcmae_checkpoint(model, {"encoder_name": "convnextv2_atto", "decoder_dim": 32}),
           "config": {"monitor": {"every_epochs": 1, "data": digits}}}
    torch.save(pre, root / "pre.pt")
    clf = build_classifier("convnextv2_atto", 10)
    torch.save({"format": FINETUNE_FORMAT, "version": 1, "model": clf.state_dict(), "config": {"data": digits},
                "model_args": {"name": "convnextv2_atto", "num_classes": 10, "in_chans": 3, "patch_size": 32}},
               root / "ft.pt")
    return root


@pytest.mark.parametrize("name", ["pre.pt", "ft.pt"])
def test_knn_data_path_replaces_the_checkpoints_digits(digit_checkpoints, labeled, capsys, name):
    """data.path given: the checkpoint's dataset (the digits) is dropped, its preprocessing (32 px) kept."""
    from fcmae.cli import build_parser

    ckpt = str(digit_checkpoints / name)
    assert main(["knn", ckpt, "device=cpu", "data.path=/nonexistent"]) == 2
    one_line(capsys.readouterr().err, "'/nonexistent/train' is not an ImageFolder")
    args = build_parser().parse_args(["knn", ckpt, "device=cpu", f"data.path={labeled / 'two'}", "k=3"])
    result = args.func(args)
    assert (result["train_images"], result["val_images"]) == (6, 4)
    assert f"on {labeled / 'two' / 'train'}" in capsys.readouterr().out
    assert main(["knn", ckpt, "device=cpu", "k=51"]) == 2  # the checkpoint's digits: 5 x 10 reference images
    one_line(capsys.readouterr().err, "k=51 is more neighbours than the 50 reference (train) images")
    assert main(["knn", ckpt, "device=cpu", f"data.path={labeled / 'one'}", "k=3"]) == 2
    one_line(capsys.readouterr().err, "at least 2 classes")
    assert main(["knn", ckpt, "device=cpu", "data.format=digits", f"data.path={labeled / 'two'}"]) == 2
    one_line(capsys.readouterr().err, "data.format=digits reads the built-in digits, so data.path would be ignored")


def test_print_config_takes_output_dir_as_text_like_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--config", "pretrain/demo", "--print-config", "output_dir=2024"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["output_dir"] == ["'2024'", "runs/pretrain", "override"]
    assert os.listdir(tmp_path) == []


@pytest.fixture
def readonly_dir(tmp_path):
    """A read-only file system (a tmpfs mounted ro; needs root), unmounted afterwards."""
    ro = tmp_path / "ro"
    ro.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], check=True)


@pytest.fixture(scope="module")
def fcmae_file(tmp_path_factory):
    from fcmae.convert import fcmae_checkpoint
    from fcmae.model import FCMAE

    path = tmp_path_factory.mktemp("fcmae") / "fcmae.pt"
    model = FCMAE("convnextv2_atto", decoder_dim=32)
    torch.save(fcmae_checkpoint(model, {"encoder_name": "convnextv2_atto", "decoder_dim": 32}), path)
    return str(path)


def test_writing_onto_a_read_only_file_system(readonly_dir, fcmae_file, images, capsys):
    image = os.path.join(images, "class_0", "img_000.jpg")
    for argv, words in (
        (["convert", fcmae_file, str(readonly_dir / "m.safetensors")], ["DST", "its folder is not writable"]),
        (["convert", fcmae_file, str(readonly_dir / "sub" / "m.pt")], ["DST", "its folder is not writable"]),
        (["convert", fcmae_file, str(readonly_dir / "hf"), "--to", "hf"], ["DST=", "is not writable"]),
        (["shards", images, str(readonly_dir / "shards")], ["DST=", "read-only file system"]),
        (["visualize", fcmae_file, image, "--out", str(readonly_dir / "g.png")], ["--out", "is not writable"]),
        (["pretrain", *DEMO, f"output_dir={readonly_dir / 'run'}"], ["output_dir=", "is not writable"]),
    ):
        assert main(argv) == 2, argv
        one_line(capsys.readouterr().err, f"fcmae {argv[0]}: error:", *words)


def test_destinations_that_are_folders_or_cannot_be_made(fcmae_file, images, tmp_path, capsys):
    folder = tmp_path / "m.safetensors"
    folder.mkdir()
    assert main(["convert", fcmae_file, str(folder)]) == 2
    one_line(capsys.readouterr().err, "DST", "is a folder; give a file name, e.g.", "m.safetensors/model.safetensors")
    assert os.listdir(folder) == []
    # a folder os.access calls writable where nothing can be created: the write's own error, as one line (exit 1)
    image = os.path.join(images, "class_0", "img_000.jpg")
    for argv in (["convert", fcmae_file, "/proc/m.safetensors"], ["visualize", fcmae_file, image, "--out",
                                                                   "/proc/g.png"]):
        assert main(argv) == 1
        one_line(capsys.readouterr().err, f"fcmae {argv[0]}: error: cannot write /proc/", "No such file or directory")


def test_shards_of_no_readable_image_leave_no_destination(tmp_path, capsys):
    from imagegen import write_broken

    src = tmp_path / "src"
    src.mkdir()
    for i, kind in enumerate(("zero", "truncated", "text")):
        write_broken(str(src / f"{i}.jpg"), kind)
    dst = tmp_path / "dst"
    assert main(["shards", str(src), str(dst)]) == 2
    one_line(capsys.readouterr().err, "none of the 3 image files", "could be decoded")
    assert not dst.exists()
