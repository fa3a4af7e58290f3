import pytest
import torch

from fcmae.masking import num_visible, patchify, random_mask, unpatchify


def test_visible_count_matches_spec():
    assert num_visible(49, 0.6) == 19  # docs/method.md: 224 px, ratio 0.6 -> 19 visible, 30 masked
    mask = random_mask(16, (7, 7), 0.6)
    assert mask.shape == (16, 7, 7)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert (mask.flatten(1).sum(1) == 30).all()  # 1 = masked


def test_masks_differ_per_sample_and_non_square():
    mask = random_mask(8, (2, 3), 0.6)
    assert ((1 - mask).flatten(1).sum(1) == 2).all()  # int(6 * 0.4) visible
    assert len({tuple(m.flatten().tolist()) for m in mask}) > 1


def test_mask_positions_are_uniform():
    counts = random_mask(4000, (2, 2), 0.5).sum(0) / 4000
    assert torch.allclose(counts, torch.full((2, 2), 0.5), atol=0.04)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        random_mask(1, (7, 7), ratio)


def test_ratio_leaving_nothing_visible():
    with pytest.raises(ValueError, match="no visible patch"):
        random_mask(1, (1, 2), 0.9)


@pytest.mark.parametrize("in_chans", [1, 3, 4])
def test_patchify_round_trip(in_chans):
    imgs = torch.randn(2, in_chans, 64, 96)
    patches = patchify(imgs, 32)
    assert patches.shape == (2, 6, 32 * 32 * in_chans)
    assert torch.equal(unpatchify(patches, 32, (2, 3)), imgs)


def test_patchify_vector_order():
    # Patch 1 (row 0, col 1); vector order (row-in-patch, col-in-patch, channel).
    imgs = torch.randn(1, 3, 64, 96)
    patches = patchify(imgs, 32)
    r, c, ch = 5, 7, 2
    assert patches[0, 1, (r * 32 + c) * 3 + ch] == imgs[0, ch, r, 32 + c]
    assert patches[0, 4, (r * 32 + c) * 3 + ch] == imgs[0, ch, 32 + r, 32 + c]
