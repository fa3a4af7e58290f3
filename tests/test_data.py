"""Data: robust decoding of odd/corrupt images, transforms for any in_chans, sampler split, webdataset shards."""
import numpy as np
import pytest
import torch

from fcmae.data.build import SkipSampler
from fcmae.data.decode import decode_image
from fcmae.data.folder import ImageFiles
from fcmae.data.shards import ShardImages, count_samples, expand_shards
from fcmae.data.transforms import IMAGENET_MEAN, default_stats, eval_transform, train_transform
from fcmae.data.write_shards import write_shards
from imagegen import make_imagefolder, write_broken, write_odd


@pytest.mark.parametrize("kind", ["zero", "truncated", "text"])
def test_unreadable_images_give_none(tmp_path, kind):
    path = tmp_path / "bad.jpg"
    write_broken(str(path), kind)
    assert decode_image(str(path)) is None
    assert decode_image(path.read_bytes()) is None


@pytest.mark.parametrize("mode, tol", [("CMYK", 12), ("P", 24), ("RGBA", 1), ("I;16", 1)])
def test_odd_modes_are_converted(tmp_path, mode, tol):
    path = tmp_path / f"odd.{'jpg' if mode == 'CMYK' else 'png'}"
    rgb = write_odd(str(path), mode)
    img = decode_image(str(path), in_chans=3)
    assert img.mode == "RGB" and img.size == rgb.size
    want = np.asarray(rgb.convert("L") if mode == "I;16" else rgb, dtype=np.float64)
    got = np.asarray(img.convert("L") if mode == "I;16" else img, dtype=np.float64)
    assert np.abs(got - want).mean() < tol  # 16-bit is scaled, not saturated to white
    grey = decode_image(str(path), in_chans=1)
    assert grey.mode == "L"


@pytest.mark.parametrize("in_chans", [1, 3, 4, 5])
def test_transforms_any_in_chans(tmp_path, in_chans):
    write_odd(str(tmp_path / "a.png"), "RGBA")
    img = decode_image(str(tmp_path / "a.png"), in_chans)
    x = train_transform(64, in_chans)(img)
    assert x.shape == (in_chans, 64, 64)
    mean, std = default_stats(in_chans)
    raw = eval_transform(64, in_chans, [0.0] * in_chans, [1.0] * in_chans)(img)
    y = eval_transform(64, in_chans)(img)
    torch.testing.assert_close(y, (raw - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1))
    if in_chans == 3:
        assert mean == list(IMAGENET_MEAN)


def test_unreadable_files_are_replaced_and_counted(tmp_path):
    files = make_imagefolder(str(tmp_path), classes=1, per_class=4)
    write_broken(files[1], "truncated")
    ds = ImageFiles(files, train_transform(64, 3), 3)
    x, _, failures = ds[1]
    assert failures == 1 and x.shape == (3, 64, 64)
    assert [ds[i][2] for i in range(4)] == [0, 1, 0, 0]
    for f in files:
        write_broken(f, "zero")
    with pytest.raises(ValueError, match="none of the 4 image files could be decoded"):
        ImageFiles(files, train_transform(64, 3), 3).check_readable()


def test_augmentation_depends_only_on_seed_epoch_index(tmp_path):
    files = make_imagefolder(str(tmp_path), classes=1, per_class=3)
    ds = ImageFiles(files, train_transform(64, 3), 3, seed=5)
    a = ds[2][0]
    torch.manual_seed(123)
    ds[0]
    assert torch.equal(ds[2][0], a)  # global RNG state and call order do not matter
    ds.set_epoch(1)
    assert not torch.equal(ds[2][0], a)


def test_sampler_union_is_the_same_for_any_world_size():
    data = list(range(40))
    one = list(SkipSampler(data, 1, 0, seed=3))
    two = [list(SkipSampler(data, 2, r, seed=3)) for r in range(2)]
    b = 4  # per-process micro-batch; one process uses 2*b
    for i in range(len(one) // (2 * b)):
        union = sorted(two[0][i * b:(i + 1) * b] + two[1][i * b:(i + 1) * b])
        assert union == sorted(one[i * 2 * b:(i + 1) * 2 * b])
    assert list(SkipSampler(data, 2, 1, seed=3, skip=6)) == two[1][6:]


def test_shards_roundtrip_and_skip(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "shards"
    make_imagefolder(str(src), classes=2, per_class=5)
    write_broken(str(src / "class_0" / "img_002.jpg"), "zero")
    write_broken(str(src / "class_1" / "img_004.jpg"), "truncated")
    skipped = []
    sizes = write_shards(str(src), str(dst), shard_size=4, skipped=skipped)
    assert sizes == {"shard-000000.tar": 4, "shard-000001.tar": 4}  # the unreadable two are left out, and named
    assert sorted(skipped) == [str(src / "class_0" / "img_002.jpg"), str(src / "class_1" / "img_004.jpg")]
    urls = expand_shards(str(dst / "shard-{000000..000001}.tar"))
    assert urls == expand_shards(str(dst)) and count_samples(urls) == 8
    ds = ShardImages(urls, train_transform(64, 3), 3, batch=3, seed=0, shuffle_buffer=4)
    it = iter(ds)
    batches = [next(it) for _ in range(4)]  # 12 sample slots from an endless stream
    assert all(b[0].shape == (3, 3, 64, 64) and b[0].dtype == torch.uint8 for b in batches)
    assert sum(int(b[2].sum()) for b in batches) == 0
    ds.set_epoch(0, skip_batches=2)
    assert torch.equal(next(iter(ds))[0], batches[2][0])  # a resumed epoch continues where it stopped
    with pytest.raises(ValueError, match="no webdataset shards"):
        expand_shards(str(tmp_path / "nothing-{0..3}.tar"))
