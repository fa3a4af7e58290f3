"""Every command that writes, on a full disk or stopped by a signal (issue 28): one line naming the file and the
cause, exit 1 (130 / 143 for a signal), no traceback, and no partial output left (no half folder, no 0-byte picture,
no tars without sizes.json); what was there before stays as it was. A real tmpfs (root), real signals. Also: folder
walks through link loops, corrupt sizes.json and out-of-range options, refused in one line naming what is wrong."""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fcmae.cli import main
from fcmae.convert import fcmae_checkpoint
from fcmae.data.folder import imagefolder_samples, list_images
from fcmae.model import FCMAE
from test_bad_input import SMALL, cli, one_line
from test_stops import ENV, fill, tmpfs

NO_SPACE = "No space left on device"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """An FCMAE checkpoint (atto, 32-wide decoder) as `fcmae convert --to fcmae` writes it."""
    model_args = {"encoder_name": "convnextv2_atto", "in_chans": 3, "mask_ratio": 0.5, "decoder_dim": 32,
                  "decoder_depth": 1, "norm_pix_loss": True, "patch_size": 32}
    path = tmp_path_factory.mktemp("ckpt") / "fcmae.pt"
    torch.save(fcmae_checkpoint(FCMAE(**model_args), model_args), path)
    return str(path)


@pytest.fixture
def disk(tmp_path):
    with tmpfs(tmp_path / "disk", "1m") as path:
        yield path


