"""Every backend at mask patch 16 and 8 (stem stride 2 / 1): equal to the dense timm network with nothing masked,
equal to `masked` (features, FCMAE loss, predictions, every gradient) in fp32, and the loss is docs/method.md's formula."""
import copy

import pytest
import torch

from conftest import assert_grads_match, randomize_grn, rel_err
from convnextv2 import SparseEncoder, create_encoder, encoder_patch_size
from fcmae import FCMAE
from fcmae.masking import random_mask
from test_fcmae import reference_loss

SMALL_TINY = dict(depths=(1, 1, 2, 1), dims=(32, 64, 96, 128))  # the nn.Linear-MLP flavour, made small
# (patch size, image size H x W, batch, model kwargs)
CASES = {
    "p16-64x64": (16, (64, 64), 2, {}),
    "p16-48x80": (16, (48, 80), 2, {}),
    "p8-64x64": (8, (64, 64), 2, {}),
    "p8-32x32": (8, (32, 32), 3, {}),
    "p16-tiny-structured-64x32": (16, (64, 32), 2, SMALL_TINY),
}


def model_name(kwargs):
    return "convnextv2_tiny" if kwargs else "convnextv2_atto"


@pytest.mark.parametrize("patch", [16, 8])
def test_encoder_layout(patch):
    """Stem k x k / k with k = patch / 8 and no stage-0 downsample: total stride = patch, every stage at /2."""
    enc = create_encoder("convnextv2_atto", patch_size=patch)
    k = patch // 8
    assert enc.stem[0].kernel_size == enc.stem[0].stride == (k, k)
    assert isinstance(enc.stages[0].downsample, torch.nn.Identity)
    assert encoder_patch_size(enc) == patch == enc.feature_info[-1]["reduction"]
    assert enc.forward_features(torch.zeros(1, 3, 64, 64)).shape == (1, 320, 64 // patch, 64 // patch)


@pytest.mark.parametrize("case", sorted(CASES))
def test_all_visible_equals_dense_timm(case, backend):
    """With nothing masked, sparse running is dense running: the oracle is timm's own forward_features."""
    patch, size, batch, kwargs = CASES[case]
    enc = randomize_grn(create_encoder(model_name(kwargs), patch_size=patch, **kwargs)).eval()
    x = torch.randn(batch, 3, *size)
    mask = torch.zeros(batch, size[0] // patch, size[1] // patch)
    with torch.no_grad():
        dense = enc.forward_features(x)
        out = SparseEncoder(enc, backend)(x, mask)
    assert out.shape == dense.shape == (batch, enc.num_features, size[0] // patch, size[1] // patch)
    assert rel_err(out, dense) <= 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_backend_matches_masked(case, backend):
    """FCMAE features, loss, predictions and all gradients of `backend` vs `masked`, and the loss vs docs/method.md's formula."""
    patch, size, batch, kwargs = CASES[case]
    ref = randomize_grn(FCMAE(model_name(kwargs), decoder_dim=32, backend="masked", patch_size=patch, **kwargs))
    ours = copy.deepcopy(ref)
    ours.backend = backend
    imgs = torch.randn(batch, 3, *size)
    mask = random_mask(batch, (size[0] // patch, size[1] // patch), 0.6)
    assert 0 < mask.sum() < mask.numel()
    with torch.no_grad():
        feats_ref = SparseEncoder(ref.encoder, "masked")(imgs, mask)
        feats = SparseEncoder(ours.encoder, backend)(imgs, mask)
    assert rel_err(feats, feats_ref) <= 1e-5
    assert (feats * mask.unsqueeze(1)).abs().max() == 0 and feats_ref.abs().max() > 0

    loss_ref, pred_ref, _ = ref(imgs, mask)
    loss, pred, _ = ours(imgs, mask)
    assert pred.shape == (batch, mask[0].numel(), patch * patch * 3)
    assert loss_ref.item() == pytest.approx(reference_loss(imgs, pred_ref.detach(), mask, patch, True), rel=1e-5)
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    assert rel_err(pred, pred_ref) <= 1e-5
    loss_ref.backward()
    loss.backward()
    assert_grads_match(ours, ref)


@pytest.mark.parametrize("patch", [16, 8])
def test_no_leak_from_masked_pixels(patch, backend):
    """Visible outputs depend on visible pixels only, at the new patch sizes too."""
    enc = randomize_grn(create_encoder("convnextv2_atto", patch_size=patch)).eval()
    x = torch.randn(2, 3, 64, 64)
    mask = random_mask(2, (64 // patch,) * 2, 0.6)
    pix = mask.repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1).bool()
    x2 = torch.where(pix, torch.randn_like(x), x)
    with torch.no_grad():
        a = SparseEncoder(enc, backend)(x, mask)
        b = SparseEncoder(enc, backend)(x2, mask)
    assert rel_err(a, b) <= 1e-6


def test_image_not_a_multiple_of_the_patch_is_one_clear_error():
    model = FCMAE("convnextv2_atto", decoder_dim=32, patch_size=16)
    with pytest.raises(ValueError, match="image size 40x48 is not divisible by the patch size 16"):
        model(torch.randn(1, 3, 40, 48))
    with pytest.raises(ValueError, match="patch_size=12 is not valid; choose one of: 32, 16, 8"):
        FCMAE("convnextv2_atto", patch_size=12)
