"""timm names for ConvNeXt V2 at total stride 16 and 8, registered with timm's own `register_model`.

timm's `convnextv2_<size>` has total stride 32 (a 4x4 stem). FCMAE on small images pretrains at 16 or 8 (docs/method.md), so
importing `convnextv2` registers, per size:
- `convnextv2_<size>_s16`: a 2x2/2 stem and no stage-0 downsample (stages at strides 2, 4, 8, 16), the layout of
  transformers' ConvNextV2 with patch_size=2. (timm's own `patch_size=2` keeps a 2x2/2 downsample in stage 0 and a
  total stride of 32: another network.)
- `convnextv2_<size>_s8`: a 1x1 stem (strides 1, 2, 4, 8), timm's own `patch_size=1` layout under its own name.

They are built by timm's `build_model_with_cfg`, so everything timm does with a name works: `pretrained=True` with
`pretrained_cfg_overlay=dict(file=...)` (nothing downloads), `features_only=True` with the true `feature_info`
reductions, `local-dir:` folders whose config.json names them, and libraries that take a timm name (smp's `tu-`,
mmpretrain's TIMMBackbone):

    import convnextv2, timm
    timm.create_model("convnextv2_atto_s16", in_chans=1, features_only=True)   # feature_info.reduction(): 2, 4, 8, 16
"""
from __future__ import annotations

from typing import Any, Callable

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.convnext import ConvNeXt
from torch import nn

# timm's convnextv2_<size> definitions (docs/method.md, "Model sizes"; `small` is timm's own): depths, dims, conv_mlp. atto..nano build the
# MLP as 1x1 convs, so their mlp.fc weights are (out, in, 1, 1) instead of (out, in).
SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...], bool]] = {
    "convnextv2_atto": ((2, 2, 6, 2), (40, 80, 160, 320), True),
    "convnextv2_femto": ((2, 2, 6, 2), (48, 96, 192, 384), True),
    "convnextv2_pico": ((2, 2, 6, 2), (64, 128, 256, 512), True),
    "convnextv2_nano": ((2, 2, 8, 2), (80, 160, 320, 640), True),
    "convnextv2_tiny": ((3, 3, 9, 3), (96, 192, 384, 768), False),
    "convnextv2_small": ((3, 3, 27, 3), (96, 192, 384, 768), False),
    "convnextv2_base": ((3, 3, 27, 3), (128, 256, 512, 1024), False),
    "convnextv2_large": ((3, 3, 27, 3), (192, 384, 768, 1536), False),
    "convnextv2_huge": ((3, 3, 27, 3), (352, 704, 1408, 2816), False),
}
SUFFIXES = {32: "", 16: "_s16", 8: "_s8"}  # total stride (= FCMAE's mask patch side) -> name suffix
FIXED = ("patch_size", "stem_type", "output_stride")  # set by the name: a different value would change the layout

__all__ = ["SIZES", "SUFFIXES", "timm_name", "load_line"]  # + the registered names


def timm_name(name: str, patch_size: int) -> str:
    """`convnextv2_<size>` at total stride `patch_size` -> its timm name: 32 `convnextv2_atto`, 16
    `convnextv2_atto_s16`, 8 `convnextv2_atto_s8`."""
    if name not in SIZES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(SIZES)}")
    if patch_size not in SUFFIXES:
        raise ValueError(f"patch size {patch_size!r} has no timm name; choose one of: {', '.join(map(str, SUFFIXES))}")
    return name + SUFFIXES[patch_size]


def load_line(name: str, patch_size: int, in_chans: int, path: str, num_classes: int | None = None,
              image_size: int = 224) -> str:
    """One line of Python that builds an exported file's model in timm and loads it, offline, to paste as printed.

    num_classes: a classifier with that many outputs (said in the overlay too, else timm re-draws head.fc unless it is
    1000); None: the multi-scale backbone (`features_only`, stages 0-3). The overlay's input_size tells timm the
    file's channel count (else it warns that its cfg declares 3) and the eval size."""
    args = [repr(timm_name(name, patch_size)), f"in_chans={in_chans}"]
    overlay = [f"file={path!r}"]
    if num_classes is None:
        args += ["features_only=True", "out_indices=(0, 1, 2, 3)"]
    else:
        args.append(f"num_classes={num_classes}")
        overlay.append(f"num_classes={num_classes}")
    overlay.append(f"input_size=({in_chans}, {image_size}, {image_size})")
    args += ["pretrained=True", f"pretrained_cfg_overlay=dict({', '.join(overlay)})"]
    imports = "import timm" if patch_size == 32 else "import convnextv2, timm"  # the _s16 / _s8 names: convnextv2's
    return f"{imports}; model = timm.create_model({', '.join(args)})"


def without_stage0_downsample(**kwargs: Any) -> ConvNeXt:
    """timm's ConvNeXt, minus the 2x2/2 downsample its 2x2 stem gives stage 0, with `feature_info` reductions to match.

    (Built with it, then replaced: the same random init, draw for draw, as the model this project built before.)"""
    model = ConvNeXt(**kwargs)
    if not isinstance(model.stages[0].downsample, nn.Identity):
        model.stages[0].downsample = nn.Identity()
        for i, info in enumerate(model.feature_info):
            info["reduction"] = model.stem[0].stride[0] * 2 ** i
    return model


def _create(name: str, total_stride: int, pretrained: bool, kwargs: dict[str, Any]) -> ConvNeXt:
    variant = timm_name(name, total_stride)
    fixed = [k for k in FIXED if k in kwargs]
    if fixed:
        raise ValueError(f"{variant} has total stride {total_stride} by its name; drop {', '.join(fixed)} (the other "
                         f"strides are {', '.join(timm_name(name, p) for p in SUFFIXES if p != total_stride)})")
    depths, dims, conv_mlp = SIZES[name]
    model_args = dict(depths=depths, dims=dims, conv_mlp=conv_mlp, use_grn=True, ls_init_value=None)
    return build_model_with_cfg(  # kwargs win over the size's defaults, as in timm's own convnextv2_<size>
        without_stage0_downsample, variant, pretrained,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **dict(model_args, patch_size=total_stride // 8, **kwargs),
    )


def _pretrained_cfg(patch_size: int) -> dict[str, Any]:
    """What timm knows of a name before any file: ImageNet's eval transform; no weights (pretrained needs a file)."""
    side = 224 // patch_size
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(side, side), crop_pct=0.875,
                interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv="stem.0",
                classifier="head.fc")


# timm's register_model reads the pretrained cfgs from the registering module's `default_cfgs`
default_cfgs = generate_default_cfgs({timm_name(n, p): _pretrained_cfg(p) for n in SIZES for p in SUFFIXES if p != 32})


def _entrypoint(name: str, total_stride: int) -> Callable[..., ConvNeXt]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> ConvNeXt:
        return _create(name, total_stride, pretrained, kwargs)

    k = total_stride // 8
    entrypoint.__name__ = entrypoint.__qualname__ = timm_name(name, total_stride)  # register_model uses the name
    entrypoint.__doc__ = f"{name} at total stride {total_stride} (stem {k}x{k}, no stage-0 downsample)."
    return entrypoint


def _register() -> None:
    for name in SIZES:
        for patch_size in (16, 8):
            globals()[timm_name(name, patch_size)] = register_model(_entrypoint(name, patch_size))


_register()
