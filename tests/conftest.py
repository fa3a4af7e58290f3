import os

import pytest
import torch
from torch import nn

from convnextv2 import BACKENDS


def randomize_grn(model: nn.Module, std: float = 0.5) -> nn.Module:
    """GRN starts at zero, which hides bugs: give its weight and bias random values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".grn." in name:
                p.normal_(0, std)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


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
