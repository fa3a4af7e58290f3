import json
import os
import re
import subprocess
import sys

import pytest

from fcmae.cli import main


def test_help_lists_commands(capsys):
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    assert "demo" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    from importlib.metadata import version
    assert capsys.readouterr().out.strip() == f"fcmae {version('fcmae')}"


def test_bench_help_shows_every_default():
    from fcmae.cli import build_parser

    bench = build_parser()._subparsers._group_actions[0].choices["bench"]
    text = " ".join(bench.format_help().split())
    for action in bench._actions:
        if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
            assert action.help, action.option_strings
            default = " ".join(action.default) if isinstance(action.default, list) else action.default
            assert f"(default: {default})" in text, action.option_strings


def demo_args(*argv: str):
    from fcmae.cli import build_parser

    return build_parser().parse_args(["demo", *argv])


def test_demo_full_recipe(tmp_path):
    """--full is the study's recipe that pays (BENCHMARKS.md): 120 FCMAE epochs at batch 32, then 5 labels per class
    at twice the demo's fine-tuning lr, the same for both arms; an explicit --pretrain-epochs still wins."""
    from fcmae.commands.demo import demo_configs

    pre, ft, scratch = demo_configs(demo_args("--full", "--seed", "2"), str(tmp_path))
    default_pre, default_ft, _ = demo_configs(demo_args(), str(tmp_path))
    assert (pre.optim.epochs, pre.data.batch_size, pre.optim.blr, pre.seed) == (120, 32, 1.2e-2, 2)
    assert (ft.data.digits_per_class, ft.data.batch_size, ft.optim.blr) == (5, 25, 2 * default_ft.optim.blr)
    assert ft.optim.epochs == default_ft.optim.epochs and pre.model == default_pre.model
    assert ft.output_dir != scratch.output_dir
    scratch.output_dir = ft.output_dir
    assert scratch == ft  # same recipe, seed and labeled subset; only the init (set by the demo) will differ
    assert demo_configs(demo_args("--full", "--pretrain-epochs", "7"), str(tmp_path))[0].optim.epochs == 7


def test_demo_quick_and_full_exclude_each_other():
    done = subprocess.run([sys.executable, "-m", "fcmae", "demo", "--quick", "--full"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "argument --full: not allowed with argument --quick" in done.stderr


def test_demo_quick_prints_table(tmp_path):
    """The whole demo story in its reduced mode: pretrain, convert, fine-tune twice, the comparison table."""
    out = subprocess.run(
        [sys.executable, "-m", "fcmae", "demo", "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout
    table = {line[:18].strip(): line[18:].split() for line in out.splitlines()
             if line.startswith(("FCMAE-pretrained", "from scratch"))}
    assert set(table) == {"FCMAE-pretrained", "from scratch"}
    for name, run in (("FCMAE-pretrained", "finetune-fcmae"), ("from scratch", "finetune-scratch")):
        rows = [json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")]
        last = [r for r in rows if r["kind"] == "epoch"][-1]
        assert float(table[name][0]) == pytest.approx(last["top1"], abs=0.005)
        assert float(table[name][2]) == pytest.approx(last["ema_top1"], abs=0.005)
    assert (tmp_path / "encoder-timm.safetensors").is_file()
    assert "fresh: head.fc, head.norm" in out
    assert "pretraining on the first 128 of the 1297 digits that are not held out" in out  # --quick says what it uses
    png = out.split("reconstructions: ")[1].split()[0]
    assert os.path.isfile(png)
    check_demo_load_lines(out, tmp_path)
    # the same command again: every stage is complete, says so, and the table is the finished runs' own
    again = subprocess.run([sys.executable, "-m", "fcmae", "demo", "--quick", "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
    assert again.stdout.count("nothing to train") == 3
    rows = [line for line in out.splitlines() if line.startswith(("FCMAE-pretrained", "from scratch", "ConvNeXt V2"))]
    assert [line for line in again.stdout.splitlines() if line in rows] == rows


def check_demo_load_lines(out: str, run: str) -> None:
    """The demo's printed load lines (the backbone's, both fine-tunes'), pasted into a fresh process, build the
    models whose outputs fcmae's own loaders give: our encoder's stage outputs, `fcmae eval`'s logits."""
    import torch

    from conftest import rel_err
    from fcmae.evaluate import load_classifier
    from fcmae.finetune import encoder_from_checkpoint
    from fresh import logits_script, run_fresh
    from test_timm_names import stage_outputs

    lines = out.splitlines()
    backbone = [line.split("  load: ", 1)[1] for line in lines if line.startswith("  load: ")]
    classifiers = [line.strip() for line in lines if line.startswith("  import convnextv2, timm; model = ")]
    assert len(backbone) == 1 and len(classifiers) == 2 and "features_only=True" in backbone[0]
    torch.save(torch.randn(2, 1, 64, 64), os.path.join(run, "x.pt"))
    jobs = [(line, "x.pt", f"out{i}.pt") for i, line in enumerate(backbone + classifiers)]
    assert run_fresh(logits_script(jobs), run).split() == ["False", "True"]
    x = torch.load(os.path.join(run, "x.pt"))
    encoder, _ = encoder_from_checkpoint(os.path.join(run, "pretrain", "last.pt"))
    with torch.no_grad():
        got = torch.load(os.path.join(run, "out0.pt"))
        assert all(torch.equal(a, b) for a, b in zip(got, stage_outputs(encoder, x), strict=True))
        for i, arm in ((1, "finetune-fcmae"), (2, "finetune-scratch")):
            model, _ = load_classifier(os.path.join(run, arm, "model.safetensors"))
            assert rel_err(torch.load(os.path.join(run, f"out{i}.pt")), model.eval()(x)) <= 1e-6


def test_demo_errors_name_the_out_that_continues_it(monkeypatch, tmp_path, capsys):
    """Without --out every demo starts a new folder, so the stages' "rerun the same command" must name the one holding
    the runs so far."""
    from convnextv2.checkpoint.io import WriteError
    from fcmae.commands import demo

    def full_disk(*args):
        raise WriteError("cannot write runs/demo/x/pretrain/last.pt: No space left on device; ... holds step 3: "
                         "rerun the same command to resume")

    monkeypatch.setattr(demo, "stages", full_disk)
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick"]) == 1
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "No space left on device" in line
    assert re.search(r"the same command with --out runs/demo/\d{8}-\d{6}, which holds its runs so far", line), line