def entries(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# --- a full disk -------------------------------------------------------------------------------------------------
def test_convert_hf_folder_onto_a_full_disk_subprocess(ckpt, tmp_path, capsys):
    """Room for model.safetensors, not for config.json: a from_pretrained folder is written whole or not at all, so
    an existing one keeps its files as they were."""
    assert main(["convert", ckpt, str(tmp_path / "probe"), "--to", "hf"]) == 0
    weights = (tmp_path / "probe" / "model.safetensors").stat().st_size
    with tmpfs(tmp_path / "disk", "32m") as disk:
        dst = disk / "hf"
        dst.mkdir()
        (dst / "config.json").write_text("{}")  # a folder from an earlier conversion
        fill(disk, leave=-(-weights // 4096) * 4096)
        r = cli("convert", ckpt, str(dst), "--to", "hf")
        assert r.returncode == 1
        one_line(r.stderr, f"fcmae convert: error: cannot write {dst / 'config.json'}: {NO_SPACE}")
        assert entries(disk) == ["ballast", "hf"] and entries(dst) == ["config.json"]
        assert (dst / "config.json").read_text() == "{}"


@pytest.mark.parametrize("to, name", [("backbone", "backbone"), ("timm", "w.safetensors"), ("fcmae", "f.pt"),
                                      ("hf", "hf.pth")])
def test_convert_onto_a_full_disk_leaves_nothing(ckpt, disk, capsys, to, name):
    """The torch writer too (--to fcmae, .pth): its 'unexpected pos' error is reported as the full disk it is."""
    assert main(["convert", ckpt, str(disk / name), "--to", to]) == 1
    one_line(capsys.readouterr().err, "fcmae convert: error: cannot write ", str(disk / name), NO_SPACE)
    assert entries(disk) == []


def test_shards_onto_a_full_disk_leave_no_tar_subprocess(folder, tmp_path):
    """Room for a couple of tars, not all six: the ones written are removed, DST (created by the run) too."""
    with tmpfs(tmp_path / "small", "40k") as small:
        r = cli("shards", folder, str(small / "dst"), "--shard-size", "4")
        assert r.returncode == 1
        one_line(r.stderr, "fcmae shards: error: cannot write ", str(small / "dst" / "shard-0000"), NO_SPACE)
        assert entries(small) == []


def test_embed_and_visualize_onto_a_full_disk(ckpt, folder, disk, capsys):
    fill(disk)
    assert main(["embed", folder, "--checkpoint", ckpt, "--out", str(disk / "emb.safetensors"), "--image-size", "64",
                 "--num-workers", "0", "--no-progress"]) == 1
    one_line(capsys.readouterr().err, "fcmae embed: error: cannot write ", str(disk), NO_SPACE)
    image = os.path.join(folder, "class_0", "img_000.jpg")
    assert main(["visualize", ckpt, image, "--size", "64", "--out", str(disk / "grid.png")]) == 1
    one_line(capsys.readouterr().err, f"fcmae visualize: error: cannot write {disk / 'grid.png'}: {NO_SPACE}")
    assert entries(disk) == ["ballast"]  # no 0-byte picture, no embeddings without their file list


# --- a signal outside training -----------------------------------------------------------------------------------
def test_sigterm_while_packing_shards_leaves_no_tar_subprocess(folder, tmp_path):
    """A real SIGTERM to the process when the 10th image is read (3 tars begun): exit 143, one line, no DST."""
    dst = tmp_path / "dst"
    code = ("import os, signal, sys; import fcmae.data.write_shards as w; real, n = w.prepare_image, []\n"
            "def prepare(*a, **k):\n"
            "    n.append(1)\n"
            "    if len(n) == 10: os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return real(*a, **k)\n"
            "w.prepare_image = prepare\n"
            "from fcmae.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "shards", folder, str(dst), "--shard-size", "4"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 143
    one_line(r.stderr, "fcmae shards: interrupted (SIGTERM) before it finished")
    assert not dst.exists()


def test_ctrl_c_while_writing_an_hf_folder_leaves_none(ckpt, tmp_path, capsys, monkeypatch):
    """Ctrl-C after model.safetensors and before config.json: the temp folder goes, DST never appears."""
    from convnextv2.checkpoint import convert

    real = convert.write_json

    def interrupted(path, data):
        os.kill(os.getpid(), signal.SIGINT)
        real(path, data)

    monkeypatch.setattr(convert, "write_json", interrupted)
    assert main(["convert", ckpt, str(tmp_path / "hf"), "--to", "hf"]) == 130
    one_line(capsys.readouterr().err, "fcmae convert: interrupted (SIGINT) before it finished")
    assert entries(tmp_path) == []


# --- folder walks ------------------------------------------------------------------------------------------------
def test_link_loops_count_every_image_once_subprocess(folder, tmp_path):
    """`loop -> .`, a class reached twice, a link to a file listed from its own folder: 24 images, as without them;
    one warning line per loop, naming it."""
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    (data / "class_0" / "loop").symlink_to(".")  # a loop
    (data / "class_1" / "again").symlink_to("../class_0")  # class_0 a second time, from class_1
    (data / "class_1" / "same.jpg").symlink_to(data / "class_1" / "img_000.jpg")  # one file twice
    files, labels, classes = imagefolder_samples(str(data))
    want, want_labels, _ = imagefolder_samples(folder)
    assert [os.path.relpath(f, data) for f in files] == [os.path.relpath(f, folder) for f in want]
    assert labels == want_labels and classes == ["class_0", "class_1"]
    flat = list_images(str(data))
    assert len(flat) == len({os.path.realpath(f) for f in flat}) == 24
    r = cli("shards", str(data), str(tmp_path / "shards"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("wrote 24 images in 1 shards")
    warnings = r.stderr.strip().splitlines()
    assert len(warnings) == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"{data / 'class_0' / 'loop'} leads back to {data / 'class_0'}" in warnings[0]
    assert f"{data / 'class_1' / 'again'} leads back to {data / 'class_0'}" in warnings[1]


def test_class_folder_linking_to_the_root_is_left_out(folder, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    (data / "all").symlink_to(".")
    files, labels, classes = imagefolder_samples(str(data))
    assert classes == ["class_0", "class_1"] and len(files) == 24
    assert f"class folder {data / 'all'} leads back to {data}" in caplog.text


# --- messages ----------------------------------------------------------------------------------------------------
def test_corrupt_sizes_json_names_the_file(folder, tmp_path, capsys):
    from fcmae.data.write_shards import write_shards

    shards = tmp_path / "shards"
    write_shards(folder, str(shards), shard_size=8)
    out = tmp_path / "run"
    for text, words in (("{'shard-000000.tar': 8", "is not readable JSON"),
                        ('{"shard-000000.tar": "eight"}', "must map each shard file name to its sample count")):
        (shards / "sizes.json").write_text(text)
        assert main(["pretrain", *SMALL, f"output_dir={out}", f"data.path={shards}"]) == 2
        one_line(capsys.readouterr().err, f"fcmae pretrain: error: {shards / 'sizes.json'} ", words,
                 "or set data.num_samples")
        assert not out.exists()


def test_visualize_size_0_refused_subprocess(ckpt, folder, tmp_path):
    out = tmp_path / "grid.png"
    r = cli("visualize", ckpt, os.path.join(folder, "class_0", "img_000.jpg"), "--size", "0", "--out", str(out))
    assert r.returncode == 2
    one_line(r.stderr, "fcmae visualize: error: --size must be >= 1, got 0")
    assert not out.exists()


@pytest.mark.parametrize("argv, words", [
    (["visualize", "CKPT", "IMG", "--size", "-32"], "--size must be >= 1, got -32"),
    (["visualize", "CKPT", "IMG", "--mask-ratio", "1"], "--mask-ratio must be in (0, 1), got 1.0"),
    (["visualize", "CKPT", "IMG", "--seed", "-1"], "--seed must be in [0, 2**63)"),
    (["convert", "missing.pt", "OUT/x.pt", "--to", "fcmae", "--decoder-dim", "0"], "--decoder-dim must be >= 1, got 0"),
    (["convert", "missing.pt", "OUT/x.pt", "--to", "fcmae", "--decoder-depth", "-1"], "--decoder-depth must be >= 0"),
    (["embed", "DATA", "--checkpoint", "CKPT", "--out", "OUT/e.npy", "--batch-size", "0"], "--batch-size >= 1"),
    (["embed", "DATA", "--checkpoint", "CKPT", "--out", "OUT/e.npy", "--num-workers", "-1"], "--num-workers >= 0"),
    (["shards", "DATA", "OUT/s", "--shard-size", "0"], "--shard-size must be >= 1, got 0"),
    (["shards", "DATA", "OUT/s", "--seed", "-5"], "--seed must be in [0, 2**63)"),
    (["bench", "--threads", "-1"], "--threads must be >= 0, got -1"),
    (["bench", "--decoder-dim", "0"], "--decoder-dim must be >= 1, got 0"),
    (["bench", "--mask-ratio", "nan"], "--mask-ratio must be in (0, 1), got nan"),
    (["demo", "--pretrain-epochs", "0", "--out", "OUT/demo"], "--pretrain-epochs must be >= 1, got 0"),
    (["demo", "--finetune-epochs", "-2", "--out", "OUT/demo"], "--finetune-epochs must be >= 1, got -2"),
])
def test_out_of_range_options_refused(ckpt, folder, tmp_path, capsys, argv, words):
    image = os.path.join(folder, "class_0", "img_000.jpg")
    swap = {"CKPT": ckpt, "IMG": image, "DATA": folder}
    argv = [swap.get(a, a.replace("OUT", str(tmp_path / "out"))) for a in argv]
    assert main(argv) == 2
    one_line(capsys.readouterr().err, f"fcmae {argv[0]}: error: ", words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("meta, words", [
    ("{'input_size': ", "is not a timm config (Expecting property name"),
    ('{"architecture": "convnextv2_atto"}', "no pretrained_cfg"),
    ('{"architecture": "convnextv2_atto", "num_classes": 2, "pretrained_cfg": {"input_size": "big"}}',
     "its pretrained_cfg is not timm's"),
])
def test_corrupt_export_metadata_names_the_file(ckpt, tmp_path, capsys, meta, words):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "w.safetensors"
    assert main(["convert", ckpt, str(path), "--num-classes", "2"]) == 0
    save_file(load_file(path), path, metadata={"timm_config": meta})
    capsys.readouterr()
    assert main(["eval", str(path), "data.format=digits", "device=cpu"]) == 2
    one_line(capsys.readouterr().err, "fcmae eval: error: ", "w.safetensors", words)
