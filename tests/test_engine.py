"""Engine pieces: weight-decay groups, the AdamW kernels and the warmup + cosine schedule (the formulas of docs/method.md)."""
import json
import math
import time

import pytest
import torch

from fcmae.engine.config import LogConfig, OptimConfig, RunConfig
from fcmae.engine.distributed import DistInfo
from fcmae.engine.loop import train

from fcmae.engine.optim import (build_adamw, cosine_lr, load_optimizer_state, param_groups, scaled_lr, set_lr,
                                skips_on_device)
from fcmae.model import FCMAE


def test_no_decay_on_bias_1d_and_mask_token():
    model = FCMAE("convnextv2_atto", decoder_dim=32)
    groups = {g["weight_decay"]: g["param_names"] for g in param_groups(model, 0.05, ["decoder.mask_token"])}
    assert set(groups) == {0.0, 0.05}
    params = dict(model.named_parameters())
    for name in groups[0.05]:
        assert params[name].ndim > 1 and not name.endswith(".bias") and name != "decoder.mask_token"
    assert "decoder.mask_token" in groups[0.0] and "encoder.stages.0.blocks.0.mlp.grn.weight" in groups[0.0]
    assert not any(n.startswith("encoder.head") for g in groups.values() for n in g)  # frozen, unused
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert set(groups[0.0]) | set(groups[0.05]) == trainable
    opt = build_adamw(param_groups(model, 0.05), 1e-3, (0.9, 0.95))
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_lr_schedule():
    assert scaled_lr(1.5e-4, 4096) == 1.5e-4 * 16
    base, total, warm = 2.4e-3, 1000, 50
    assert cosine_lr(0, total, warm, base) == 0.0
    assert math.isclose(cosine_lr(25, total, warm, base), base / 2)
    assert math.isclose(cosine_lr(warm, total, warm, base), base)
    mid = warm + (total - warm) // 2
    assert math.isclose(cosine_lr(mid, total, warm, base, 1e-6), 1e-6 + (base - 1e-6) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert math.isclose(cosine_lr(total, total, warm, base, 1e-6), 1e-6)


def _trained(opt_factory, steps=4):
    """A small model after `steps` AdamW steps (two groups: decayed and not, one with an lr scale) on fixed data."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    groups = param_groups(model, 0.05, lr_scales={"2.weight": 0.5})
    opt = opt_factory(groups)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        set_lr(opt, 1e-2 * (step + 1) / steps)
        opt.zero_grad()
        model(torch.randn(8, 16, generator=g)).pow(2).mean().backward()
        opt.step()
    return model, opt


def test_adamw_kernels_give_todays_update():
    """build_adamw: foreach on the CPU (bitwise torch's per-tensor default, so CPU runs keep their numbers), fused on
    CUDA; the fused kernel's update equals it to float rounding."""
    plain, _ = _trained(lambda g: torch.optim.AdamW([{k: v for k, v in x.items() if k != "param_names"} for x in g],
                                                    lr=1e-3, betas=(0.9, 0.95), foreach=False))
    ours, opt = _trained(lambda g: build_adamw(g, 1e-3, (0.9, 0.95), torch.device("cpu")))
    fused, fused_opt = _trained(lambda g: build_adamw(g, 1e-3, (0.9, 0.95), torch.device("cuda")))  # CPU params
    assert opt.param_groups[0]["foreach"] and not opt.param_groups[0]["fused"] and not skips_on_device(opt)
    assert fused_opt.param_groups[0]["fused"] and skips_on_device(fused_opt)
    for p, q, f in zip(plain.parameters(), ours.parameters(), fused.parameters()):
        assert torch.equal(p, q)
        torch.testing.assert_close(f, p, rtol=1e-6, atol=1e-7)


def test_fused_adamw_skips_a_step_on_the_device_and_loading_keeps_the_kernel():
    model, opt = _trained(lambda g: build_adamw(g, 1e-3, (0.9, 0.95), torch.device("cuda")))
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    model(torch.randn(8, 16)).pow(2).mean().backward()
    opt.found_inf = torch.ones(())  # what the loop sets for a step whose loss is not finite
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    after = opt.state[next(model.parameters())]
    assert all(torch.equal(after[k], v) for k, v in state.items())  # step count and moments untouched
    # a state_dict written by the foreach kernel (a CPU run) does not switch a CUDA run's optimizer off fused
    _, cpu_opt = _trained(lambda g: build_adamw(g, 1e-3, (0.9, 0.95), torch.device("cpu")))
    load_optimizer_state(opt, cpu_opt.state_dict())
    assert skips_on_device(opt)


class SlowLoaderTask:
    """A minimal `Task`: a linear model on random batches; its loader sleeps `delay` s before each micro-batch."""

    def __init__(self, delay: float, steps_per_epoch: int = 4):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(8, 1)
        self.global_batch, self.steps_per_epoch, self.delay = 4, steps_per_epoch, delay

    def param_groups(self, weight_decay):
        return param_groups(self.model, weight_decay)

    def batches(self, epoch, skip_micro):
        for _ in range(self.steps_per_epoch - skip_micro):
            time.sleep(self.delay)
            yield torch.randn(4, 8)

    def loss(self, model, batch, epoch, micro):
        time.sleep(0.02)  # the step's own work
        return model(batch).pow(2).mean()

    def skipped(self, batch):
        return 0

    def checkpoint_header(self):
        return {"format": "test", "version": 1, "model_args": {}}

    def end_of_epoch(self, epoch, last):
        return {}


@pytest.mark.parametrize("delay,low,high", [(0.0, 0.0, 0.2), (0.1, 0.6, 1.0)])
def test_data_wait_share(tmp_path, capsys, delay, low, high):
    """The share of step time spent waiting for the loader, in step rows, epoch rows and the epoch line: near 0 when
    the loader keeps up, most of it when the loader is slow (0.1 s per batch against a 0.02 s step)."""
    cfg = RunConfig(output_dir=str(tmp_path), device="cpu", optim=OptimConfig(epochs=1, warmup_epochs=0, lr=1e-3),
                    log=LogConfig(every_steps=2, progress=False, tensorboard=False))
    train(cfg, SlowLoaderTask(delay), DistInfo())
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    shares = [r["data_wait"] for r in rows]
    assert [r["kind"] for r in rows] == ["step", "step", "epoch"]
    assert all(low <= s <= high for s in shares), shares
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("epoch 1/1"))
    assert f"data wait {100 * shares[-1]:.0f}%" in line


def test_checkpoint_housekeeping_touches_only_its_own_files(tmp_path):
    """remove_stale_temps deletes fcmae's temp files and folders only; rollback_last reads previous.pt safely and,
    when it is damaged, leaves no last.pt to resume from instead of a traceback."""
    from convnextv2.checkpoint.io import TMP_PREFIX
    from fcmae.engine import checkpoint as ckpt_io

    (tmp_path / f"{TMP_PREFIX}last.pt.123").write_bytes(b"half")
    (tmp_path / f"{TMP_PREFIX}model.1a2b").mkdir()  # a folder output being assembled when its process died
    (tmp_path / f"{TMP_PREFIX}model.1a2b" / "config.json").write_text("{}")
    (tmp_path / ".draft.tmp-1").write_text("the user's")
    assert len(ckpt_io.remove_stale_temps(str(tmp_path))) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".draft.tmp-1"]

    ckpt_io.save_atomic({"step": torch.tensor(4), "model": {}}, str(tmp_path / ckpt_io.LAST))
    ckpt_io.save_atomic({"step": 3, "model": {}}, str(tmp_path / ckpt_io.PREVIOUS))
    assert ckpt_io.rollback_last(str(tmp_path)) == 3 and not (tmp_path / ckpt_io.PREVIOUS).exists()
    ckpt_io.save_last({"step": 5, "model": {}}, str(tmp_path / ckpt_io.LAST))  # keeps the step-3 file as previous
    (tmp_path / ckpt_io.PREVIOUS).unlink()
    (tmp_path / ckpt_io.PREVIOUS).write_bytes(b"PK\x03\x04 cut short")
    assert ckpt_io.rollback_last(str(tmp_path)) is None and not (tmp_path / ckpt_io.LAST).exists()


@pytest.mark.parametrize("resume, last_step, advice", [
    (None, 8, "runs/x/last.pt holds step 8: rerun the same command to resume"),
    ("/old/last.pt", 8, "runs/x/last.pt holds step 8: rerun the same command without resume= to resume"),
    ("/old/last.pt", None, "no checkpoint was written yet: rerun the same command to start again"),
])
def test_a_stopped_run_names_the_rerun_that_continues_it(resume, last_step, advice):
    """With resume= the same command would go back to that file, past the steps this run saved in its own last.pt."""
    from types import SimpleNamespace

    from fcmae.engine.loop import _Run

    run = SimpleNamespace(main=True, out="runs/x", last_step=last_step, cfg=SimpleNamespace(resume=resume))
    assert _Run._kept(run) == advice
