"""Build the ConvNeXt V2 encoder: timm's own model, never a re-implementation.

Because the encoder *is* timm's `ConvNeXt`, its state_dict is timm's and a sparse-pretrained encoder becomes a dense
classifier without renaming anything.
"""
from __future__ import annotations

import timm
from timm.models.convnext import ConvNeXt
from torch import nn

from convnextv2.timm_names import SIZES, timm_name

# timm's ConvNeXt V2 family, smallest first (docs/method.md lists atto..huge; timm also has `small`).
MODEL_NAMES: tuple[str, ...] = tuple(name for name in SIZES if name in timm.list_models("convnextv2_*"))
# Mask patch sides (= the encoder's total stride) FCMAE supports: the paper's 32 (timm's 4x4 stem) and 16 / 8 for small
# images (a 2x2 / 1x1 stem). The three downsamples halve the resolution each, so the stem stride is patch_size // 8.
PATCH_SIZES = (32, 16, 8)
DOWNSAMPLE = 8  # 2 ** 3: the total stride of ConvNeXt's three 2x2/2 downsamples


def stem_stride(patch_size: int, key: str = "patch_size") -> int:
    """Mask patch side (32 / 16 / 8) -> timm's stem stride (`timm.create_model(..., patch_size=)`: 4 / 2 / 1)."""
    if patch_size not in PATCH_SIZES:
        raise ValueError(f"{key}={patch_size!r} is not valid; choose one of: {', '.join(map(str, PATCH_SIZES))} "
                         "(the mask patch side; 32 is the paper's, 16 / 8 for small images)")
    return patch_size // DOWNSAMPLE


def check_model_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")


def create_convnextv2(name: str, patch_size: int = 32, **kwargs) -> ConvNeXt:
    """timm's model for `convnextv2_<size>` at total stride `patch_size` (32 / 16 / 8), randomly initialised:
    `timm.create_model(timm_name(name, patch_size), **kwargs)`, i.e. `convnextv2_atto`, `convnextv2_atto_s16`,
    `convnextv2_atto_s8` (convnextv2.timm_names).

    The stem is a k x k / k patch conv with k = patch_size // 8, followed by 2x2/2 downsamples before stages 1-3 only,
    so a stride-2 stem gives total stride 16, the layout of Hugging Face's ConvNextV2 with `patch_size=2`.
    """
    check_model_name(name)
    if kwargs.get("pretrained"):
        raise ValueError("create_convnextv2 builds random weights; load a checkpoint with convnextv2.checkpoint")
    stem_stride(patch_size)  # ValueError naming the valid patch sizes
    return timm.create_model(timm_name(name, patch_size), pretrained=False, **kwargs)


def create_encoder(name: str, in_chans: int = 3, patch_size: int = 32, **kwargs) -> ConvNeXt:
    """A timm `convnextv2_<size>` with no classifier (`num_classes=0`), randomly initialised (nothing downloads).

    patch_size: the total stride = FCMAE's mask patch side (32 / 16 / 8; see `create_convnextv2`). Extra keyword
    arguments go to `timm.create_model` (e.g. `drop_path_rate`).
    The head's final LayerNorm is kept so that the state_dict stays timm's, but FCMAE never uses it, so it is
    frozen here: no optimizer state, no unused-parameter trouble under DDP. A fine-tune re-enables it.
    """
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    kwargs.setdefault("num_classes", 0)
    model = create_convnextv2(name, patch_size, in_chans=in_chans, **kwargs)
    if model.num_classes == 0:
        model.head.requires_grad_(False)
    return model


def encoder_patch_size(encoder: ConvNeXt) -> int:
    """The encoder's total stride, from its modules: the stem's stride times every downsample's (32 standard).

    (Read off the convs, not timm's `feature_info`, which does not know about a replaced downsample.)"""
    stride = encoder.stem[0].stride[0]
    for stage in encoder.stages:
        if isinstance(stage.downsample, nn.Sequential):
            stride *= stage.downsample[1].stride[0]
    return int(stride)


def check_patch_local(encoder: nn.Module) -> None:
    """Sparse running needs every strided conv to be patch-local (kernel == stride), as in the 'patch' stem."""
    if not isinstance(encoder, ConvNeXt):
        raise ValueError(f"expected a timm ConvNeXt encoder, got {type(encoder).__name__}")
    convs = [encoder.stem[0]] + [s.downsample[1] for s in encoder.stages if isinstance(s.downsample, nn.Sequential)]
    for conv in convs:
        if not isinstance(conv, nn.Conv2d) or conv.kernel_size != conv.stride or conv.padding != (0, 0):
            raise ValueError(
                "sparse backends need a patch stem and 2x2/2 downsamples (kernel == stride, no padding); "
                f"found {conv}. Build the encoder with stem_type='patch'."
            )
