"""The training loop shared by pretraining and fine-tuning.

The task (FCMAE pretraining, classification fine-tuning) plugs in through `Task`: its model, its param groups, its
data for an epoch, and its loss for one micro-batch. The loop owns everything generic: device and DDP, AMP,
gradient accumulation, the per-step lr schedule, non-finite loss detection, atomic checkpoints with automatic
resume, metrics, TensorBoard and the progress bar.

Determinism (what makes a resumed run equal an uninterrupted one): the task derives every random choice from
(seed, epoch, micro-batch index) - data order, augmentation, masks - so resuming only needs the counters saved in
the checkpoint, and consumed micro-batches are skipped rather than replayed.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fcmae.config import save_config, to_dict
from fcmae.engine import checkpoint as ckpt_io
from fcmae.engine.config import RunConfig
from fcmae.engine.distributed import DistInfo, all_reduce_sum
from fcmae.engine.metrics import MetricsLogger, format_eta, progress_bar
from fcmae.engine.optim import build_adamw, cosine_lr, load_optimizer_state, scaled_lr, set_lr, skips_on_device
from fcmae.engine.resume import check_same_run, complete, complete_message, prepare_resume


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; training stopped before the optimizer step. `last.pt` is left holding weights that
    gave a finite loss (rolled back to the checkpoint before it when it was the one that diverged)."""


class Task(Protocol):
    model: nn.Module  # the raw module whose state_dict is saved
    global_batch: int  # samples per optimizer step over all processes
    steps_per_epoch: int  # optimizer steps per epoch

    def param_groups(self, weight_decay: float) -> list[dict]: ...
    def batches(self, epoch: int, skip_micro: int) -> Iterable[Any]:
        """This process's micro-batches of `epoch`, the first `skip_micro` left out (a resumed epoch)."""
    def loss(self, model: nn.Module, batch: Any, epoch: int, micro: int) -> torch.Tensor:
        """Scalar loss of one micro-batch; `model` may be the DDP/compiled wrapper; `micro` counts within the epoch."""
    def skipped(self, batch: Any) -> int:
        """Unreadable images replaced in this micro-batch (reported as `skipped`)."""
    def checkpoint_header(self) -> dict[str, Any]:
        """Entries that identify the model in a checkpoint (format, version, model_args)."""
    def end_of_epoch(self, epoch: int, last: bool) -> dict[str, Any]:
        """Rank 0 only, after each epoch: e.g. write pictures; returns extra metrics."""

    # Optional hooks (a task without them is trained as before):
    #   after_step(step: int) -> None            every process, after each optimizer step (e.g. an EMA update)
    #   evaluate(epoch: int) -> dict[str, float]  every process, after each epoch, before the checkpoint is written;
    #                                             returns metrics (the loop puts the model back in train mode)
    #   extra_state() -> dict                     entries added to every training checkpoint (EMA weights, best)
    #   load_extra_state(state: dict) -> None     on resume, with the whole checkpoint
    #   start(resumed: bool) -> dict[str, Any]    rank 0, once before training; metrics logged as epoch 0 (e.g. a
    #                                             baseline of the untrained model; the task skips it on resume)


def _hook(task: Task, name: str) -> Callable | None:
    return getattr(task, name, None)


