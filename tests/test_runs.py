"""Runs and resume as a new user meets them (issue 15): rerunning into a run folder, continuing from released
weights, resuming without the init file, exact resumed epoch means, the NaN stop's advice, finished runs."""
import json
import os
import shlex

import pytest
import torch

from fcmae.cli import main
from fcmae.config import load_config
from fcmae.engine.distributed import init_distributed
from fcmae.engine.loop import NonFiniteLossError
from fcmae.finetune import finetune
from fcmae.finetune_config import FinetuneConfig
from fcmae.model import FCMAE
from fcmae.pretrain import PretrainTask, pretrain
from fcmae.pretrain_config import PretrainConfig
from imagegen import make_imagefolder

# atto, 64 px (2x2 patches), decoder 32; 24 images / batch 8 = 3 steps per epoch
BASE = ["device=cpu", "model.decoder_dim=32", "model.mask_ratio=0.5", "data.image_size=64", "model.patch_size=32",
        "data.batch_size=8", "data.num_workers=0", "optim.epochs=2", "optim.warmup_epochs=0", "optim.lr=2e-3",
        "checkpoint.every_steps=1", "checkpoint.keep_every_epochs=0", "log.every_steps=1", "log.vis_every_epochs=0",
        "log.progress=false", "log.tensorboard=false"]
FT = ["device=cpu", "data.image_size=64", "data.batch_size=8", "data.eval_batch_size=16", "data.num_workers=0",
      "optim.epochs=2", "optim.warmup_epochs=0.5", "optim.lr=1e-3", "checkpoint.every_steps=1",
      "checkpoint.keep_every_epochs=0", "log.progress=false", "log.tensorboard=false"]


def config(out, data, *extra):
    return load_config(PretrainConfig, None, BASE + [f"output_dir={out}", f"data.path={data}", *extra])


def rows(out, kind):
    return [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if r["kind"] == kind]


def state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def one_error_line(capsys, *words):
    """The one line an error ends with (BASE's 2x2 mask grid also gets its warning line, which is not an error)."""
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "warning: model.patch_size=32 gives a 2x2" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def snapshot(folder):
    """{name: bytes} of a run folder: to show a refused rerun wrote nothing."""
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, n))}


@pytest.fixture(scope="module")
def finished(folder, tmp_path_factory):
    """A finished one-epoch pretraining (3 steps)."""
    out = str(tmp_path_factory.mktemp("finished"))
    pretrain(config(out, folder, "optim.epochs=1"))
    return out


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    """An uninterrupted two-epoch run, mid-epoch checkpoints every 2 steps."""
    out = str(tmp_path_factory.mktemp("ref"))
    pretrain(config(out, folder, "checkpoint.every_steps=2"))
    return out


# --- item 3: another model in an existing run folder --------------------------------------------------------------
@pytest.mark.parametrize("override, words", [
    ("model.decoder_dim=64", ["model.decoder_dim: 32 in the existing run, 64 now", "another output_dir"]),
    ("model.name=convnextv2_femto", ["model.name: 'convnextv2_atto' in the existing run, 'convnextv2_femto' now"]),
    ("model.mask_ratio=0.75", ["model.mask_ratio: 0.5 in the existing run, 0.75 now"]),
])
def test_other_model_in_existing_run_is_refused_before_writing(finished, folder, override, words, capsys):
    before = snapshot(finished)
    assert main(["pretrain", *BASE, f"output_dir={finished}", f"data.path={folder}", "optim.epochs=2", override]) == 2
    one_error_line(capsys, *words)
    assert snapshot(finished) == before  # config.yaml, last.pt, metrics.jsonl untouched


def test_finetune_in_a_pretraining_folder_is_refused(finished, capsys):
    before = snapshot(finished)
    assert main(["finetune", *FT, f"output_dir={finished}", "data.format=digits"]) == 2
    one_error_line(capsys, "holds an FCMAE pretraining run, but this is a fine-tuning", "another output_dir",
                   f"model.init={os.path.join(finished, 'last.pt')}")
    assert snapshot(finished) == before


# --- item 8: a finished run; harmless changes (longer, other log settings) resume ---------------------------------
def test_rerun_of_finished_run_says_complete_then_extends(finished, folder, tmp_path, capsys):
    out = str(tmp_path / "run")
    import shutil
    shutil.copytree(finished, out)
    with open(os.path.join(out, ".draft.tmp-1"), "wb") as f:  # the user's: not fcmae's temp-file prefix
        f.write(b"mine")
    before = snapshot(out)
    with open(os.path.join(out, ".fcmae-tmp.previous.pt.99999"), "wb") as f:  # left by a process killed mid-write
        f.write(b"partial")
    assert main(["pretrain", *BASE, f"output_dir={out}", f"data.path={folder}", "optim.epochs=1"]) == 0
    printed = capsys.readouterr().out
    assert f"the run in {out} is complete (1 epochs, step 3" in printed
    assert "last.pt" in printed and "metrics.jsonl" in printed and "larger optim.epochs" in printed
    assert "steps/epoch" not in printed  # found before the data was loaded
    assert snapshot(out) == before  # nothing rewritten; the dead process's temp file removed, the user's kept
    # more epochs and other log settings are not another model: the run continues
    assert main(["pretrain", *BASE, f"output_dir={out}", f"data.path={folder}", "optim.epochs=2",
                 "log.every_steps=2"]) == 0
    assert state(os.path.join(out, "last.pt"))["step"] == 6


