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
