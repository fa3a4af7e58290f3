"""Every sparse backend against `masked` (outputs, loss, gradients), and the `minkowski` backend's own contract.

The `minkowski` cases need MinkowskiEngine (`make minkowski`): they skip visibly without it, or fail when env CI is set.
"""
import copy
import sys

import pytest
import torch

from convnextv2 import BACKENDS, SparseEncoder, create_encoder
from convnextv2.backends.minkowski import conv_kernel, depthwise_kernel, reference_sparse_state_dict
from conftest import randomize_grn, rel_err, require_backend
from fcmae import FCMAE
from fcmae.masking import random_mask

# timm convnextv2_tiny's structure (nn.Linear MLP, LayerNorm) at a CPU-test size; atto is the conv-MLP variant.
TINY_STRUCTURED = dict(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64))
CASES = {  # model name, timm kwargs, batch, (H, W): non-square everywhere, batch 1 twice
    "atto-2x64x96": ("convnextv2_atto", {}, 2, (64, 96)),
    "tinyish-2x96x64": ("convnextv2_tiny", TINY_STRUCTURED, 2, (96, 64)),
    "atto-1x64x128": ("convnextv2_atto", {}, 1, (64, 128)),
    "tinyish-1x32x96": ("convnextv2_tiny", TINY_STRUCTURED, 1, (32, 96)),
}


@pytest.fixture(params=sorted(set(BACKENDS) - {"masked"}))
def other(request) -> str:
    """Every backend except the `masked` oracle."""
    require_backend(request.param)
    return request.param


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Random GRN, and noise on every other trainable weight: zero biases and unit norms would hide layout bugs."""
    randomize_grn(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ".grn." not in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def run(model: FCMAE, imgs: torch.Tensor, mask: torch.Tensor):
    """Loss, encoder features (caught at the decoder's input) and parameter gradients of one forward/backward."""
    feats = []
    hook = model.decoder.register_forward_hook(lambda mod, args, out: feats.append(args[0]))
    loss, _, _ = model(imgs, mask)
    hook.remove()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), feats[0].detach(), grads


