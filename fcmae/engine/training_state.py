"""What a training checkpoint holds, checked before a run resumes from it (fcmae.engine.resume): its entries are what
a run writes (counters, header, optimizer structure, RNG state, sums; `damage`), and its tensors - the model, the
EMA, the optimizer's moments - are the model this run builds, in finite floating-point values
(`check_training_tensors`). The moments' shapes against their parameters need the run's optimizer:
fcmae.engine.optim.check_optimizer_state, at restore.
"""
from __future__ import annotations

import math
from typing import Any

import torch


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def damage(state: dict[str, Any]) -> str | None:
    """What in a training checkpoint's entries is not what a run writes (None: nothing): the counters, the header,
    the optimizer's structure, the RNG state, the epoch sums. (The tensors: `check_training_tensors`.)"""
    bad = [k for k in ("epoch", "step", "epoch_step") if k in state and not _count(state[k])]
    if bad:
        return f"{bad[0]} is {state[bad[0]]!r}, not a count"
    for key, kind in (("model_args", dict), ("format", str), ("epoch_sums", dict), ("best", dict), ("rng", dict),
                      ("ema", dict), ("scaler", dict)):
        if state.get(key) is not None and not isinstance(state[key], kind):
            return f"its {key!r} is a {type(state[key]).__name__}, not a {kind.__name__}"
    numbers = {f"best.{k}": v for k, v in (state.get("best") or {}).items()}
    numbers.update({f"scaler.{k}": v for k, v in (state.get("scaler") or {}).items()})
    bad = next((k for k, v in numbers.items() if not _finite_number(v)), None)
    if bad is not None:
        return f"{bad} is {numbers[bad]!r}, not a finite number"
    opt = state["optimizer"]
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in opt["param_groups"])):
        return "its optimizer state is not an optimizer's state_dict (state, param_groups)"
    sums = state.get("epoch_sums")
    if sums and not (_finite_number(sums.get("loss")) and _count(sums.get("skipped")) and _count(sums.get("steps"))):
        return f"its epoch_sums {sums!r} are not (loss, skipped, steps)"
    rng = state.get("rng") or {}
    generator = rng.get("torch")
    if generator is not None and not (isinstance(generator, torch.Tensor) and generator.dtype == torch.uint8
                                      and generator.shape == torch.get_rng_state().shape):
        return "its RNG state (rng.torch) is not a torch generator's state"
    if rng.get("cuda") is not None and not (isinstance(rng["cuda"], torch.Tensor) and rng["cuda"].dtype == torch.uint8):
        return "its RNG state (rng.cuda) is not a CUDA generator's state"
    return None


def check_training_tensors(state: dict[str, Any], header: dict[str, Any], where: str,
                           shapes: dict[str, torch.Size] | None = None, fix: str = "resume from an earlier checkpoint"
                           ) -> None:
    """CheckpointError (one line) unless the checkpoint's model and EMA are exactly the model this run builds
    (`shapes`, or for this project's formats the model `header`'s model_args build, the checkpoint's own filling
    what the config leaves open) in finite floating-point values, their header says what the tensors hold, and
    every optimizer moment is a finite float. Nothing is loaded yet."""
    from convnextv2.checkpoint.validate import check_values
    from fcmae.headers import MODEL_ARGS, check_model_state

    fmt, own = header.get("format"), state.get("model_args")
    if shapes is None and fmt not in MODEL_ARGS:
        raise ValueError(f"cannot check {where}: a run of format {fmt!r} must give its model's shapes")
    run_args = {**{k: v for k, v in (header.get("model_args") or {}).items() if v is not None}, **(own or {})}
    for what in ("model", "ema"):
        if what == "model" or what in state:
            check_model_state(state[what], fmt, own, where, run_args, what, shapes, fix)
    for index, moments in state["optimizer"]["state"].items():
        if isinstance(moments, dict):
            check_values({k: v for k, v in moments.items() if isinstance(v, torch.Tensor)},
                         f"{where} (optimizer state of parameter {index})")