def _format_metrics(metrics: dict[str, Any]) -> str:
    """The epoch line's tail: '  name value' for every float metric (timings left out)."""
    return "".join(f"  {k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float) and not k.endswith("seconds"))


@dataclass
class Progress:
    epoch: int = 0  # epoch in progress
    epoch_step: int = 0  # optimizer steps done in that epoch
    step: int = 0  # optimizer steps done in total
    # running sums of the epoch in progress, saved in checkpoints so a resumed epoch's mean covers all its steps
    epoch_loss: float = 0.0
    epoch_skipped: int = 0
    epoch_counted: int = 0  # steps in those sums (fewer than epoch_step after resuming an older checkpoint)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """None = fp32. auto: bf16 autocast on CUDA, fp32 on CPU."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[amp]


def save_checkpoint(path: str, task: Task, optimizer, scaler, progress: Progress, cfg: RunConfig,
                    device: torch.device) -> None:
    state = {
        **task.checkpoint_header(),
        "model": task.model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": progress.epoch,
        "epoch_step": progress.epoch_step,
        "step": progress.step,
        "epoch_sums": {"loss": progress.epoch_loss, "skipped": progress.epoch_skipped, "steps": progress.epoch_counted},
        "rng": {**ckpt_io.rng_state(device), "seed": torch.tensor(cfg.seed)},
        "config": to_dict(cfg),
    }
    extra = _hook(task, "extra_state")
    if extra is not None:
        state.update(extra())
    if os.path.basename(path) == ckpt_io.LAST:
        ckpt_io.save_last(state, path)
    else:
        ckpt_io.save_atomic(state, path)


def nonfinite_tensors(module: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers holding NaN or inf (one device sync for them all)."""
    tensors = [(name, t) for name, t in module.state_dict().items() if t.is_floating_point()]
    finite = torch.stack([t.isfinite().all() for _, t in tensors]).tolist() if tensors else []
    return [name for (name, _), ok in zip(tensors, finite) if not ok]


def _diverged(out: str, epoch: int, step: int, loss: float, last_step: int | None,
              what: str | None = None) -> NonFiniteLossError:
    """The NaN stop: roll last.pt back when its own weights gave this loss, and say what a rerun resumes from.
    what: the first part of the message (default: the non-finite loss)."""
    last = os.path.join(out, ckpt_io.LAST)
    if last_step == step:  # last.pt holds the weights that produced the non-finite loss: not a place to resume
        kept = ckpt_io.rollback_last(out)
        where = (f"{last} was rolled back to the checkpoint before it (step {kept}), whose weights gave a finite loss"
                 if kept is not None else
                 "no checkpoint from before the divergence exists, so a rerun starts where this run started")
    elif last_step is not None:
        where = f"{last} (step {last_step}) is kept: its weights gave a finite loss"
    else:
        where = "this run wrote no checkpoint yet, so a rerun starts where this run started"
    what = what or f"loss is {loss} at epoch {epoch + 1}, step {step}; stopped before the optimizer step"
    return NonFiniteLossError(
        f"{what}; {where}. Lower "
        "optim.lr (or optim.blr), raise optim.warmup_epochs or set optim.clip_grad, then rerun the same command "
        "with the new value to resume."
    )


class StepLog:
    """What the host knows of the steps since it last read the device: their stats stay on the device until `read`.

    Reading a number from a GPU waits for every queued kernel, so the loop reads the loss only at sync points (log
    rows, checkpoints, epoch ends; every step where the optimizer cannot skip a non-finite step on the device).
    Between them each step only appends its all-reduced (loss sum, skipped) tensor. Also times the interval since the
    last step row (img/s) and the time spent waiting for the data loader (`data_wait`, a share of wall time).
    """

    def __init__(self) -> None:
        self.pending: list[tuple[int, torch.Tensor]] = []  # (steps done before it, stats (2,) on the device)
        self.interval_t0, self.interval_steps, self.interval_wait = time.perf_counter(), 0, 0.0

    def add(self, step: int, stats: torch.Tensor, data_wait: float) -> None:
        self.pending.append((step, stats))
        self.interval_steps += 1
        self.interval_wait += data_wait

    def read(self) -> list[tuple[int, float, int]]:
        """-> [(step, summed loss, skipped)] of the pending steps, in one device-to-host copy."""
        if not self.pending:
            return []
        values = torch.stack([stats for _, stats in self.pending]).tolist()
        rows = [(step, loss, int(skipped)) for (step, _), (loss, skipped) in zip(self.pending, values)]
        self.pending.clear()
        return rows

    def interval(self) -> tuple[int, float, float]:
        """-> (steps, seconds, data-wait seconds) since the last call, and start a new interval."""
        now = time.perf_counter()
        out = (self.interval_steps, now - self.interval_t0, self.interval_wait)
        self.interval_t0, self.interval_steps, self.interval_wait = now, 0, 0.0
        return out


def accumulate(task: Task, forward_model: nn.Module, ddp: nn.Module, batches: Iterable[Any], scaler,
               dtype: torch.dtype | None, info: DistInfo, accum: int, epoch: int, first_micro: int, step: int,
               on_loss: Callable[[int, torch.Tensor], torch.Tensor] | None) -> tuple[torch.Tensor, float]:
    """Forward and backward of one optimizer step's `accum` micro-batches, with no host sync.

    -> (stats, data_wait): stats (2,) float64 on the device, all-reduced over processes: the summed micro-batch
    losses and the unreadable images replaced; data_wait: seconds spent waiting for the loader.
    """
    device = info.device
    stats = torch.zeros(2, dtype=torch.float64, device=device)
    data_wait = 0.0
    for a in range(accum):
        t0 = time.perf_counter()
        batch = next(batches)
        data_wait += time.perf_counter() - t0
        sync = a == accum - 1 or not info.distributed
        with contextlib.nullcontext() if sync else ddp.no_sync():
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = task.loss(forward_model, batch, epoch, first_micro + a)
            if on_loss is not None:
                loss = on_loss(step, loss)
            scaler.scale(loss / accum).backward()
        stats[0] += loss.detach().double()
        stats[1] += task.skipped(batch)
    return all_reduce_sum(stats, info), data_wait  # every process sees the same numbers, so all stop together


def optimizer_step(optimizer: torch.optim.Optimizer, scaler, model: nn.Module, stats: torch.Tensor,
                   clip_grad: float | None, skip_on_device: bool) -> None:
    """Clip (optional), step and zero the gradients, with no host sync. skip_on_device: the step changes nothing when
    the loss in `stats` is not finite (fused AdamW's `found_inf`), so the host need not read it first."""
    if skip_on_device:
        optimizer.found_inf = (~torch.isfinite(stats[0])).float()
    if clip_grad is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def train(cfg: RunConfig, task: Task, info: DistInfo,
          on_loss: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
          resume: tuple[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train `task` for cfg.optim.epochs, resuming from {output_dir}/last.pt (or cfg.resume) when present.

    on_loss(step, loss) -> loss: a test hook called on every micro-batch loss (inject NaN, raise to simulate a kill).
    resume: (path, state) already read and checked by the command (`fcmae.engine.resume.prepare_resume`, before its
    data); None: read here. Returns a summary: final step/epoch, last epoch's mean loss, skipped images.
    """
    o, out = cfg.optim, cfg.output_dir
    device, main = info.device, info.is_main
    if resume is None:
        resume = prepare_resume(out, cfg.resume, task.checkpoint_header())
    else:  # the task now knows everything its header holds (e.g. the number of classes in the data)
        check_same_run(resume[1], task.checkpoint_header(), resume[0], explicit=bool(cfg.resume))

    model = task.model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    base_lr = o.lr if o.lr is not None else scaled_lr(o.blr, task.global_batch)
    optimizer = build_adamw(task.param_groups(o.weight_decay), base_lr, o.betas, device)
    dtype = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    # A non-finite loss must never reach the weights. Where the optimizer can skip a step on the device (fused AdamW
    # reading `found_inf`), the loss is read at sync points only; elsewhere (the CPU, where reading is free, or fp16,
    # whose GradScaler owns `found_inf`) before every optimizer step.
    read_every_step = scaler.is_enabled() or not skips_on_device(optimizer)

    progress = Progress()
    last_step = None  # step of the last.pt this process wrote (or resumed from), for the NaN stop
    if resume is not None:
        path, state = resume
        task.model.load_state_dict(state["model"])
        load_optimizer_state(optimizer, state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if _hook(task, "load_extra_state") is not None:
            task.load_extra_state(state)
        progress = Progress(state["epoch"], state.get("epoch_step", 0), state["step"])
        sums = state.get("epoch_sums")
        if progress.epoch_step and sums:
            progress.epoch_loss, progress.epoch_skipped = float(sums["loss"]), int(sums["skipped"])
            progress.epoch_counted = int(sums["steps"])
        last_step = progress.step if os.path.abspath(path) == os.path.abspath(os.path.join(out, ckpt_io.LAST)) \
            else None
        if main and "rng" in state:  # only rank 0's state is saved; others keep their per-rank seeds
            ckpt_io.set_rng_state(state["rng"], device)
        if complete(state, o.epochs):  # nothing to train: say so rather than touch the run's files
            if main:
                ckpt_io.remove_stale_temps(out)  # only what a process killed mid-write left
                print(complete_message(out, state, o.epochs), flush=True)
            return {"epoch": progress.epoch, "step": progress.step, "skipped": 0, "complete": True}
        if main:
            print(f"resumed from {path}: epoch {progress.epoch}, step {progress.step}", flush=True)
    if main:  # every check passed: only now is the run folder touched
        os.makedirs(out, exist_ok=True)
        ckpt_io.remove_stale_temps(out)  # a checkpoint being written when a process died is never resumed from
        save_config(cfg, os.path.join(out, "config.yaml"))

    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if info.distributed else model
    forward_model = torch.compile(ddp) if cfg.compile else ddp
    logger = MetricsLogger(out, enabled=main, tensorboard=cfg.log.tensorboard,
                           resume_step=progress.step if resume is not None else None)
    accum, spe = o.accum_steps, task.steps_per_epoch
    total_steps, warmup_steps = o.epochs * spe, round(o.warmup_epochs * spe)
    summary: dict[str, Any] = {"skipped": 0}
    lr = cosine_lr(progress.step, total_steps, warmup_steps, base_lr, o.min_lr)
    run_t0, run_steps0 = time.time(), progress.step
    after_step, evaluate = _hook(task, "after_step"), _hook(task, "evaluate")
    start = _hook(task, "start")

    def read(log: StepLog, epoch: int) -> tuple[float, int]:
        """Bring the pending steps' numbers to the host (a sync point): stop on a non-finite loss, add them to the
        epoch's sums. -> (loss, skipped) of the newest step."""
        loss, skipped = float("nan"), 0
        for step, loss_sum, skipped in log.read():
            loss = loss_sum / (accum * info.world_size)
            if not math.isfinite(loss):
                raise _diverged(out, epoch, step, loss, last_step) if main else \
                    NonFiniteLossError(f"loss is {loss} at epoch {epoch + 1}, step {step}")
            progress.epoch_loss += loss
            progress.epoch_skipped += skipped
            progress.epoch_counted += 1
        return loss, skipped

    try:
        if main and start is not None:
            baseline = start(resume is not None)
            if baseline:
                logger.log("epoch", progress.step, epoch=progress.epoch, **baseline)
                print(f"epoch {progress.epoch}/{o.epochs}" + _format_metrics(baseline), flush=True)
        model.train()
        while progress.epoch < o.epochs:
            epoch = progress.epoch
            batches = iter(task.batches(epoch, progress.epoch_step * accum))
            bar = progress_bar(spe, progress.epoch_step, f"epoch {epoch + 1}/{o.epochs}", main and cfg.log.progress)
            epoch_t0, epoch_steps, epoch_wait = time.time(), 0, 0.0  # this process's steps (the epoch's img/s)
            log = StepLog()
            while progress.epoch_step < spe:
                lr = cosine_lr(progress.step, total_steps, warmup_steps, base_lr, o.min_lr)
                set_lr(optimizer, lr)
                stats, wait = accumulate(task, forward_model, ddp, batches, scaler, dtype, info, accum, epoch,
                                         progress.epoch_step * accum, progress.step, on_loss)
                log.add(progress.step, stats, wait)
                epoch_wait += wait
                if read_every_step:  # before the optimizer step: a non-finite loss stops the run here
                    step_loss, skipped = read(log, epoch)
                # else the fused step leaves the weights alone when the loss is not finite; read() stops the run
                optimizer_step(optimizer, scaler, model, stats, o.clip_grad, skip_on_device=not read_every_step)
                progress.step += 1
                progress.epoch_step += 1
                epoch_steps += 1
                if after_step is not None:
                    after_step(progress.step)
                bar.update(1)
                log_row = progress.step % cfg.log.every_steps == 0
                save = progress.step % cfg.checkpoint.every_steps == 0 and progress.epoch_step < spe
                if not read_every_step and (log_row or save or progress.epoch_step == spe):
                    step_loss, skipped = read(log, epoch)
                if main and (log_row or save or read_every_step):  # the loss is on the host: show it
                    eta = (time.time() - run_t0) / (progress.step - run_steps0) * (total_steps - progress.step)
                    ips = epoch_steps * task.global_batch / max(time.time() - epoch_t0, 1e-9)
                    bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}", eta=format_eta(eta))
                if main and log_row:  # img/s and data wait over the steps since the previous row
                    n, seconds, waited = log.interval()
                    logger.log("step", progress.step, epoch=epoch, loss=step_loss, lr=lr,
                               img_per_s=n * task.global_batch / max(seconds, 1e-9), skipped=skipped,
                               data_wait=waited / max(seconds, 1e-9))
                if main and save:
                    save_checkpoint(os.path.join(out, ckpt_io.LAST), task, optimizer, scaler, progress, cfg, device)
                    last_step = progress.step
            bar.close()
            bad = nonfinite_tensors(task.model)  # once an epoch: never evaluate, save or export NaN weights
            if bad:
                what = (f"{len(bad)} weight tensors (e.g. {bad[0]}) are NaN or inf after epoch {epoch + 1}, step "
                        f"{progress.step}; stopped before evaluating or saving them")
                raise _diverged(out, epoch, progress.step, math.nan, last_step if main else None, what)
            dt = time.time() - epoch_t0  # the epoch's training time: evaluation, checkpoints and probes left out
            epoch_loss, epoch_skipped = progress.epoch_loss / max(1, progress.epoch_counted), progress.epoch_skipped
            progress = Progress(epoch + 1, 0, progress.step)  # the next epoch's sums start at zero
            last = progress.epoch == o.epochs
            summary.update(epoch=progress.epoch, step=progress.step, loss=epoch_loss)
            summary["skipped"] += epoch_skipped
            evaluated: dict[str, Any] = {}
            if evaluate is not None:
                evaluated = evaluate(epoch)
                model.train()
                summary.update(evaluated)
            if main:
                save_checkpoint(os.path.join(out, ckpt_io.LAST), task, optimizer, scaler, progress, cfg, device)
                last_step = progress.step
                keep = cfg.checkpoint.keep_every_epochs
                if keep and (progress.epoch % keep == 0 or last):
                    save_checkpoint(os.path.join(out, f"checkpoint-epoch{progress.epoch}.pt"), task, optimizer,
                                    scaler, progress, cfg, device)
                extra = {**evaluated, **task.end_of_epoch(epoch, last)}
                ips, wait_share = epoch_steps * task.global_batch / dt, epoch_wait / dt
                logger.log("epoch", progress.step, epoch=progress.epoch, loss=summary["loss"], lr=lr,
                           img_per_s=ips, data_wait=wait_share, skipped=epoch_skipped, seconds=dt, **extra)
                print(f"epoch {progress.epoch}/{o.epochs}  loss {summary['loss']:.4f}  lr {lr:.2e}  {ips:.0f} img/s  "
                      f"data wait {100 * wait_share:.0f}%  skipped {epoch_skipped}  ({dt:.1f}s)"
                      + _format_metrics(extra), flush=True)
    finally:
        logger.close()
    summary.setdefault("step", progress.step)
    summary.setdefault("epoch", progress.epoch)
    return summary
