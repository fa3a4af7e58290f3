"""`fcmae pretrain` end to end on CPU: outputs, falling loss, exact resume, crash safety, NaN stop, DDP equivalence."""
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from fcmae.cli import main
from fcmae.config import load_config
from fcmae.data.write_shards import write_shards
from fcmae.engine.loop import NonFiniteLossError
from fcmae.engine.optim import build_adamw
from fcmae.pretrain import pretrain
from fcmae.pretrain_config import PretrainConfig
from imagegen import make_imagefolder, write_broken, write_odd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# atto, 64 px (2x2 patches, 2 masked: the cheapest grid, for the mechanics), tiny decoder, 24 images / global batch 8
# = 3 steps per epoch
BASE = ["device=cpu", "model.decoder_dim=32", "model.mask_ratio=0.5", "data.image_size=64", "model.patch_size=32",
        "data.batch_size=8", "data.num_workers=0", "optim.epochs=2", "optim.warmup_epochs=0", "optim.lr=2e-3",
        "checkpoint.every_steps=1", "checkpoint.keep_every_epochs=1", "log.every_steps=1", "log.vis_every_epochs=1",
        "log.vis_images=2", "log.progress=false", "log.tensorboard=false"]


def config(out, data, *extra):
    return load_config(PretrainConfig, None, BASE + [f"output_dir={out}", f"data.path={data}", *extra])


