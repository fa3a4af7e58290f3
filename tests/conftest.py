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


@pytest.fixture(params=sorted(BACKENDS))
def backend(request) -> str:
    return request.param
