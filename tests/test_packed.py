"""The `packed` backend against the `masked` oracle: outputs, loss and gradients in fp32, bf16 autocast, errors."""
import copy
import shutil

import pytest
import torch

from conftest import assert_grads_match, randomize_grn, rel_err
from convnextv2 import SparseEncoder, create_encoder, visible_patches
from convnextv2.backends.packed import _TokenL2Norm, depthwise_conv
from fcmae import FCMAE
from fcmae.masking import random_mask

# Both MLP flavours of timm's ConvNeXt V2: 1x1 convs + LayerNorm2d (atto..nano) and nn.Linear + LayerNorm (tiny+).
# The Linear one is a tiny-structured model made small (timm's convnextv2_tiny builder with fewer, narrower blocks).
SMALL_TINY = dict(depths=(1, 1, 2, 1), dims=(32, 64, 96, 128))
MODELS = {
    "atto": ("convnextv2_atto", {}),
    "nano": ("convnextv2_nano", {}),
    "tiny-structured": ("convnextv2_tiny", SMALL_TINY),
}


@pytest.mark.parametrize("model,in_chans,batch,size", [
    ("atto", 3, 3, (96, 160)),
    ("atto", 1, 1, (64, 96)),
    ("atto", 4, 2, (128, 64)),
    ("nano", 3, 2, (96, 64)),
    ("tiny-structured", 3, 3, (64, 128)),
    ("tiny-structured", 4, 1, (96, 96)),
])
def test_encoder_matches_masked(model, in_chans, batch, size):
    name, kwargs = MODELS[model]
    enc = randomize_grn(create_encoder(name, in_chans=in_chans, **kwargs)).eval()
    grid = (size[0] // 32, size[1] // 32)
    x = torch.randn(batch, in_chans, *size)
    mask = random_mask(batch, grid, 0.6)
    with torch.no_grad():
        ref = SparseEncoder(enc, "masked")(x, mask)
        ours = SparseEncoder(enc, "packed")(x, mask)
        ours_cl = SparseEncoder(enc, "packed")(x.to(memory_format=torch.channels_last), mask)
    assert ours.shape == ref.shape == (batch, enc.num_features, *grid)
    assert (ours * mask.unsqueeze(1)).abs().max() == 0, "masked positions must be zero"
    assert ref.abs().max() > 0
    assert rel_err(ours, ref) <= 1e-5
    assert rel_err(ours_cl, ref) <= 1e-5


@pytest.mark.parametrize("model,in_chans", [("atto", 1), ("nano", 3), ("tiny-structured", 4)])
def test_loss_and_grads_match_masked(model, in_chans):
    name, kwargs = MODELS[model]
    ref = randomize_grn(FCMAE(name, in_chans=in_chans, decoder_dim=64, backend="masked", **kwargs))
    ours = copy.deepcopy(ref)
    ours.backend = "packed"
    imgs = torch.randn(2, in_chans, 96, 128)
    mask = ref.random_mask(imgs)
    loss_ref, pred_ref, _ = ref(imgs, mask)
    loss, pred, _ = ours(imgs, mask)
    loss_ref.backward()
    loss.backward()
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    assert rel_err(pred, pred_ref) <= 1e-5
    assert_grads_match(ours, ref)


def test_bf16_autocast_forward_backward():
    model = randomize_grn(FCMAE("convnextv2_atto", decoder_dim=64))
    imgs = torch.randn(2, 3, 64, 96).to(memory_format=torch.channels_last)
    mask = model.random_mask(imgs)
    with torch.no_grad():
        loss_fp32, _, _ = model(imgs, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, _ = model(imgs, mask)
    assert pred.dtype == torch.bfloat16  # autocast really ran the convs / linears in bf16
    loss.backward()
    assert torch.isfinite(loss)
    assert abs(loss.item() - loss_fp32.item()) <= 0.05 * loss_fp32.item()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("channels_last,bias,size", [(True, True, 16), (False, True, 9), (True, False, 8)])
def test_depthwise_conv_grads_match_aten(channels_last, bias, size):
    """The CPU depthwise conv's own backward (flipped-kernel conv, bias sum, aten weight grad) against autograd
    through the nn.Conv2d module: output and the three gradients."""
    conv = torch.nn.Conv2d(24, 24, 7, padding=3, groups=24, bias=bias)
    x = torch.randn(3, 24, size, size)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    grad_out = torch.randn(3, 24, size, size)
    results = []
    for fn in (conv, lambda t: depthwise_conv(conv, t)):
        xi = x.clone().requires_grad_(True)
        conv.zero_grad(set_to_none=True)
        out = fn(xi)
        out.backward(grad_out)
        results.append((out, xi.grad, conv.weight.grad, conv.bias.grad if bias else None))
    (ref, *ref_grads), (ours, *our_grads) = results
    assert rel_err(ours, ref) <= 1e-6
    for g, g_ref in zip(our_grads, ref_grads):
        assert (g is None) == (g_ref is None)
        if g is not None:
            assert rel_err(g, g_ref) <= 1e-5


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_depthwise_conv_weight_grad_has_the_weights_strides(memory_format):
    """DDP's gradient buckets take the parameter's strides; a gradient in other strides costs a copy every step (and
    the reducer's "Grad strides do not match bucket view strides" warning)."""
    conv = torch.nn.Conv2d(16, 16, 7, padding=3, groups=16).to(memory_format=memory_format)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    (grad_w,) = torch.autograd.grad(depthwise_conv(conv, x).sum(), conv.weight)
    assert grad_w.stride() == conv.weight.stride()


def test_depthwise_conv_bf16_autocast_dtypes():
    """Under CPU autocast the gradients come back in the dtypes of the inputs they belong to, close to fp32's."""
    conv = torch.nn.Conv2d(16, 16, 7, padding=3, groups=16)
    x = torch.randn(2, 16, 8, 8).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = depthwise_conv(conv, x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == conv.weight.grad.dtype == conv.bias.grad.dtype == torch.float32
    w_ref = torch.ops.aten.convolution_backward(torch.ones(2, 16, 8, 8), x.detach(), conv.weight.detach(), None, [1, 1],
                                                [3, 3], [1, 1], False, [0, 0], 16, [False, True, False])[1]
    assert rel_err(conv.weight.grad, w_ref) <= 2e-2
    assert torch.equal(conv.bias.grad, torch.full((16,), 128.0))  # 2 * 8 * 8 ones, exact in any dtype


def test_token_l2_norm_matches_torch_norm():
    """GRN's token-axis norm: value and gradient equal x.norm's, including a channel that is all zeros (gradient 0)."""
    x = torch.randn(2, 50, 12)
    x[1, :, 3] = 0
    weight = torch.randn(2, 1, 12)
    grads = []
    for norm in (lambda t: t.norm(p=2, dim=1, keepdim=True), _TokenL2Norm.apply):
        xi = x.clone().requires_grad_(True)
        out = norm(xi)
        (out * weight).sum().backward()
        grads.append((out, xi.grad))
    (ref, ref_grad), (ours, our_grad) = grads
    assert ours.shape == (2, 1, 12) and ours[1, 0, 3] == 0
    assert rel_err(ours, ref) <= 1e-6
    assert rel_err(our_grad, ref_grad) <= 1e-6
    assert our_grad[1, :, 3].abs().max() == 0


def test_nothing_visible_gives_zeros():
    enc = create_encoder("convnextv2_atto").eval()
    with torch.no_grad():
        out = SparseEncoder(enc, "packed")(torch.randn(2, 3, 64, 64), torch.ones(2, 2, 2))
    assert out.shape == (2, 320, 2, 2) and out.abs().max() == 0


def test_unequal_visible_counts_raise():
    sparse = SparseEncoder(create_encoder("convnextv2_atto"), "packed")
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]]])  # 3 and 2 visible
    with pytest.raises(ValueError, match="same number of visible patches.*between 2 and 3"):
        sparse(torch.randn(2, 3, 64, 64), mask)
    with pytest.raises(ValueError, match="binary mask"):
        sparse(torch.randn(1, 3, 64, 64), torch.full((1, 2, 2), 0.5))


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
])
def test_compiled_train_step_matches_eager(device, monkeypatch):
    """torch.compile of the packed FCMAE forward, inside a whole train step (backward, AdamW), gives eager's losses,
    gradients and weights over several steps with new masks (so the graph must not bake in one mask). Given the
    visible patch indices (as the training loop passes them), it compiles as one graph (`fullgraph=True`): no graph
    break, i.e. no `.item()`, `.tolist()` or data-dependent shape, so no host sync inside the step."""
    if device == "cpu" and not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("torch.compile on CPU needs a C++ compiler (apt-get install g++)")
    if device == "cuda":
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 rounding would hide a 1e-5 error
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    eager = randomize_grn(FCMAE("convnextv2_atto", decoder_dim=32, decoder_depth=1)).to(device)
    compiled = copy.deepcopy(eager)
    compiled.forward = torch.compile(compiled.forward, fullgraph=True)
    lr = 1e-3
    opts = [torch.optim.AdamW(m.parameters(), lr=lr) for m in (eager, compiled)]
    imgs = torch.randn(2, 3, 64, 96, device=device)
    for _ in range(3):
        mask = eager.random_mask(imgs)
        visible = visible_patches(mask)
        losses = []
        for model in (eager, compiled):
            loss, _, _ = model(imgs, mask, visible)
            loss.backward()
            losses.append(loss.item())
        assert abs(losses[1] - losses[0]) <= 1e-5 * abs(losses[0])
        assert_grads_match(compiled, eager, tol=1e-4)  # the compiled backward, custom autograd functions included
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
    # AdamW divides each gradient by its own running scale, so an element whose gradient is near zero turns a
    # summation-order difference into a visible one: the weights agree to 1% of one step's lr
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-2 * lr, msg=lambda m: f"{name}: {m}")
