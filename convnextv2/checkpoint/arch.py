"""ConvNeXt V2 sizes, and reading the size (depths, dims, in_chans, stem stride) off a timm state_dict.

The stem stride is read from the stem kernel (C, in_chans, k, k): the stem is a k x k / k patch conv, so files with
no header (timm, Hugging Face, reference) tell it too.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import torch

from convnextv2.timm_names import SIZES, timm_name


@dataclass(frozen=True)
class Arch:
    """What a checkpoint's tensors imply: `name` is the matching timm model, or None for a custom size."""
    depths: tuple[int, ...]
    dims: tuple[int, ...]
    in_chans: int
    stem_stride: int  # the stem conv's kernel == stride (4 standard); timm's and HF's `patch_size` argument
    name: str | None

    @property
    def patch_size(self) -> int:
        """The total stride = FCMAE's mask patch side: the stem stride times 2 per downsample (32 standard)."""
        return self.stem_stride * 2 ** (len(self.depths) - 1)

    @property
    def timm_name(self) -> str:
        """The timm name that builds this layout: `convnextv2_<size>` at patch 32, `..._s16` / `..._s8` at 16 / 8
        (registered by `import convnextv2`)."""
        if self.name is None:
            raise ValueError(f"{self.describe()} matches no timm convnextv2_* model")
        return timm_name(self.name, self.patch_size)

    def describe(self) -> str:
        size = self.name or "a custom ConvNeXt V2"
        return (f"{size} (depths {list(self.depths)}, dims {list(self.dims)}, in_chans {self.in_chans}, "
                f"patch size {self.patch_size}: stem {self.stem_stride}x{self.stem_stride})")


def arch_by_name(name: str) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    if name not in SIZES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(SIZES)}")
    return SIZES[name]


def _width(sd: dict[str, torch.Tensor], stage: int) -> int:
    """Stage `stage`'s width: the length most of its blocks' per-channel tensors (conv_dw, norm) have, so that one
    wrong tensor is named by the shape check rather than taken for the width. ValueError when there are none."""
    pattern = re.compile(rf"stages\.{stage}\.blocks\.\d+\.(conv_dw|norm)\.(weight|bias)")
    widths = Counter(int(v.shape[0]) for k, v in sd.items()
                     if pattern.fullmatch(k) and isinstance(v, torch.Tensor) and v.ndim > 0)
    if not widths:
        raise ValueError(f"stage {stage} has no depthwise convolution or norm (stages.{stage}.blocks.0.conv_dw.weight):"
                         " its width cannot be read; it is not a complete ConvNeXt V2 encoder")
    return widths.most_common(1)[0][0]


def infer_arch(sd: dict[str, torch.Tensor]) -> Arch:
    """timm-keyed encoder state_dict -> Arch. Depths count the blocks per stage, dims are each stage's width (the
    length of most of its per-channel tensors), in_chans and the stem stride come from the stem kernel."""
    stem = sd.get("stem.0.weight")
    if stem is None or stem.ndim != 4:
        raise ValueError("no stem convolution (stem.0.weight) in the checkpoint; it is not a ConvNeXt V2 encoder")
    blocks: dict[int, set[int]] = {}
    for k in sd:
        m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    stages = sorted(blocks)
    if not stages or stages != list(range(len(stages))):
        raise ValueError(f"the checkpoint's stages are not numbered 0..n-1 (found {stages})")
    depths = tuple(len(blocks[s]) for s in stages)
    dims = tuple(_width(sd, s) for s in stages)
    name = next((n for n, (d, c, _) in SIZES.items() if d == depths and c == dims), None)
    if stem.shape[2] != stem.shape[3]:
        raise ValueError(f"the stem convolution stem.0.weight {tuple(stem.shape)} is not square; not a ConvNeXt V2 stem")
    if "stages.0.downsample.1.weight" in sd:
        raise ValueError(f"the checkpoint has a stage-0 downsample after a {stem.shape[2]}x{stem.shape[2]} stem (timm's "
                         "own patch_size=2 layout, total stride 32); ConvNeXt V2 here has none (a 2x2 stem = stride 16)")
    return Arch(depths, dims, int(stem.shape[1]), int(stem.shape[2]), name)


def encoder_shapes(arch: Arch, num_classes: int = 0, conv_mlp: bool | None = None) -> dict[str, torch.Size]:
    """Every parameter shape of timm's ConvNeXt V2 in `arch`'s layout, in timm's key order: stem, stages (stage-s
    downsample for s >= 1, blocks), head.norm, and head.fc when num_classes > 0. conv_mlp: 1x1-conv mlp.fc weights
    (out, in, 1, 1) rather than Linear (out, in); None: the named size's own (atto..nano conv, tiny.. Linear).
    Written out rather than read off a model built on the meta device (a quarter of a second per build, for every file
    read); tests/test_checkpoint_fuzz.py checks it equals timm's own models."""
    if conv_mlp is None:
        conv_mlp = SIZES[arch.name][2] if arch.name is not None else True
    d, k = arch.dims, arch.stem_stride
    shapes: dict[str, tuple[int, ...]] = {"stem.0.weight": (d[0], arch.in_chans, k, k), "stem.0.bias": (d[0],),
                                          "stem.1.weight": (d[0],), "stem.1.bias": (d[0],)}
    for s, (depth, c) in enumerate(zip(arch.depths, d)):
        if s > 0:
            down = {"0.weight": (d[s - 1],), "0.bias": (d[s - 1],), "1.weight": (c, d[s - 1], 2, 2), "1.bias": (c,)}
            shapes.update({f"stages.{s}.downsample.{name}": shape for name, shape in down.items()})
        pointwise = (1, 1) if conv_mlp else ()
        for b in range(depth):
            block = {"conv_dw.weight": (c, 1, 7, 7), "conv_dw.bias": (c,), "norm.weight": (c,), "norm.bias": (c,),
                     "mlp.fc1.weight": (4 * c, c, *pointwise), "mlp.fc1.bias": (4 * c,), "mlp.grn.weight": (4 * c,),
                     "mlp.grn.bias": (4 * c,), "mlp.fc2.weight": (c, 4 * c, *pointwise), "mlp.fc2.bias": (c,)}
            shapes.update({f"stages.{s}.blocks.{b}.{name}": shape for name, shape in block.items()})
    shapes.update({"head.norm.weight": (d[-1],), "head.norm.bias": (d[-1],)})
    if num_classes > 0:
        shapes.update({"head.fc.weight": (num_classes, d[-1]), "head.fc.bias": (num_classes,)})
    return {key: torch.Size(shape) for key, shape in shapes.items()}
