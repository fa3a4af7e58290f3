"""`fcmae bench` runs end to end on a tiny setting and rejects bad options (no timings are asserted)."""
import pytest

from fcmae.cli import main


def test_bench_prints_every_backend(capsys):
    argv = ["bench", "--model", "convnextv2_atto", "--batch-size", "2", "--image-size", "64", "--decoder-dim", "32",
            "--steps", "1", "--warmup", "0", "--device", "cpu", "--backends", "masked,packed,dense", "--channels-last"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[3:]}
    assert set(rows) == {"masked", "packed", "dense"}
    assert rows["masked"][5] == "1.00"  # the ratio column is relative to masked
    assert all(float(r[1]) > 0 for r in rows.values())


@pytest.mark.parametrize("option,message", [
    (["--backends", "masked,sparse"], "unknown backend"),
    (["--image-size", "100"], "multiple of the patch size 32"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_bench_bad_options(option, message, capsys):
    assert main(["bench", "--device", "cpu", *option]) == 2
    assert message in capsys.readouterr().err
