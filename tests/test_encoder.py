"""SparseEncoder vs timm's own forward, and the no-leak property of docs/method.md."""
import pytest
import torch

from convnextv2 import MODEL_NAMES, SparseEncoder, create_encoder
from conftest import randomize_grn, rel_err
from fcmae.masking import random_mask


def test_model_names_cover_spec_sizes():
    for size in ["atto", "femto", "pico", "nano", "tiny", "base", "large", "huge"]:
        assert f"convnextv2_{size}" in MODEL_NAMES


@pytest.mark.parametrize("name", ["convnextv2_atto", "convnextv2_tiny"])  # conv-MLP and Linear-MLP variants
def test_all_visible_equals_timm(name, backend):
    enc = randomize_grn(create_encoder(name)).eval()
    x = torch.randn(2, 3, 64, 96)  # non-square
    with torch.no_grad():
        ours = SparseEncoder(enc, backend)(x, torch.zeros(2, 2, 3))
        ref = enc.forward_features(x)
    assert ours.shape == ref.shape == (2, enc.num_features, 2, 3)
    assert rel_err(ours, ref) <= 1e-5


@pytest.mark.parametrize("in_chans", [1, 3, 4])
def test_no_leak_from_masked_pixels(backend, in_chans):
    enc = randomize_grn(create_encoder("convnextv2_atto", in_chans=in_chans)).eval()
    sparse = SparseEncoder(enc, backend)
    x = torch.randn(3, in_chans, 96, 128)
    mask = random_mask(3, (3, 4), 0.6)
    # New values only under masked patches.
    pix_mask = mask.repeat_interleave(32, 1).repeat_interleave(32, 2).unsqueeze(1).bool()
    x2 = torch.where(pix_mask, torch.randn_like(x) * 10, x)
    assert not torch.equal(x, x2)
    with torch.no_grad():
        out1, out2 = sparse(x, mask), sparse(x2, mask)
    visible = (1 - mask).unsqueeze(1)
    assert (out1 * (1 - visible)).abs().max() == 0, "masked positions must be zero"
    assert (out1.abs() * visible).sum() > 0
    assert (out1 - out2).abs().max().item() <= 1e-6


def test_masked_output_differs_from_dense():
    # Sparse semantics are not dense ones: visible outputs must differ from timm's dense forward under a mask.
    enc = randomize_grn(create_encoder("convnextv2_atto")).eval()
    x = torch.randn(1, 3, 64, 64)
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    with torch.no_grad():
        sparse = SparseEncoder(enc)(x, mask)
        dense = enc.forward_features(x)
    assert rel_err(sparse[..., 1, 1], dense[..., 1, 1]) > 1e-3


def test_per_sample_grn(backend):
    # docs/method.md, departure 1: GRN pools per sample. A sample's output must not depend on the other samples in the batch.
    enc = randomize_grn(create_encoder("convnextv2_atto")).eval()
    sparse = SparseEncoder(enc, backend)
    x = torch.randn(4, 3, 64, 96)
    mask = random_mask(4, (2, 3), 0.5)
    with torch.no_grad():
        batched = sparse(x, mask)
        single = torch.cat([sparse(x[i:i + 1], mask[i:i + 1]) for i in range(4)])
    assert rel_err(batched, single) <= 1e-5


def test_output_shape_independent_of_mask_position():
    # docs/method.md, departure 4: only the top-left patch visible still gives the full (H/32, W/32) map, batch size 1.
    enc = create_encoder("convnextv2_atto").eval()
    mask = torch.ones(1, 3, 5)
    mask[0, 0, 0] = 0
    with torch.no_grad():
        out = SparseEncoder(enc)(torch.randn(1, 3, 96, 160), mask)
    assert out.shape == (1, 320, 3, 5)


def test_bad_inputs_raise_clear_errors():
    enc = create_encoder("convnextv2_atto")
    sparse = SparseEncoder(enc)
    with pytest.raises(ValueError, match="not divisible by the patch size 32"):
        sparse(torch.randn(1, 3, 64, 80), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="mask has shape"):
        sparse(torch.randn(1, 3, 64, 64), torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match="in_chans=3"):
        sparse(torch.randn(1, 1, 64, 64), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="unknown backend 'nope'.*masked"):
        SparseEncoder(enc, backend="nope")
    with pytest.raises(ValueError, match="unknown model 'convnextv2_giant'.*convnextv2_atto"):
        create_encoder("convnextv2_giant")


class FloatBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of activation-sized float tensors each dtype's ops write (views and copies of inputs left out)."""

    VIEWS = ("view", "permute", "transpose", "expand", "alias", "slice", "select", "t.default", "unsqueeze", "squeeze")

    def __init__(self):
        super().__init__()
        self.bytes: dict[torch.dtype, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(v in str(func) for v in self.VIEWS):
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() >= 4096:
                    self.bytes[t.dtype] = self.bytes.get(t.dtype, 0) + t.numel() * t.element_size()
        return out


@pytest.mark.parametrize("name", ["convnextv2_atto", "convnextv2_tiny"])
def test_sparse_backends_keep_the_autocast_dtype(name):
    """Under bf16 autocast every backend's activations are bf16, as timm's dense forward's: the sparse ones write no
    more fp32 activation bytes than dense does (an fp32 mask multiplied in would promote the residual stream and GRN
    to fp32 and ~double them; that made `masked` look slower next to `packed` than it is)."""
    enc = create_encoder(name, **({"depths": (1, 1, 2, 1), "dims": (32, 64, 96, 128)} if name.endswith("tiny") else {}))
    x, mask = torch.randn(2, 3, 64, 96), random_mask(2, (2, 3), 0.5)
    written = {}
    for backend in ("dense", "masked", "packed"):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), FloatBytes() as census:
            out = enc.forward_features(x) if backend == "dense" else SparseEncoder(enc, backend)(x, mask)
        assert out.dtype == torch.bfloat16, backend
        written[backend] = census.bytes
    fp32, bf16 = torch.float32, torch.bfloat16
    for backend in ("masked", "packed"):
        assert written[backend].get(fp32, 0) <= written["dense"].get(fp32, 0), (backend, written)
        assert written[backend][bf16] >= 0.5 * written["dense"][bf16], (backend, written)
