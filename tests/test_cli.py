import subprocess
import sys

from fcmae.cli import main


def test_help_lists_commands(capsys):
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    assert "demo" in capsys.readouterr().out


def test_demo_loss_falls(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "fcmae", "demo", "--epochs", "2", "--size", "64", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    losses = [float(line.split("loss")[1].split()[0]) for line in out.splitlines() if line.startswith("epoch")]
    assert len(losses) == 2 and losses[1] < losses[0]