def epoch_losses(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [r for r in rows if r["kind"] == "epoch"]


def load_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    """An uninterrupted two-epoch run: the oracle for resume and DDP."""
    out = str(tmp_path_factory.mktemp("ref"))
    pretrain(config(out, folder))
    return out


def test_imagefolder_two_epochs_outputs_and_skips(tmp_path):
    data = tmp_path / "data"
    make_imagefolder(str(data), classes=2, per_class=12)
    write_broken(str(data / "class_0" / "img_005.jpg"), "truncated")
    write_broken(str(data / "class_1" / "img_003.jpg"), "zero")
    write_odd(str(data / "class_0" / "img_008.jpg"), "CMYK")
    write_odd(str(data / "class_1" / "img_009.png"), "I;16")
    out = tmp_path / "run"
    assert main(["pretrain", "--config", os.path.join(ROOT, "configs/pretrain/atto.yaml"), *BASE,
                 f"output_dir={out}", f"data.path={data}", "log.tensorboard=true"]) == 0
    for name in ("config.yaml", "last.pt", "checkpoint-epoch1.pt", "checkpoint-epoch2.pt", "metrics.jsonl",
                 "reconstruction-epoch1.png", "reconstruction-epoch2.png"):
        assert (out / name).is_file(), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tb"))
    epochs = epoch_losses(out)
    assert len(epochs) == 2 and epochs[1]["loss"] < epochs[0]["loss"]
    assert [e["skipped"] for e in epochs] == [2, 2]  # the truncated and the zero-byte file, once per epoch
    ckpt = load_state(out / "last.pt")
    assert (ckpt["format"], ckpt["version"], ckpt["epoch"], ckpt["step"]) == ("fcmae", 1, 2, 6)
    assert ckpt["model_args"] == {"encoder_name": "convnextv2_atto", "in_chans": 3, "mask_ratio": 0.5,
                                  "decoder_dim": 32, "decoder_depth": 1, "norm_pix_loss": True, "patch_size": 32}
    assert ckpt["config"]["data"]["path"] == str(data) and "decoder.mask_token" in ckpt["model"]
    assert ckpt["rng"]["torch"].dtype == torch.uint8
    # `fcmae visualize` on the result
    grid = tmp_path / "grid.png"
    assert main(["visualize", str(out / "last.pt"), str(data / "class_0" / "img_000.jpg"),
                 str(data / "class_1" / "img_009.png"), "--out", str(grid)]) == 0
    from PIL import Image
    assert Image.open(grid).size == (4 * 64 + 5 * 2, 2 * 64 + 3 * 2)


def test_webdataset_shards_two_epochs(tmp_path, folder):
    shards = tmp_path / "shards"
    write_shards(folder, str(shards), shard_size=8)
    out = tmp_path / "run"
    summary = pretrain(config(out, f"{shards}/shard-{{000000..000002}}.tar", "data.num_workers=2",
                              "data.shuffle_buffer=8"))
    assert summary["step"] == 6
    epochs = epoch_losses(out)
    assert len(epochs) == 2 and epochs[1]["loss"] < epochs[0]["loss"]
    assert (out / "reconstruction-epoch2.png").is_file() and (out / "config.yaml").is_file()
    assert load_state(out / "last.pt")["step"] == 6


def test_kill_and_resume_equals_uninterrupted(tmp_path, folder, reference, monkeypatch):
    out = str(tmp_path / "run")

    def die_at_step_4(step, loss):  # an exception in the middle of epoch 2
        if step == 4:
            raise KeyboardInterrupt("killed")
        return loss

    with pytest.raises(KeyboardInterrupt):
        pretrain(config(out, folder), on_loss=die_at_step_4)
    assert load_state(os.path.join(out, "last.pt"))["step"] == 4
    # Second attempt dies while writing a checkpoint: the half-written file must never be resumed from.
    real_save, calls = torch.save, []

    def dying_save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 1:
            f.write(b"half a checkpoint")
            raise KeyboardInterrupt("killed while writing")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        pretrain(config(out, folder))
    monkeypatch.setattr(torch, "save", real_save)
    assert load_state(os.path.join(out, "last.pt"))["step"] == 4  # the good one is intact
    with open(os.path.join(out, ".fcmae-tmp.last.pt.99999"), "wb") as f:  # as left by a SIGKILL during the write
        f.write(b"partial")
    pretrain(config(out, folder))  # the same command again: resumes from last.pt
    # no temp file left: neither the dead one's, nor one of this run's (the kill left previous.pt and last.pt as two
    # links to one file, onto which renaming a third link does nothing: issue 24); only the run's lock file
    assert sorted(n for n in os.listdir(out) if n.startswith(".")) == [".fcmae-lock"]
    got, want = load_state(os.path.join(out, "last.pt")), load_state(os.path.join(reference, "last.pt"))
    assert got["step"] == want["step"] == 6
    for k in want["model"]:
        assert torch.equal(got["model"][k], want["model"][k]), k
    for s_got, s_want in zip(got["optimizer"]["state"].values(), want["optimizer"]["state"].values()):
        assert torch.equal(s_got["exp_avg_sq"], s_want["exp_avg_sq"])


def test_nan_loss_stops_and_keeps_last_good(tmp_path, folder):
    out = str(tmp_path / "run")
    # last.pt of step 2 holds the weights whose loss is NaN: rolled back to step 1's, whose loss was finite
    with pytest.raises(NonFiniteLossError, match="loss is nan at epoch 1, step 2.*rolled back .*step 1"):
        pretrain(config(out, folder), on_loss=lambda step, loss: loss * float("nan") if step == 2 else loss)
    ckpt = load_state(os.path.join(out, "last.pt"))
    assert ckpt["step"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_fused_optimizer_reads_the_loss_only_at_sync_points(tmp_path, folder, monkeypatch):
    """With an optimizer that skips a non-finite step on the device (fused AdamW, as on CUDA), the loop reads the loss
    only at log rows, checkpoints and epoch ends; a NaN loss at step 1 leaves the weights alone (step 2's loss is
    finite) and stops the run at the next sync point, naming step 1, with no checkpoint written after it."""
    import fcmae.engine.loop as loop

    monkeypatch.setattr(loop, "build_adamw", lambda g, lr, betas, device: build_adamw(g, lr, betas, torch.device("cuda")))
    reads, real_read = [], loop.StepLog.read
    monkeypatch.setattr(loop.StepLog, "read", lambda self: reads.append(len(self.pending)) or real_read(self))
    losses = {}

    def nan_at_step_1(step, loss):
        losses[step] = loss.item()
        return loss * float("nan") if step == 1 else loss

    out = str(tmp_path / "run")
    args = ("log.every_steps=3", "checkpoint.every_steps=100", "checkpoint.keep_every_epochs=0")
    with pytest.raises(NonFiniteLossError, match="loss is nan at epoch 1, step 1.*no checkpoint"):
        pretrain(config(out, folder, *args), on_loss=nan_at_step_1)
    assert reads == [3] and sorted(losses) == [0, 1, 2] and all(map(math.isfinite, losses.values()))
    assert not os.path.exists(os.path.join(out, "last.pt"))
    pretrain(config(out, folder, *args))  # without the NaN: one read of 3 steps per epoch (log row = epoch end)
    assert reads == [3, 3, 3]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows if r["kind"] == "step"] == [3, 6]
    assert all(0 <= r["data_wait"] <= 1 for r in rows if r["kind"] in ("step", "epoch"))


def test_cli_diverging_run_exits_3_with_message(tmp_path, folder, capsys):
    # lr 1e30 overflows at the second step
    status = main(["pretrain", *BASE, f"output_dir={tmp_path}", f"data.path={folder}", "optim.lr=1e30", "optim.epochs=1"])
    assert status == 3
    err = capsys.readouterr().err
    assert "loss is nan at epoch 1, step 1" in err and "no checkpoint from before the divergence" in err
    assert not (tmp_path / "last.pt").exists()  # step 1's weights gave the NaN and no earlier checkpoint exists


def test_torchrun_two_processes_equal_one(tmp_path, folder, reference):
    out = tmp_path / "ddp"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "fcmae", "pretrain", *BASE, f"output_dir={out}", f"data.path={folder}"]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = load_state(out / "last.pt"), load_state(os.path.join(reference, "last.pt"))
    assert got["step"] == want["step"] == 6
    for k, w in want["model"].items():
        torch.testing.assert_close(got["model"][k], w, rtol=1e-4, atol=1e-5, msg=k)
    assert abs(epoch_losses(out)[-1]["loss"] - epoch_losses(reference)[-1]["loss"]) < 1e-4


def test_digits_holdout_leaves_out_the_finetuning_val_digits():
    """data.digits_holdout=N: pretraining never sees the N digits fine-tuning holds out (data.digits_val=N)."""
    import torch

    from fcmae.data.build import build_image_data
    from fcmae.data.labeled import digits_split
    from fcmae.engine.distributed import DistInfo
    from fcmae.pretrain_config import DataConfig

    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    held = digits_split(10, 500)[1]
    data = build_image_data(DataConfig(format="digits", image_size=32, digits_holdout=500), 1, 64, 1, info, 0)
    assert data.num_samples == 1797 - 500
    kept = {int(f.split("-")[1]) for f in data.dataset.files}
    assert kept.isdisjoint(held) and len(kept) == 1297
    full = build_image_data(DataConfig(format="digits", image_size=32), 1, 64, 1, info, 0)
    assert full.num_samples == 1797