# --- item 6: exact epoch mean after a resume, no duplicate rows ---------------------------------------------------
def test_resumed_epoch_mean_and_rows_equal_uninterrupted(folder, reference, tmp_path):
    out = str(tmp_path / "run")

    def die_at_step_5(step, loss):  # mid epoch 2; the last checkpoint is step 4's, so step 5 is replayed
        if step == 5:
            raise KeyboardInterrupt("killed")
        return loss

    with pytest.raises(KeyboardInterrupt):
        pretrain(config(out, folder, "checkpoint.every_steps=2"), on_loss=die_at_step_5)
    assert state(os.path.join(out, "last.pt"))["step"] == 4
    assert [r["step"] for r in rows(out, "step")] == [1, 2, 3, 4, 5]
    summary = pretrain(config(out, folder, "checkpoint.every_steps=2", "log.tensorboard=true"))  # tb: purge_step
    want = rows(reference, "epoch")
    assert summary["loss"] == want[-1]["loss"]  # exact: the running sums came back with the checkpoint
    assert [(r["epoch"], r["loss"]) for r in rows(out, "epoch")] == [(r["epoch"], r["loss"]) for r in want]
    assert [(r["step"], r["loss"]) for r in rows(out, "step")] == [(r["step"], r["loss"]) for r in rows(reference, "step")]
    assert os.listdir(os.path.join(out, "tb"))


# --- item 7: the NaN stop leaves a checkpoint a lower lr can resume from ------------------------------------------
def test_nan_stop_then_lower_lr_resumes_and_finishes(finished, folder, tmp_path, capsys):
    out = str(tmp_path / "run")
    import shutil
    shutil.copytree(finished, out)  # epoch 1 done at lr 2e-3; epoch 2 at lr 1e12 blows the weights up
    run = ["pretrain", *BASE, f"output_dir={out}", f"data.path={folder}"]
    assert main([*run, "optim.lr=1e12", "accept_changes=[optim.lr]"]) == 3
    err = one_error_line(capsys, "stopped", "rolled back", "optim.lr")
    kept = state(os.path.join(out, "last.pt"))
    # the advice, as printed: the same command with a lower lr, the change accepted -> resumes and finishes
    example = shlex.split(err.rsplit("e.g. ", 1)[1].rstrip("."))
    assert example == ["optim.lr=1e+11", "accept_changes=[optim.lr]"]  # a tenth of the lr that diverged
    assert main([*run, "optim.lr=1e-3", *example[1:]]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert kept["step"] == 3  # the end of epoch 1, from before the blow-up
    assert max(v.abs().max().item() for v in kept["model"].values() if v.is_floating_point()) < 1e3
    done = state(os.path.join(out, "last.pt"))
    assert done["step"] == 6 and all(torch.isfinite(v).all() for v in done["model"].values())
    assert [r["step"] for r in rows(out, "step")] == [1, 2, 3, 4, 5, 6]


# --- item 4: continue pretraining from released weights -----------------------------------------------------------
def fcmae_file(path, decoder_dim=32, seed=1, optimizer=False):
    torch.manual_seed(seed)
    model = FCMAE("convnextv2_atto", decoder_dim=decoder_dim, mask_ratio=0.6)
    args = {"encoder_name": "convnextv2_atto", "in_chans": 3, "mask_ratio": 0.6, "decoder_dim": decoder_dim,
            "decoder_depth": 1, "norm_pix_loss": True}
    torch.save({"format": "fcmae", "version": 1, "model": model.state_dict(), "model_args": args}, path)
    return model.state_dict()


def test_pretrain_model_init_loads_encoder_and_decoder(folder, tmp_path):
    src = fcmae_file(tmp_path / "released.pt")
    cfg = config(tmp_path / "run", folder, f"model.init={tmp_path / 'released.pt'}")
    task = PretrainTask(cfg, init_distributed("cpu"))
    got = task.model.state_dict()
    for k, v in src.items():
        if not k.startswith("encoder.head."):  # the FCMAE encoder's frozen head norm is never trained
            assert torch.equal(got[k], v), k
    assert "decoder: from the file" in task.init_info
    # a timm-format encoder (what `fcmae convert` writes by default): encoder loaded, decoder fresh
    timm_sd = {k[len("encoder."):]: v for k, v in src.items() if k.startswith("encoder.") and ".head." not in k}
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in timm_sd.items()}, str(tmp_path / "timm.safetensors"))
    task = PretrainTask(config(tmp_path / "run", folder, f"model.init={tmp_path / 'timm.safetensors'}"),
                        init_distributed("cpu"))
    assert torch.equal(task.model.state_dict()["encoder.stem.0.weight"], src["encoder.stem.0.weight"])
    assert "decoder: fresh" in task.init_info
    with pytest.raises(ValueError, match="model.init='/no/such.pt' is not a file"):
        config(tmp_path / "new", folder, "model.init=/no/such.pt")


