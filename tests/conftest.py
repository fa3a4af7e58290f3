import os
import shutil
import socket

import pytest
import torch
from torch import nn

from convnextv2 import BACKENDS


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: loading a local file must not download anything."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def randomize_grn(model: nn.Module, std: float = 0.5) -> nn.Module:
    """GRN starts at zero, which hides bugs: give its weight and bias random values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".grn." in name:
                p.normal_(0, std)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def assert_grads_match(ours: nn.Module, ref: nn.Module, tol: float = 1e-4) -> None:
    """Every trainable parameter's gradient in `ours` equals `ref`'s (rel. max error <= tol) and is non-zero; only
    parameters that cannot train (the frozen, unused head norm) may have none."""
    grads = dict(ours.named_parameters())
    checked = 0
    for name, p_ref in ref.named_parameters():
        if p_ref.grad is None:
            assert not p_ref.requires_grad, name
            continue
        assert p_ref.grad.abs().max() > 0, name
        assert rel_err(grads[name].grad, p_ref.grad) <= tol, name
        checked += 1
    assert checked == sum(p.requires_grad for p in ref.parameters())


def trained_fcmae(steps: int = 3, **kwargs):
    """An atto FCMAE after a few AdamW steps on random 64-px images, so GRN's weights are off zero."""
    from fcmae import FCMAE

    fcmae = FCMAE("convnextv2_atto", decoder_dim=32, **kwargs)
    opt = torch.optim.AdamW([p for p in fcmae.parameters() if p.requires_grad], lr=1e-2)
    imgs = torch.randn(2, 3, 64, 64)
    for _ in range(steps):
        loss, _, _ = fcmae(imgs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fcmae.encoder.stages[3].blocks[1].mlp.grn.weight.abs().sum() > 0  # GRN moved off zero
    return fcmae


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def require_backend(name: str) -> None:
    """Skip visibly when a backend's optional library is missing; with env CI set, fail instead."""
    if name != "minkowski":
        return
    from convnextv2.backends.minkowski import import_minkowski
    try:
        import_minkowski()
    except ImportError as e:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI is set and {e}")
        pytest.skip(str(e))


@pytest.fixture(params=sorted(BACKENDS))
def backend(request) -> str:
    require_backend(request.param)
    return request.param


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """A small ImageFolder (2 classes x 12 generated JPEGs) for the pretraining tests, one per test module."""
    from imagegen import make_imagefolder

    root = tmp_path_factory.mktemp("imagefolder")
    make_imagefolder(str(root), classes=2, per_class=12)
    return str(root)


@pytest.fixture(scope="session")
def demo_pretrain(tmp_path_factory):
    """runs/demo/last.pt as `fcmae pretrain --config configs/pretrain/demo.yaml` writes it (atto, grey digits, 64 px,
    patch 16), one step long (no warm-up, so GRN moves off zero): README's examples start from it."""
    from fcmae.cli import main

    out = tmp_path_factory.mktemp("demo-pretrain") / "runs" / "demo"
    assert main(["pretrain", "--config", "pretrain/demo", f"output_dir={out}", "optim.epochs=1",
                 "optim.warmup_epochs=0", "data.num_samples=64", "monitor.every_epochs=0", "log.vis_every_epochs=0",
                 "log.progress=false", "log.tensorboard=false"]) == 0
    return out / "last.pt"


@pytest.fixture
def in_demo_dir(demo_pretrain, tmp_path, monkeypatch):
    """A working directory holding runs/demo/last.pt (`demo_pretrain`), as after the demo recipe's pretraining."""
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    shutil.copy(demo_pretrain, tmp_path / "runs" / "demo" / "last.pt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def demo_finetune_run(tmp_path_factory):
    """runs/demo-finetune as `fcmae finetune --config configs/finetune/demo.yaml` writes it (atto, grey digits, 64 px,
    patch 16, 10 classes), one epoch on 2 labeled digits per class: README's predict and ONNX examples start from
    it."""
    from fcmae.cli import main

    out = tmp_path_factory.mktemp("demo-finetune-run") / "runs" / "demo-finetune"
    assert main(["finetune", "--config", "finetune/demo", f"output_dir={out}", "optim.epochs=1", "data.batch_size=20",
                 "data.eval_batch_size=50", "data.digits_per_class=2", "data.digits_val=50"]) == 0
    return out