@pytest.mark.parametrize("case", CASES)
def test_backend_matches_masked(other, case):
    name, kwargs, n, (h, w) = CASES[case]
    ref = randomize(FCMAE(name, decoder_dim=32, backend="masked", **kwargs))
    model = copy.deepcopy(ref)
    model.backend = other
    imgs = torch.randn(n, 3, h, w)
    mask = random_mask(n, (h // 32, w // 32), 0.5)
    loss_ref, feats_ref, grads_ref = run(ref, imgs, mask)
    loss, feats, grads = run(model, imgs, mask)
    assert feats.shape == feats_ref.shape == (n, model.encoder.num_features, h // 32, w // 32)
    assert rel_err(feats, feats_ref) <= 1e-5
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    assert grads.keys() == grads_ref.keys()
    for key, g_ref in grads_ref.items():
        assert grads[key] is not None, f"{other}: no gradient reached {key}"
        assert rel_err(grads[key], g_ref) <= 1e-4, key
    assert grads_ref["encoder.stages.0.blocks.0.conv_dw.weight"].abs().max() > 0


def test_sample_without_visible_patch(other):
    # One sample fully masked beside one with a single visible patch: zeros for the first, masked's values for both.
    enc = randomize(create_encoder("convnextv2_atto")).eval()
    x = torch.randn(2, 3, 64, 64)
    mask = torch.ones(2, 2, 2)
    mask[1, 1, 0] = 0
    if other == "packed":  # by design it needs equal visible counts per sample, and says so
        with pytest.raises(ValueError, match="same number of visible patches"):
            SparseEncoder(enc, other)(x, mask)
        return
    with torch.no_grad():
        out = SparseEncoder(enc, other)(x, mask)
        ref = SparseEncoder(enc, "masked")(x, mask)
    assert out[0].abs().max() == 0 and out[1, :, 1, 0].abs().max() > 0
    assert rel_err(out, ref) <= 1e-5


def test_minkowski_refuses_an_empty_batch():
    # MinkowskiEngine segfaults on an empty sparse tensor: the backend must refuse first (no MinkowskiEngine needed).
    enc = create_encoder("convnextv2_atto")
    with pytest.raises(ValueError, match="no visible patch"):
        SparseEncoder(enc, "minkowski")(torch.randn(2, 3, 64, 64), torch.ones(2, 2, 2))


def test_minkowski_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "MinkowskiEngine", None)  # makes `import MinkowskiEngine` fail
    enc = create_encoder("convnextv2_atto")
    with pytest.raises(ImportError, match="make minkowski"):
        SparseEncoder(enc, "minkowski")(torch.randn(1, 3, 64, 64), torch.zeros(1, 2, 2))


def test_kernel_layouts_follow_spec():
    # docs/checkpoints.md: kernel[a + k*b, i, o] == W[o, i, a, b], a = row offset (first spatial axis fastest).
    conv = torch.nn.Conv2d(3, 5, kernel_size=2, stride=2)
    kernel = conv_kernel(conv)
    assert kernel.shape == (4, 3, 5)
    dw = torch.nn.Conv2d(6, 6, kernel_size=7, padding=3, groups=6)
    dw_kernel = depthwise_kernel(dw)
    assert dw_kernel.shape == (49, 6)
    for a in range(7):
        for b in range(7):
            assert torch.equal(dw_kernel[a + 7 * b], dw.weight[:, 0, a, b])
            if a < 2 and b < 2:
                assert torch.equal(kernel[a + 2 * b], conv.weight[:, :, a, b].T)


def test_reference_sparse_layout_names_and_shapes():
    # Key names and shapes of the reference's SparseConvNeXtV2 (models/convnextv2_sparse.py, models/utils.py).
    enc = create_encoder("convnextv2_atto")
    sd = reference_sparse_state_dict(enc)
    assert len(sd) == 4 + 3 * 4 + sum((2, 2, 6, 2)) * 10  # stem, 3 downsamples, 12 blocks
    expected = {
        "encoder.downsample_layers.0.0.weight": (40, 3, 4, 4),
        "encoder.downsample_layers.0.1.bias": (40,),
        "encoder.downsample_layers.1.0.ln.weight": (40,),
        "encoder.downsample_layers.1.1.kernel": (4, 40, 80),
        "encoder.downsample_layers.3.1.bias": (1, 320),
        "encoder.stages.2.5.dwconv.kernel": (49, 160),
        "encoder.stages.2.5.dwconv.bias": (1, 160),
        "encoder.stages.0.1.norm.ln.bias": (40,),
        "encoder.stages.0.0.pwconv1.linear.weight": (160, 40),
        "encoder.stages.3.1.pwconv2.linear.bias": (320,),
        "encoder.stages.1.0.grn.gamma": (1, 320),
        "encoder.stages.1.0.grn.beta": (1, 320),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith(("encoder.norm", "encoder.head")) for k in sd)  # no final norm or head
    w = enc.stages[1].downsample[1].weight
    assert torch.equal(sd["encoder.downsample_layers.1.1.kernel"][1 + 2 * 0], w[:, :, 1, 0].T)


def test_reference_sparse_kernels_convert_back_to_timm(tmp_path):
    # The kernels this backend hands MinkowskiEngine, saved as a reference FCMAE checkpoint, convert back exactly.
    pytest.importorskip("convnextv2.checkpoint")
    from fcmae.cli import main

    enc = randomize(create_encoder("convnextv2_atto"))
    src, dst = tmp_path / "reference_sparse.pth", tmp_path / "timm.pth"
    torch.save({"model": reference_sparse_state_dict(enc)}, src)
    main(["convert", str(src), str(dst), "--to", "timm"])
    converted = torch.load(dst, map_location="cpu", weights_only=True)
    converted = converted.get("state_dict", converted)
    expected = {k: v for k, v in enc.state_dict().items() if not k.startswith("head.")}
    assert {k for k in converted if not k.startswith("head.")} == expected.keys()
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key