def test_continue_from_converted_weights_cli(folder, tmp_path, capsys):
    fcmae_file(tmp_path / "released.pt")
    assert main(["convert", str(tmp_path / "released.pt"), str(tmp_path / "conv.pt"), "--to", "fcmae",
                 "--decoder-dim", "32"]) == 0
    capsys.readouterr()
    conv = str(tmp_path / "conv.pt")
    # resume= is for our training checkpoints: one line pointing at model.init; nothing written
    assert main(["pretrain", *BASE, f"output_dir={tmp_path / 'a'}", f"data.path={folder}", f"resume={conv}"]) == 2
    one_error_line(capsys, "not an fcmae training checkpoint", f"model.init={conv}")
    assert not (tmp_path / "a").exists()
    # a decoder of another width: one line with the file's values
    assert main(["pretrain", *BASE, f"output_dir={tmp_path / 'b'}", f"data.path={folder}", f"model.init={conv}",
                 "model.decoder_dim=64"]) == 2
    one_error_line(capsys, "decoder of another shape", "model.decoder_dim=32")
    assert main(["pretrain", *BASE, f"output_dir={tmp_path / 'c'}", f"data.path={folder}", f"model.init={conv}",
                 "optim.epochs=1"]) == 0
    assert "initial weights from" in capsys.readouterr().out
    ckpt = state(tmp_path / "c" / "last.pt")
    assert ckpt["step"] == 3 and ckpt["epoch"] == 1  # optimizer and counters start fresh


# --- item 5: a fine-tune resumes once its model.init file is gone -------------------------------------------------
def test_finetune_resumes_without_its_init_file(tmp_path, capsys):
    data = tmp_path / "data"
    make_imagefolder(str(data / "train"), classes=3, per_class=8, seed=0, size=72)
    make_imagefolder(str(data / "val"), classes=3, per_class=4, seed=1, size=72)
    init = tmp_path / "pre.pt"
    fcmae_file(init)
    out = str(tmp_path / "ft")
    args = FT + [f"output_dir={out}", f"data.path={data}", f"model.init={init}", "optim.epochs=1"]

    def kill(step, loss):
        if step == 2:
            raise KeyboardInterrupt
        return loss

    with pytest.raises(KeyboardInterrupt):
        finetune(load_config(FinetuneConfig, None, args), on_loss=kill)
    os.remove(init)
    summary = finetune(load_config(FinetuneConfig, None, args))
    assert summary["step"] == 3 and os.path.isfile(os.path.join(out, "model.safetensors"))
    again = finetune(load_config(FinetuneConfig, None, args))  # finished: says so, trains nothing
    assert again["complete"] and again["step"] == 3
    assert f"the run in {out} is complete" in capsys.readouterr().out
    # a new run still needs the file: one clear error
    with pytest.raises(ValueError, match="model.init=.* is not a file"):
        load_config(FinetuneConfig, None, FT + [f"output_dir={tmp_path / 'new'}", f"data.path={data}",
                                                f"model.init={init}"])


def test_nan_stop_without_checkpoint_says_rerun_starts_afresh(folder, tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(NonFiniteLossError, match="no checkpoint from before the divergence"):
        pretrain(config(out, folder, "optim.lr=1e12"))
    assert not os.path.exists(os.path.join(out, "last.pt"))


@pytest.mark.parametrize("hard_links", [True, False])
def test_last_keeps_previous_and_rolls_back(tmp_path, monkeypatch, hard_links):
    from fcmae.engine import checkpoint as ckpt_io

    if not hard_links:
        def no_link(*a):
            raise OSError("no hard links here")
        monkeypatch.setattr(os, "link", no_link)
    last = str(tmp_path / "last.pt")
    ckpt_io.save_last({"step": 1}, last)
    assert not (tmp_path / "previous.pt").exists()
    ckpt_io.save_last({"step": 2}, last)
    assert state(tmp_path / "previous.pt")["step"] == 1 and state(last)["step"] == 2
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "previous.pt"]  # no temp files left
    assert ckpt_io.rollback_last(str(tmp_path)) == 1
    assert state(last)["step"] == 1 and not (tmp_path / "previous.pt").exists()
    assert ckpt_io.rollback_last(str(tmp_path)) is None and not os.path.exists(last)
    # a process killed between keeping previous.pt and replacing last.pt leaves them one file (two links)
    ckpt_io.save_last({"step": 3}, last)
    if hard_links:
        os.link(last, tmp_path / "previous.pt")
    else:
        ckpt_io.save_atomic({"step": 3}, str(tmp_path / "previous.pt"))
    ckpt_io.save_last({"step": 4}, last)
    assert state(tmp_path / "previous.pt")["step"] == 3 and state(last)["step"] == 4
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "previous.pt"]
