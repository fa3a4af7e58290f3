"""The fast input pipeline: crop-first (reduced-scale JPEG) decoding, uint8 batches normalised on the device, and
`fcmae shards` (unreadable images, non-empty destinations, --max-size)."""
import io
import logging
import os

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image, JpegImagePlugin
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from fcmae.cli import main
from fcmae.data import crop_decode
from fcmae.data.crop_decode import CropDecode, CropDecodeThen, decode_crop, dct_scale
from fcmae.data.device import to_device
from fcmae.data.folder import ImageFiles
from fcmae.data.shards import ShardImages, expand_shards
from fcmae.data.transforms import IMAGENET_MEAN, IMAGENET_STD, plain_train_transform, seeded_call, train_transform
from fcmae.data.write_shards import write_shards
from imagegen import make_imagefolder, smooth_image, write_broken, write_odd

MEAN, STD = list(IMAGENET_MEAN), list(IMAGENET_STD)


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth colours plus mild texture: a JPEG-like photo whose detail survives a reduced-scale decode."""
    rng = np.random.default_rng(seed)
    base = np.asarray(Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC))
    arr = base.astype(np.int16) + rng.integers(-8, 8, (h, w, 3), dtype=np.int16)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def jpeg_bytes(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance between the empirical distributions of a and b."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def test_crop_boxes_follow_random_resized_crop():
    """Boxes the crop-first decoder uses (drawn from the JPEG header, before the reduced decode) against torchvision's
    own RandomResizedCrop sampler: scale and log-aspect distributions agree, and the box is within the image."""
    data = jpeg_bytes(photo(320, 240))
    tf = CropDecode(32, 3, min_scale=0.2)
    n = 3000
    ours = np.array([seeded_call(lambda d: decode_crop(d, 3, tf.box, (32, 32))[1], data, seed) for seed in range(n)])
    torch.manual_seed(12345)  # torchvision's sampler on its own stream
    ref = np.array([T.RandomResizedCrop.get_params(torch.empty(3, 240, 320), (0.2, 1.0), (3 / 4, 4 / 3))
                    for _ in range(n)])
    for boxes in (ours, ref):
        top, left, h, w = boxes.T
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= 240).all() and (left + w <= 320).all()
    scale = lambda b: b[:, 2] * b[:, 3] / (320 * 240)  # noqa: E731
    log_ratio = lambda b: np.log(b[:, 3] / b[:, 2])  # noqa: E731
    assert scale(ours).min() >= 0.19 and scale(ours).max() <= 1.0
    # KS critical value for n = m = 3000 at alpha = 0.001 is 1.95 * sqrt(2 / 3000) = 0.050
    assert ks_statistic(scale(ours), scale(ref)) < 0.05
    assert ks_statistic(log_ratio(ours), log_ratio(ref)) < 0.05
    # and the very same boxes as the plain pipeline's RandomResizedCrop for the same per-sample seed
    full = Image.open(io.BytesIO(data)).convert("RGB")
    for seed in range(20):
        plain = seeded_call(lambda im: T.RandomResizedCrop.get_params(im, (0.2, 1.0), (3 / 4, 4 / 3)), full, seed)
        assert tuple(ours[seed]) == tuple(plain)


def test_dct_scale_keeps_the_crop_at_output_resolution():
    assert dct_scale(223, 500, 224, 224) == 1
    assert dct_scale(448, 448, 224, 224) == 2
    assert dct_scale(1000, 1500, 224, 224) == 4
    assert dct_scale(1792, 1792, 224, 224) == 8
    assert dct_scale(5000, 5000, 224, 224) == 8


@pytest.mark.parametrize("decoder", ["simplejpeg", "pil"])
def test_reduced_decode_equals_plain_path_up_to_resampling(monkeypatch, decoder):
    """A fixed box of an 800x600 JPEG at 64 px: decoded at 1/4 scale (checked, by simplejpeg or by PIL's draft),
    the result equals full decode + crop + PIL bicubic resize up to resampling error; with fast=False up to one grey
    level (torch's vs PIL's filter)."""
    img = photo(800, 600)
    data = jpeg_bytes(img)
    box = (40, 100, 480, 560)  # top, left, h, w: 480 / 64 = 7.5 -> 1/4 is the smallest scale keeping >= 64 px
    full = Image.open(io.BytesIO(data)).convert("RGB")
    ref = np.asarray(full.crop((100, 40, 660, 520)).resize((64, 64), Image.BICUBIC), dtype=np.float64)
    decoded = []  # (decoder, size of the decoded image)
    real_draft, real_turbo = JpegImagePlugin.JpegImageFile.draft, crop_decode.turbo_decode

    def draft(self, mode, size):
        out = real_draft(self, mode, size)
        decoded.append(("pil", self.size))
        return out

    def turbo(data, mode, s, size):
        x = real_turbo(data, mode, s, size) if decoder == "simplejpeg" else None
        if x is not None:
            decoded.append(("simplejpeg", tuple(x.shape[:0:-1])))
        return x

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)
    monkeypatch.setattr(crop_decode, "turbo_decode", turbo)
    fast, got_box = decode_crop(data, 3, lambda im: box, (64, 64))
    assert decoded == [(decoder, (200, 150))] and got_box == box  # decoded at 1/4 scale
    exact, _ = decode_crop(data, 3, lambda im: box, (64, 64), fast=False)
    assert len(decoded) == 1 and fast.shape == exact.shape == (3, 64, 64) and fast.dtype == torch.uint8
    err = np.abs(fast.permute(1, 2, 0).numpy() - ref)
    assert err.mean() < 2.5 and np.percentile(err, 99) < 12, (err.mean(), np.percentile(err, 99))
    assert np.abs(exact.permute(1, 2, 0).numpy() - ref).max() <= 1
    # grey models: libjpeg decodes only the luma plane at reduced scale
    grey, _ = decode_crop(data, 1, lambda im: box, (64, 64))
    ref_grey = np.asarray(full.convert("L").crop((100, 40, 660, 520)).resize((64, 64), Image.BICUBIC), np.float64)
    assert grey.shape == (1, 64, 64) and np.abs(grey[0].numpy() - ref_grey).mean() < 2.5


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_new_pipeline_equals_plain_pipeline_sample_for_sample(tmp_path, ext):
    """Same seed -> same crop and flip as the float CPU pipeline; uint8 + device normalisation gives its values up to
    the resize filters' rounding (2 grey levels where it upsamples)."""
    files = []
    for i in range(6):
        files.append(str(tmp_path / f"{i}.{ext}"))
        smooth_image(np.random.default_rng(i), 96).save(files[-1], quality=95)
    new = ImageFiles(files, train_transform(64, 3), 3, seed=7)
    old = ImageFiles(files, plain_train_transform(64, 3), 3, seed=7)
    for epoch in (0, 1):
        new.set_epoch(epoch)
        old.set_epoch(epoch)
        x = torch.stack([new[i][0] for i in range(6)])
        y = torch.stack([old[i][0] for i in range(6)])
        assert x.dtype == torch.uint8 and x.shape == (6, 3, 64, 64)
        z = to_device(x, torch.device("cpu"), MEAN, STD)
        assert (z - y).abs().max() <= 2.01 / 255 / min(STD) and (z - y).abs().mean() < 0.2 / 255 / min(STD)


def test_to_device_is_totensor_and_normalize():
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    ref = torch.stack([TF.normalize(TF.to_tensor(TF.to_pil_image(im)), MEAN, STD) for im in x])
    assert torch.equal(to_device(x, torch.device("cpu"), MEAN, STD), ref)
    out = to_device(x, torch.device("cpu"), MEAN, STD, channels_last=True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(to_device(ref, torch.device("cpu"), MEAN, STD), ref)  # float batches are only moved


@pytest.mark.parametrize("mode, tol", [("CMYK", 12), ("P", 24), ("RGBA", 1), ("I;16", 1), ("L", 1)])
def test_odd_modes_through_crop_decode(tmp_path, mode, tol):
    path = tmp_path / f"odd.{'jpg' if mode in ('CMYK', 'L') else 'png'}"
    if mode == "L":
        rgb = smooth_image(np.random.default_rng(0))
        rgb.convert("L").save(path, quality=95)
    else:
        rgb = write_odd(str(path), mode)
    for in_chans in (1, 3, 5):
        x = seeded_call(CropDecode(32, in_chans, min_scale=1.0, hflip=0.0), str(path), 0)  # the whole image
        assert x.shape == (in_chans, 32, 32) and x.dtype == torch.uint8
        want = rgb.convert("L") if in_chans != 3 or mode in ("I;16", "L") else rgb
        want = np.asarray(want.resize((32, 32), Image.BICUBIC), dtype=np.float64)
        got = x[0].numpy() if in_chans != 3 else x.permute(1, 2, 0).numpy()
        if in_chans == 3 and mode in ("I;16", "L"):
            got = x[0].numpy()  # grey replicated
        assert np.abs(got - want).mean() < tol + 1


@pytest.mark.parametrize("kind", ["zero", "truncated", "text"])
def test_unreadable_images_give_none_through_crop_decode(tmp_path, kind, caplog):
    path = tmp_path / "bad.jpg"
    write_broken(str(path), kind)
    tf = CropDecode(32, 3)
    with caplog.at_level(logging.WARNING):
        assert seeded_call(tf, str(path), 0) is None
        assert seeded_call(lambda d: tf(d, name="shard-7.tar:000000042"), path.read_bytes(), 0) is None
    assert str(path) in caplog.text and "shard-7.tar:000000042" in caplog.text


def test_finetune_crop_first_keeps_timm_draws(tmp_path):
    """CropDecodeThen (timm's RandomResizedCrop from the encoded file) gives timm's own output for the same seed,
    up to the resize filters' rounding (a few grey levels where a small crop is upsampled)."""
    from types import SimpleNamespace

    from fcmae.data.labeled import PythonSeeded, create_transform, train_transform as ft_transform

    cfg = SimpleNamespace(image_size=48, min_scale=0.08, hflip=0.5, auto_augment=None, reprob=0.0, fast_decode=True)
    tf = ft_transform(cfg, MEAN, STD, 3)
    assert isinstance(tf.transform, CropDecodeThen)
    ref = PythonSeeded(create_transform(48, is_training=True, scale=(0.08, 1.0), hflip=0.5, auto_augment=None,
                                        interpolation="bicubic", re_prob=0.0, mean=MEAN, std=STD))
    path = str(tmp_path / "a.png")
    smooth_image(np.random.default_rng(3), 120).save(path)
    img = Image.open(path).convert("RGB")
    for seed in range(8):
        a, b = seeded_call(tf, path, seed), seeded_call(ref, img, seed)
        assert a.shape == b.shape == (3, 48, 48) and (a - b).abs().max() <= 4.01 / 255 / min(STD)
        assert (a - b).abs().mean() < 0.3 / 255 / min(STD)


# --- fcmae shards --------------------------------------------------------------------------------------------------

def test_shards_refuse_a_non_empty_destination_and_overwrite_cleans(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "shards"
    make_imagefolder(str(src), classes=2, per_class=5)
    assert main(["shards", str(src), str(dst), "--shard-size", "3"]) == 0
    before = sorted(os.listdir(dst))
    assert before == [f"shard-00000{i}.tar" for i in range(4)] + ["sizes.json"]
    mtimes = {f: os.path.getmtime(dst / f) for f in before}
    assert main(["shards", str(src), str(dst), "--shard-size", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fcmae shards: error: DST") and "--overwrite" in err[0]
    assert {f: os.path.getmtime(dst / f) for f in os.listdir(dst)} == mtimes  # nothing written
    assert main(["shards", str(src), str(dst), "--shard-size", "8", "--overwrite"]) == 0
    assert sorted(os.listdir(dst)) == ["shard-000000.tar", "shard-000001.tar", "sizes.json"]  # no stale shards
    assert len(expand_shards(str(dst))) == 2


def test_shards_skip_and_count_unreadable_images(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "shards"
    make_imagefolder(str(src), classes=1, per_class=4)
    write_broken(str(src / "class_0" / "img_001.jpg"), "zero")
    write_broken(str(src / "class_0" / "img_003.jpg"), "text")
    assert main(["shards", str(src), str(dst), "--no-shuffle"]) == 0
    out = capsys.readouterr().out
    assert "wrote 2 images in 1 shards" in out and "skipped 2 unreadable" in out and "img_001.jpg" in out
    keys = [s["__key__"] for s in wds.WebDataset(str(dst / "shard-000000.tar"), shardshuffle=False)]
    assert keys == ["000000000", "000000001"]
    for f in src.glob("class_0/*.jpg"):
        write_broken(str(f), "zero")
    assert main(["shards", str(src), str(tmp_path / "empty")]) == 2
    assert "none of the 4 image files" in capsys.readouterr().err
    assert not list((tmp_path / "empty").glob("*.tar"))


def test_shards_max_size_reencodes_large_images(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "shards"
    src.mkdir()
    photo(300, 200).save(src / "a_big.jpg", quality=95)
    photo(60, 50).save(src / "b_small.jpg", quality=95)
    rgba = smooth_image(np.random.default_rng(1), 200).convert("RGBA")
    rgba.save(src / "c_rgba.png")
    write_shards(str(src), str(dst), shuffle=False, max_size=64)
    samples = list(wds.WebDataset(str(dst / "shard-000000.tar"), shardshuffle=False))
    assert [sorted(k for k in s if not k.startswith("__")) for s in samples] == [["jpg"], ["jpg"], ["png"]]
    big, small, png = (Image.open(io.BytesIO(s[e])) for s, e in zip(samples, ("jpg", "jpg", "png")))
    assert big.size == (96, 64) and png.size == (64, 64) and png.mode == "RGBA"
    assert samples[1]["jpg"] == (src / "b_small.jpg").read_bytes()  # small enough: stored as it was
    want = np.asarray(Image.open(src / "a_big.jpg").convert("RGB").resize((96, 64), Image.BICUBIC), np.float64)
    assert np.abs(np.asarray(big.convert("RGB"), np.float64) - want).mean() < 4


def test_corrupt_image_in_shards_names_shard_and_key(tmp_path, caplog):
    path = str(tmp_path / "part-000.tar")
    good = jpeg_bytes(photo(80, 80))
    with wds.TarWriter(path) as sink:
        for i in range(4):
            sink.write({"__key__": f"k{i}", "jpg": good[: len(good) // 3] if i == 2 else good})
    ds = ShardImages([path], train_transform(32, 3), 3, batch=3, seed=0, shuffle_buffer=1)
    with caplog.at_level(logging.WARNING):
        x, _, failures = next(iter(ds))
    assert x.shape == (3, 3, 32, 32) and int(failures.sum()) == 1
    assert f"{path}:k2" in caplog.text
