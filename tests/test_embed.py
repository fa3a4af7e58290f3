"""`fcmae embed`: the rows are timm's forward_features + global average pool of each image, in the order of the file
list; unreadable files are left out and listed; bad input fails with one line before the model runs."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from conftest import randomize_grn
from convnextv2.encoder import create_convnextv2
from convnextv2.checkpoint import save_state_dict
from fcmae.cli import main
from imagegen import smooth_image, write_broken

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Nested folders, mixed sizes and formats, one corrupt file, one non-image file."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a").mkdir()
    smooth_image(rng, 70).save(root / "z.jpg", quality=95)
    smooth_image(rng, 50).resize((90, 50)).save(root / "a" / "wide.png")
    smooth_image(rng, 64).save(root / "a" / "img.jpg", quality=95)
    smooth_image(rng, 40).convert("L").save(root / "b" / "deep" / "grey.png")
    write_broken(str(root / "b" / "broken.jpg"), "truncated")
    (root / "b" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module", params=[32, 16], ids=["stem4", "stem2"])
def encoder(request, tmp_path_factory):
    """A random timm atto (the standard 4x4 stem, and a 2x2 stem: 16-px mask patches, total stride 16) saved as a
    timm file."""
    torch.manual_seed(0)
    model = randomize_grn(create_convnextv2("convnextv2_atto", request.param, num_classes=0)).eval()
    path = tmp_path_factory.mktemp("ckpt") / "atto.safetensors"
    save_state_dict(model.state_dict(), path)
    return model, str(path)


def patch_size(model) -> int:
    """The encoder's total stride: 8 x its stem stride (32 for the standard 4x4 stem)."""
    return 8 * model.stem[0].stride[0]


def oracle(model, path, size):
    """Independent of fcmae: PIL -> RGB, resize short side, center crop, ImageNet normalise, timm forward, mean."""
    tf = T.Compose([T.Resize(size, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                    T.Normalize(MEAN, STD)])
    x = tf(Image.open(path).convert("RGB"))[None]
    with torch.no_grad():
        return model.forward_features(x).mean(dim=(2, 3))[0]


def test_embed_rows_are_pooled_features_in_file_order(folder, encoder, tmp_path, capsys):
    model, ckpt = encoder
    size = 3 * patch_size(model)  # 96, or 48 with the 2x2 stem: a multiple of the checkpoint's patch, not of 32
    out = tmp_path / "out" / "emb.safetensors"  # the folder does not exist yet: created
    assert main(["embed", str(folder), "--checkpoint", ckpt, "--out", str(out), "--image-size", str(size),
                 "--batch-size", "2", "--num-workers", "0", "--device", "cpu", "--no-progress"]) == 0
    listing = json.loads((tmp_path / "out" / "emb.files.json").read_text())
    assert listing["files"] == ["z.jpg", "a/img.jpg", "a/wide.png", "b/deep/grey.png"]  # os.walk, sorted per folder
    assert listing["skipped"] == ["b/broken.jpg"] and listing["normalized"] is False and listing["dim"] == 320
    with safe_open(str(out), "pt") as f:
        emb = f.get_tensor("embeddings")
        assert f.metadata()["normalized"] == "false"
    assert emb.dtype == torch.float32 and emb.shape == (4, 320)
    for row, name in zip(emb, listing["files"]):
        want = oracle(model, folder / name, size)
        assert torch.allclose(row, want, atol=1e-5, rtol=1e-4), name
    assert "1 unreadable skipped" in capsys.readouterr().out
    assert [p for p in os.listdir(tmp_path / "out") if p.startswith(".")] == []  # no temp file left

    # --normalize and .npy: the same rows, L2-normalised
    npy = tmp_path / "emb.npy"
    assert main(["embed", str(folder), "--checkpoint", ckpt, "--out", str(npy), "--image-size", str(size),
                 "--num-workers", "0", "--device", "cpu", "--normalize", "--no-progress"]) == 0
    unit = torch.from_numpy(np.load(npy))
    assert torch.allclose(unit.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(unit, torch.nn.functional.normalize(emb, dim=1), atol=1e-6)
    assert json.loads((tmp_path / "emb.files.json").read_text())["normalized"] is True


def test_embed_with_workers_equals_in_process(folder, encoder, tmp_path):
    _, ckpt = encoder
    outs = []
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}.safetensors"
        assert main(["embed", str(folder), "--checkpoint", ckpt, "--out", str(out), "--image-size", "32",
                     "--batch-size", "3", "--num-workers", workers, "--device", "cpu", "--no-progress"]) == 0
        with safe_open(str(out), "pt") as f:
            outs.append(f.get_tensor("embeddings"))
    assert torch.equal(outs[0], outs[1])


def test_embed_errors_before_the_model_runs(folder, encoder, tmp_path, capsys, monkeypatch):
    model, ckpt = encoder
    import fcmae.commands.embed

    def never(*a, **k):
        raise AssertionError("the model ran")

    monkeypatch.setattr(fcmae.commands.embed, "embed_files", never)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "bad.pt").write_text("not a checkpoint")
    out = str(tmp_path / "e.safetensors")
    cases = [
        ([str(tmp_path / "missing"), "--checkpoint", ckpt, "--out", out], "does not exist"),
        ([str(tmp_path / "empty"), "--checkpoint", ckpt, "--out", out], "no image files under"),
        ([str(folder), "--checkpoint", str(tmp_path / "nope.pt"), "--out", out], "is not a file"),
        ([str(folder), "--checkpoint", str(tmp_path / "bad.pt"), "--out", out], "is not a checkpoint"),
        ([str(folder), "--checkpoint", ckpt, "--out", str(tmp_path / "e.txt")], "*.safetensors or *.npy"),
        ([str(folder), "--checkpoint", ckpt, "--out", str(tmp_path / "afile" / "e.npy")], "not a writable folder"),
        ([str(folder), "--checkpoint", ckpt, "--out", out, "--image-size", "50"],
         f"multiple of {patch_size(model)}, the checkpoint's patch size"),
    ]
    (tmp_path / "adir.npy").mkdir()
    cases.append(([str(folder), "--checkpoint", ckpt, "--out", str(tmp_path / "adir.npy")], "is a folder"))
    for argv, message in cases:
        assert main(["embed", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("fcmae embed: error: ") and message in err and err.count("\n") == 1, err
    assert not os.path.exists(out)
