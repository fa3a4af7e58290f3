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
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from convnextv2.checkpoint.io import WriteError
from fcmae.config import to_dict
from fcmae.engine import checkpoint as ckpt_io
from fcmae.engine.config import RunConfig
from fcmae.engine.distributed import DistInfo, all_reduce_sum
from fcmae.engine.errors import DataReadError
from fcmae.engine.metrics import MetricsLogger, format_eta, progress_bar
from fcmae.engine.optim import (build_adamw, check_optimizer_state, cosine_lr, load_optimizer_state, scaled_lr, set_lr,
                                skips_on_device)
from fcmae.engine.resume import check_same_run, complete, finished_run, prepare_resume
from fcmae.engine.rundir import RunDir, claim
from fcmae.engine.stop import Interrupted, StopSignals


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
    #   outputs: tuple[str, ...]                  fnmatch patterns of the names it writes in output_dir besides the
    #                                             loop's (fcmae.engine.rundir: a fresh run never overwrites them)
    #   finish() -> dict[str, str]                rank 0, once after the last epoch: writes the run's final files
    #                                             (e.g. exported weights); returns {name: path} of them


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


def _diverged(out: str, epoch: int, step: int, loss: float, last_step: int | None, lr: float,
              what: str | None = None) -> NonFiniteLossError:
    """The NaN stop: roll last.pt back when its own weights gave this loss, and say what a rerun resumes from and
    the command that does it (a changed optim.* key must be accepted: fcmae.engine.changes). lr: the peak lr now.
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
        f"{what}; {where}. To resume, rerun the same command with a lower optim.lr (or optim.blr), a larger "
        "optim.warmup_epochs or an optim.clip_grad, and accept the change it makes to the run's config, e.g. "
        f"optim.lr={lr / 10:.2g} 'accept_changes=[optim.lr]'."
    )


class StepLog:
    """What the host knows of the steps since it last read the device: their stats stay on the device until `read`.

    Reading a number from a GPU waits for every queued kernel, so the loop reads the loss only at sync points (log
    rows, checkpoints, epoch ends; every step where the optimizer cannot skip a non-finite step on the device).
    Between them each step only appends its all-reduced (loss sum, skipped) tensor. Also times the interval since the
    last step row (img/s) and the time spent waiting for the data loader (`data_wait`, a share of wall time).
    """

    def __init__(self) -> None:
        self.pending: list[tuple[int, torch.Tensor]] = []  # (steps done before it, stats (3,) on the device)
        self.interval_t0, self.interval_steps, self.interval_wait = time.perf_counter(), 0, 0.0
        self.stop = False  # a read step carried some process's stop request (SIGINT / SIGTERM)

    def add(self, step: int, stats: torch.Tensor, data_wait: float) -> None:
        self.pending.append((step, stats))
        self.interval_steps += 1
        self.interval_wait += data_wait

    def read(self) -> list[tuple[int, float, int]]:
        """-> [(step, summed loss, skipped)] of the pending steps, in one device-to-host copy (and `stop`)."""
        if not self.pending:
            return []
        values = torch.stack([stats for _, stats in self.pending]).tolist()
        rows = [(step, loss, int(skipped)) for (step, _), (loss, skipped, _) in zip(self.pending, values)]
        self.stop = self.stop or any(stop > 0 for _, _, stop in values)
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
               on_loss: Callable[[int, torch.Tensor], torch.Tensor] | None,
               stop: bool = False) -> tuple[torch.Tensor, float]:
    """Forward and backward of one optimizer step's `accum` micro-batches, with no host sync.

    -> (stats, data_wait): stats (3,) float64 on the device, all-reduced over processes: the summed micro-batch
    losses, the unreadable images replaced, and how many processes ask to stop (`stop`: a SIGINT / SIGTERM arrived),
    so that every process learns of it at the same step; data_wait: seconds spent waiting for the loader.
    """
    device = info.device
    stats = torch.zeros(3, dtype=torch.float64, device=device)
    if stop:
        stats[2] = 1.0
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
          resume: tuple[str, dict[str, Any]] | None = None, run_dir: RunDir | None = None) -> dict[str, Any]:
    """Train `task` for cfg.optim.epochs, resuming from {output_dir}/last.pt (or cfg.resume) when present.

    on_loss(step, loss) -> loss: a test hook called on every micro-batch loss (inject NaN, raise to simulate a kill).
    resume, run_dir: the checkpoint (path, state) and the claimed output_dir, already read, checked and locked by
    the command before its data (`prepare_resume`, `fcmae.engine.rundir.claim`); None: done here (and the folder's
    lock released on return). Returns a summary: final step/epoch, last epoch's mean loss, skipped images.
    """
    header = task.checkpoint_header()
    if run_dir is None:
        if resume is None:
            shapes = {k: v.shape for k, v in task.model.state_dict().items()}
            resume = prepare_resume(cfg.output_dir, cfg.resume, header, shapes)
        claimed = claim(cfg, info, resume, header, getattr(task, "outputs", ()))
        try:
            return train(cfg, task, info, on_loss, resume, claimed)
        finally:
            claimed.release()
    if resume is not None:  # the task now knows everything its header holds (e.g. the number of classes in the data)
        check_same_run(resume[1], header, resume[0], explicit=bool(cfg.resume))
    run = _Run(cfg, task, info, on_loss)
    if resume is not None:
        done = run.restore(*resume)
        if done is not None:
            return done
    # every check passed: only now is the run folder touched
    run_dir.start(cfg, resume[0] if resume is not None else None, run.progress.step, run.progress.epoch)
    return run.fit(resumed=resume is not None)


class _Run:
    """One call of `train`: the model, optimizer and counters, and what a step and an epoch do with them."""

    def __init__(self, cfg: RunConfig, task: Task, info: DistInfo,
                 on_loss: Callable[[int, torch.Tensor], torch.Tensor] | None) -> None:
        o = cfg.optim
        self.cfg, self.task, self.info, self.on_loss = cfg, task, info, on_loss
        self.out, self.main, self.device = cfg.output_dir, info.is_main, info.device
        self.model = task.model.to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.base_lr = o.lr if o.lr is not None else scaled_lr(o.blr, task.global_batch)
        self.optimizer = build_adamw(task.param_groups(o.weight_decay), self.base_lr, o.betas, self.device)
        self.dtype = amp_dtype(cfg.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        # A non-finite loss must never reach the weights. Where the optimizer can skip a step on the device (fused
        # AdamW reading `found_inf`), the loss is read at sync points only; elsewhere (the CPU, where reading is free,
        # or fp16, whose GradScaler owns `found_inf`) before every optimizer step.
        self.read_every_step = self.scaler.is_enabled() or not skips_on_device(self.optimizer)
        self.progress = Progress()
        self.last_step: int | None = None  # step of the last.pt this process wrote (or resumed from): the NaN stop
        spe = task.steps_per_epoch
        self.total_steps, self.warmup_steps = o.epochs * spe, round(o.warmup_epochs * spe)
        self.after_step, self.evaluate = _hook(task, "after_step"), _hook(task, "evaluate")

    def restore(self, path: str, state: dict[str, Any]) -> dict[str, Any] | None:
        """Load a checkpoint's weights, optimizer, counters and RNG. -> the summary when it finished the run already."""
        # the tensors were checked when the checkpoint was read (resume.prepare_resume); the moments' shapes need
        # this run's optimizer
        names = {id(p): n for n, p in self.task.model.named_parameters()}
        check_optimizer_state(self.optimizer, state["optimizer"], path, names)
        self.task.model.load_state_dict(state["model"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if _hook(self.task, "load_extra_state") is not None:
            self.task.load_extra_state(state)
        p = self.progress = Progress(state["epoch"], state.get("epoch_step", 0), state["step"])
        sums = state.get("epoch_sums")
        if p.epoch_step and sums:
            p.epoch_loss, p.epoch_skipped = float(sums["loss"]), int(sums["skipped"])
            p.epoch_counted = int(sums["steps"])
        if os.path.abspath(path) == os.path.abspath(os.path.join(self.out, ckpt_io.LAST)):
            self.last_step = p.step
        if self.main and "rng" in state:  # only rank 0's state is saved; others keep their per-rank seeds
            ckpt_io.set_rng_state(state["rng"], self.device)
        if complete(state, self.cfg.optim.epochs):  # nothing to train: say so rather than touch the run's files
            return finished_run(self.out, state, self.cfg.optim.epochs, self.main)
        if self.main:
            print(f"resumed from {path}: epoch {p.epoch}, step {p.step}", flush=True)
        return None

    def fit(self, resumed: bool) -> dict[str, Any]:
        """Train the epochs left. -> final step/epoch, the last epoch's mean loss and metrics, skipped images."""
        cfg, info = self.cfg, self.info
        self.ddp = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                           else None) if info.distributed else self.model
        self.forward_model = torch.compile(self.ddp) if cfg.compile else self.ddp
        self.run_t0, self.run_steps0 = time.time(), self.progress.step
        self.lr = cosine_lr(self.progress.step, self.total_steps, self.warmup_steps, self.base_lr, cfg.optim.min_lr)
        self.stop = StopSignals.installed()  # a command's Ctrl-C / SIGTERM handlers (None: a library call)
        self.bar = None  # the epoch's progress bar
        self.logger: MetricsLogger | None = None
        summary: dict[str, Any] = {"skipped": 0}
        try:
            # a fresh start drops the rows of an earlier attempt that wrote no checkpoint (its steps are replayed)
            self.logger = MetricsLogger(self.out, enabled=self.main, tensorboard=cfg.log.tensorboard,
                                        resume_step=self.progress.step if resumed else -1, config=cfg)
            start = _hook(self.task, "start")
            if self.main and start is not None:
                baseline = start(resumed)
                if baseline:
                    self.logger.log("epoch", self.progress.step, epoch=self.progress.epoch, **baseline)
                    print(f"epoch {self.progress.epoch}/{cfg.optim.epochs}" + _format_metrics(baseline), flush=True)
            self.model.train()
            while self.progress.epoch < cfg.optim.epochs:
                epoch = self.progress.epoch
                with self.stop.deferred() if self.stop is not None else contextlib.nullcontext():
                    steps, waited, seconds = self._train_epoch(epoch)
                self._end_epoch(epoch, steps, waited, seconds, summary)
            if self.main:  # the files the run leaves, recorded (as paths) with its tracked runs
                finish = _hook(self.task, "finish")
                self.logger.log_outputs({"checkpoint": os.path.join(self.out, ckpt_io.LAST),
                                         **(finish() if finish is not None else {})})
            logger, self.logger = self.logger, None
            logger.close("finished")
        except BaseException as e:
            if self.bar is not None:  # cleared: the line saying what happened starts on a line of its own
                self.bar.close()
            if self.logger is not None:  # the error in flight says what went wrong: the logger's own are ignored
                self.logger.close("killed" if isinstance(e, KeyboardInterrupt) else "failed", quiet=True)
            explained = self._explained(e)
            if explained is e:
                raise
            raise explained from None
        summary.setdefault("step", self.progress.step)
        summary.setdefault("epoch", self.progress.epoch)
        return summary

    def _train_epoch(self, epoch: int) -> tuple[int, float, float]:
        """The optimizer steps left in `epoch`. -> (steps this process made, seconds it waited for data, seconds)."""
        cfg, task, p = self.cfg, self.task, self.progress
        accum, spe = cfg.optim.accum_steps, task.steps_per_epoch
        batches = iter(task.batches(epoch, p.epoch_step * accum))
        bar = self.bar = progress_bar(spe, p.epoch_step, f"epoch {epoch + 1}/{cfg.optim.epochs}",
                                      self.main and cfg.log.progress)
        t0, steps, waited = time.time(), 0, 0.0
        log = StepLog()
        while p.epoch_step < spe:
            self.lr = cosine_lr(p.step, self.total_steps, self.warmup_steps, self.base_lr, cfg.optim.min_lr)
            set_lr(self.optimizer, self.lr)
            stats, wait = accumulate(task, self.forward_model, self.ddp, batches, self.scaler, self.dtype, self.info,
                                     accum, epoch, p.epoch_step * accum, p.step, self.on_loss,
                                     stop=self.stop is not None and self.stop.signum is not None)
            log.add(p.step, stats, wait)
            waited += wait
            if self.read_every_step:  # before the optimizer step: a non-finite loss stops the run here
                loss, skipped = self._read(log, epoch)
            # else the fused step leaves the weights alone when the loss is not finite; _read() stops the run
            optimizer_step(self.optimizer, self.scaler, self.model, stats, cfg.optim.clip_grad,
                           skip_on_device=not self.read_every_step)
            p.step += 1
            p.epoch_step += 1
            steps += 1
            if self.after_step is not None:
                self.after_step(p.step)
            bar.update(1)
            log_row = p.step % cfg.log.every_steps == 0
            save = p.step % cfg.checkpoint.every_steps == 0 and p.epoch_step < spe
            if not self.read_every_step and (log_row or save or p.epoch_step == spe):
                loss, skipped = self._read(log, epoch)
            if self.main and (log_row or save or self.read_every_step):  # the loss is on the host: show it
                eta = (time.time() - self.run_t0) / (p.step - self.run_steps0) * (self.total_steps - p.step)
                ips = steps * task.global_batch / max(time.time() - t0, 1e-9)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.lr:.2e}", img_s=f"{ips:.0f}", eta=format_eta(eta))
            if self.main and log_row:  # img/s and data wait over the steps since the previous row
                n, seconds, interval_wait = log.interval()
                self.logger.log("step", p.step, epoch=epoch, loss=loss, lr=self.lr, skipped=skipped,
                                img_per_s=n * task.global_batch / max(seconds, 1e-9),
                                data_wait=interval_wait / max(seconds, 1e-9))
            if self.main and save:
                self._save(os.path.join(self.out, ckpt_io.LAST))
            if self.stop is not None and (log.stop if self.info.distributed else self.stop.signum is not None):
                raise self._interrupt(epoch, log)
        bar.close()
        return steps, waited, time.time() - t0  # the epoch's training time: no evaluation, checkpoint or probe

    def _interrupt(self, epoch: int, log: StepLog) -> Interrupted:
        """A stop asked for (SIGINT / SIGTERM) after this optimizer step: read its numbers (a non-finite loss still
        stops the run as such), write last.pt (rank 0) -> the Interrupted to raise."""
        self._read(log, epoch)
        if self.main and self.last_step != self.progress.step:
            self._save(os.path.join(self.out, ckpt_io.LAST))
        signum = self.stop.signum or signal.SIGTERM  # SIGTERM: this process stops because another one was signalled
        return Interrupted(signum, f"at epoch {epoch + 1}, step {self.progress.step}; {self._kept()}")

    def _kept(self) -> str:
        """What a rerun of the same command starts from (a rerun with `resume=` would go back to that file: once this
        run wrote its own last.pt, the rerun leaves resume= out)."""
        if not self.main:
            return f"process {self.info.rank} of {self.info.world_size}; process 0 says what last.pt holds"
        if self.last_step is None:
            return "no checkpoint was written yet: rerun the same command to start again"
        rerun = "rerun the same command" + (" without resume=" if self.cfg.resume else "")
        return f"{os.path.join(self.out, ckpt_io.LAST)} holds step {self.last_step}: {rerun} to resume"

    def _explained(self, e: BaseException) -> BaseException:
        """An interruption or a failed write (a full disk) that stopped training, with what last.pt holds and how to
        go on; any other error as it is."""
        if isinstance(e, Interrupted) and not e.where:  # a second signal, or one outside the steps: stopped at once
            return Interrupted(e.signum, f"at epoch {self.progress.epoch + 1}, step {self.progress.step}; "
                                         f"{self._kept()}")
        if isinstance(e, DataReadError):  # the data source, not the run, failed: resume once it is back
            return DataReadError(f"{e}; {self._kept()} once {e.fix}", e.fix)
        if isinstance(e, WriteError):
            error = WriteError(f"{e}; {self._kept()}")
            error.errno = e.errno
            return error
        return e

    def _read(self, log: StepLog, epoch: int) -> tuple[float, int]:
        """Bring the pending steps' numbers to the host (a sync point): stop on a non-finite loss, add them to the
        epoch's sums. -> (loss, skipped) of the newest step."""
        loss, skipped, p = float("nan"), 0, self.progress
        for step, loss_sum, skipped in log.read():
            loss = loss_sum / (self.cfg.optim.accum_steps * self.info.world_size)
            if not math.isfinite(loss):
                raise _diverged(self.out, epoch, step, loss, self.last_step, self.base_lr) if self.main else \
                    NonFiniteLossError(f"loss is {loss} at epoch {epoch + 1}, step {step}")
            p.epoch_loss += loss
            p.epoch_skipped += skipped
            p.epoch_counted += 1
        return loss, skipped

    def _end_epoch(self, epoch: int, steps: int, waited: float, seconds: float, summary: dict[str, Any]) -> None:
        """Check the weights, evaluate, write the checkpoints, log and print the epoch line; update `summary`."""
        cfg, p = self.cfg, self.progress
        bad = nonfinite_tensors(self.task.model)  # once an epoch: never evaluate, save or export NaN weights
        if bad:
            what = (f"{len(bad)} weight tensors (e.g. {bad[0]}) are NaN or inf after epoch {epoch + 1}, step "
                    f"{p.step}; stopped before evaluating or saving them")
            raise _diverged(self.out, epoch, p.step, math.nan, self.last_step if self.main else None, self.base_lr,
                            what)
        loss, skipped = p.epoch_loss / max(1, p.epoch_counted), p.epoch_skipped
        p = self.progress = Progress(epoch + 1, 0, p.step)  # the next epoch's sums start at zero
        last = p.epoch == cfg.optim.epochs
        summary.update(epoch=p.epoch, step=p.step, loss=loss)
        summary["skipped"] += skipped
        evaluated: dict[str, Any] = {}
        if self.evaluate is not None:
            evaluated = self.evaluate(epoch)
            self.model.train()
            summary.update(evaluated)
        if not self.main:
            return
        self._save(os.path.join(self.out, ckpt_io.LAST))
        keep = cfg.checkpoint.keep_every_epochs
        if keep and (p.epoch % keep == 0 or last):
            self._save(os.path.join(self.out, f"checkpoint-epoch{p.epoch}.pt"))
        extra = {**evaluated, **self.task.end_of_epoch(epoch, last)}
        seconds = max(seconds, 1e-9)  # an epoch resumed after its last step trains none
        ips, wait_share = steps * self.task.global_batch / seconds, waited / seconds
        self.logger.log("epoch", p.step, epoch=p.epoch, loss=loss, lr=self.lr, img_per_s=ips, data_wait=wait_share,
                        skipped=skipped, seconds=seconds, **extra)
        print(f"epoch {p.epoch}/{cfg.optim.epochs}  loss {loss:.4f}  lr {self.lr:.2e}  {ips:.0f} img/s  "
              f"data wait {100 * wait_share:.0f}%  skipped {skipped}  ({seconds:.1f}s)" + _format_metrics(extra),
              flush=True)

    def _save(self, path: str) -> None:
        save_checkpoint(path, self.task, self.optimizer, self.scaler, self.progress, self.cfg, self.device)
        if os.path.basename(path) == ckpt_io.LAST:
            self.last_step = self.progress.step
