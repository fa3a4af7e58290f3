"""Build the ConvNeXt V2 encoder: timm's own model, never a re-implementation.

Because the encoder *is* timm's `ConvNeXt`, its state_dict is timm's and a sparse-pretrained encoder becomes a dense
classifier without renaming anything.
"""
from __future__ import annotations

import timm
from timm.models.convnext import ConvNeXt
from torch import nn

# timm's ConvNeXt V2 family, smallest first (SPEC §1 lists atto..huge; timm also has `small`).
SIZES = ("atto", "femto", "pico", "nano", "tiny", "small", "base", "large", "huge")
MODEL_NAMES: tuple[str, ...] = tuple(
    f"convnextv2_{size}" for size in SIZES if f"convnextv2_{size}" in timm.list_models("convnextv2_*")
)


def check_model_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")


def create_encoder(name: str, in_chans: int = 3, **kwargs) -> ConvNeXt:
    """A timm `convnextv2_<size>` with no classifier (`num_classes=0`), randomly initialised (nothing downloads).

    Extra keyword arguments go to `timm.create_model` (e.g. `patch_size` for the stem stride, `drop_path_rate`).
    The head's final LayerNorm is kept so that the state_dict stays timm's, but FCMAE never uses it, so it is
    frozen here: no optimizer state, no unused-parameter trouble under DDP. A fine-tune re-enables it.
    """
    check_model_name(name)
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    kwargs.setdefault("num_classes", 0)
    model = timm.create_model(name, pretrained=False, in_chans=in_chans, **kwargs)
    if model.num_classes == 0:
        model.head.requires_grad_(False)
    return model


def encoder_patch_size(encoder: ConvNeXt) -> int:
    """The encoder's total stride: the side of one mask patch (32 with the standard 4x stem)."""
    return int(encoder.feature_info[-1]["reduction"])


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
