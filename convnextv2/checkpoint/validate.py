"""Every tensor read from a checkpoint is checked before it is used, here, by every reader.

A state_dict is checked against the shapes of the model it will be loaded into (the layout its tensors imply,
`encoder_shapes`; the model a header describes; a live model): every key's exact shape, no key missing, none extra;
then every value: a floating dtype (float32 / float16 / bfloat16 / float64: half-precision weights load
into a float32 model as released weights are; integers, booleans and complex numbers are refused) and finite values.
A header (an FCMAE checkpoint's `model_args`, an export's safetensors metadata) must describe the tensors it carries.

The only reshape a shape may need is a layout one: mlp.fc1 / mlp.fc2 as a Linear (out, in) or a 1x1 conv
(out, in, 1, 1) (`layout_fits`). A tensor of the right size in the wrong shape (a transposed weight) is refused,
never reshaped into place. Each failure is one `CheckpointError` line: the file, the first bad key, what is wrong
and the fix.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch

from convnextv2.checkpoint.arch import Arch
from convnextv2.checkpoint.io import CheckpointError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LAYOUT_KEYS = (".mlp.fc1.weight", ".mlp.fc2.weight")  # Linear (out, in) in one layout, 1x1 conv in the other
REEXPORT = "re-export it from the model it came from"


def shape_str(shape: tuple[int, ...] | torch.Size) -> str:
    return str(tuple(int(s) for s in shape))


def layout_fits(key: str, shape: torch.Size, want: torch.Size) -> bool:
    """True when a tensor of `shape` under `key` loads as `want`: equal, or an mlp.fc weight in the other layout
    (out, in) <-> (out, in, 1, 1)."""
    shape, want = tuple(shape), tuple(want)
    if shape == want:
        return True
    if not key.endswith(LAYOUT_KEYS):
        return False
    return (len(want) == 4 and want[2:] == (1, 1) and shape == want[:2]) or (
        len(shape) == 4 and shape[2:] == (1, 1) and shape[:2] == want)


def all_finite(value: torch.Tensor) -> bool:
    """No NaN or inf in a floating-point tensor. A NaN or inf makes the sum non-finite, and a float32 sum is one fast
    pass (a tenth of isfinite's time); only a non-finite sum (maybe an overflow of huge finite values) is looked at
    element by element."""
    if math.isfinite(value.sum(dtype=torch.float32 if value.element_size() < 4 else value.dtype)):
        return True
    return bool(torch.isfinite(value).all())


def value_problem(value: Any) -> str | None:
    """What makes `value` unusable as a weight ('is int8 (integers), not float32 ...', 'holds 3 NaN ...'), or None."""
    if not isinstance(value, torch.Tensor):
        return f"is a {type(value).__name__}, not a tensor"
    if value.layout != torch.strided or value.is_quantized or value.device.type == "meta":
        what = ("a quantized tensor" if value.is_quantized else "a meta tensor (saved without its values)"
                if value.device.type == "meta" else f"a {str(value.layout).replace('torch.', '')} tensor")
        return f"is {what}, not a dense float tensor: {REEXPORT} as plain weights"
    if value.dtype not in FLOAT_DTYPES:
        kind = ("booleans" if value.dtype == torch.bool else "complex numbers" if value.is_complex()
                else "integers" if not value.is_floating_point() else "a low-precision float")
        return (f"is {str(value.dtype).replace('torch.', '')} ({kind}), not float32 / float16 / bfloat16: a quantized "
                f"or corrupted file? {REEXPORT} in floating point")
    if value.numel() == 0 or all_finite(value):
        return None
    nan, inf = int(torch.isnan(value).sum()), int(torch.isinf(value).sum())
    what = "only NaN" if nan == value.numel() else " and ".join(
        f"{n} {name}" for n, name in ((nan, "NaN"), (inf, "inf")) if n) + f" of its {value.numel()} values"
    return (f"holds {what}: the weights are broken (a diverged run or a bad conversion); use an earlier checkpoint "
            f"or {REEXPORT}")


def check_values(sd: Mapping[str, Any], where: str) -> None:
    """CheckpointError naming the first key of `sd` whose value is no finite floating-point tensor."""
    for key, value in sd.items():
        problem = value_problem(value)
        if problem is not None:
            raise CheckpointError(f"{where}: {key} {problem}")


def shape_problem(key: str, shape: torch.Size, want: torch.Size, target: str) -> str:
    """'KEY has shape S, but TARGET needs W' (+ ' (it is transposed)' when it is: in the file's own mlp.fc layout)."""
    s, w = tuple(shape), tuple(want)
    as_file = w[:2] if key.endswith(LAYOUT_KEYS) and len(s) == 2 and len(w) == 4 else w
    transposed = len(s) >= 2 and len(s) == len(as_file) and (s[1], s[0], *s[2:]) == as_file and s != as_file
    return (f"{key} has shape {shape_str(s)}, but {target} needs {shape_str(w)}"
            + (" (it is transposed)" if transposed else ""))


def check_keys_and_shapes(sd: Mapping[str, Any], shapes: Mapping[str, torch.Size], where: str, target: str,
                          fix: str = REEXPORT, may_lack: Callable[[str], bool] = lambda key: False) -> None:
    """CheckpointError for the first key `target` lacks, the first shape that does not fit (`layout_fits`), or the
    keys of `target` sd lacks (except those `may_lack`). fix: the end of the line."""
    for key, value in sd.items():
        if key not in shapes:
            extra = [k for k in sd if k not in shapes]
            raise CheckpointError(
                f"{where} has {len(extra)} key(s) {target} does not have, e.g. {', '.join(extra[:3])}: another "
                f"model's weights, or an edited file; {fix}")
        if isinstance(value, torch.Tensor) and not layout_fits(key, value.shape, shapes[key]):
            raise CheckpointError(f"{where}: {shape_problem(key, value.shape, shapes[key], target)}; the file does "
                                  f"not hold that model's weights in their layout (an edited or mixed-up file): {fix}")
    missing = [k for k in shapes if k not in sd and not may_lack(k)]
    if missing:
        raise CheckpointError(f"{where} lacks {len(missing)} key(s) of {target}, e.g. {', '.join(missing[:3])}: an "
                              f"incomplete or partial file; {fix}")


def check_state_dict(sd: Mapping[str, Any], shapes: Mapping[str, torch.Size], where: str, target: str,
                     fix: str = REEXPORT, may_lack: Callable[[str], bool] = lambda key: False) -> None:
    """The whole check of one state_dict against the model it loads into: keys and shapes, then dtypes and values."""
    check_keys_and_shapes(sd, shapes, where, target, fix, may_lack)
    check_values(sd, where)


def header_claims(header: Mapping[str, Any], name_key: str) -> dict[str, Any]:
    """{size, in_chans, patch size} as a header states them (keys it leaves out are not claimed). name_key: the
    header's name for the model ('encoder_name' in FCMAE checkpoints, 'name' in fine-tune ones, 'model' in
    safetensors metadata)."""
    claims = {"size": header.get(name_key), "in_chans": header.get("in_chans"), "patch size": header.get("patch_size")}
    return {k: v for k, v in claims.items() if v not in (None, "")}


def check_header(claims: Mapping[str, Any], arch: Arch, where: str, header: str, num_classes: int = 0) -> None:
    """CheckpointError unless the header's claims (`header_claims`, plus 'num_classes' for a classifier) are what
    the tensors hold (`arch`, a head of `num_classes` outputs); the line says which tensors say otherwise. Values may
    be text (safetensors metadata is)."""
    have = {"size": (arch.name, "its blocks"), "in_chans": (arch.in_chans, "stem.0.weight"),
            "patch size": (arch.patch_size, "stem.0.weight"), "num_classes": (num_classes, "head.fc.weight")}
    differs = [f"{what} {value!r}, the tensors {have[what][0]!r} (read off {have[what][1]})"
               for what, value in claims.items() if str(value) != str(have[what][0])]
    if differs:
        raise CheckpointError(
            f"{where}: its {header} says {'; '.join(differs)}; the tensors are {arch.describe()}: the header and the "
            "weights disagree (an edited or mixed-up file); save the weights with the header of the model they are, "
            "or as a plain state_dict")


def check_export_metadata(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """CheckpointError unless the model a timm export's safetensors metadata names (`model`, `in_chans`,
    `patch_size`: convnextv2.checkpoint.timm_metadata) is what its tensors hold. Files without those entries, or
    whose tensors are not timm-keyed, are left to the readers' own checks."""
    from convnextv2.checkpoint.arch import infer_arch

    claims = header_claims(metadata, "model")
    if not claims or "stem.0.weight" not in tensors:
        return
    try:
        arch = infer_arch(dict(tensors))
    except ValueError:
        return  # not a complete encoder: read_encoder says what is missing
    check_header(claims, arch, where, "safetensors metadata")
