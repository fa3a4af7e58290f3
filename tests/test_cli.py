import json
import os
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
