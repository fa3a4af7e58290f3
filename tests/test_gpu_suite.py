"""bench/gpu_suite.py's bookkeeping on CPU: records merge (newest success wins, failures kept only without one), the
table checks the base targets, and the kill/resume check of a real (tiny) `fcmae pretrain`. The GPU numbers themselves
come from `bash bench/gpu_suite.sh` on a GPU machine (BENCHMARKS.md)."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("gpu_suite", os.path.join(ROOT, "bench", "gpu_suite.py"))
gpu_suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_suite)


def bench_record(date, variant="eager-nchw", packed_x=2.5, mem_x=0.5, mfu=0.4):
    masked = {"img_s": 100.0, "step_ms": 640.0, "peak_mem_gib": 10.0, "mfu": mfu / packed_x, "img_s_x_masked": 1.0,
              "peak_mem_x_masked": 1.0}
    packed = {"img_s": 100.0 * packed_x, "step_ms": 640.0 / packed_x, "peak_mem_gib": 10.0 * mem_x, "mfu": mfu,
              "img_s_x_masked": packed_x, "peak_mem_x_masked": mem_x}
    return {"schema": "fcmae-bench/1", "date": date, "device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0",
            "cuda": "13.0", "cudnn": 91000, "timm": "1.0.22", "model": "convnextv2_base", "variant": variant,
            "batch_size": 64, "image_size": 224, "dtype": "bf16", "backends": {"masked": masked, "packed": packed}}


def failure(name, date):
    return {"schema": "fcmae-failure/1", "name": name, "date": date, "command": "x", "rc": 124, "reason": "timed out"}


def test_merge_keeps_newest_success_and_unmatched_failures(tmp_path):
    name = "bench:convnextv2_base:eager-nchw:bs64:224px:bf16"
    assert gpu_suite.key(bench_record("d")) == name  # the name gpu_suite.sh gives a failed bench run
    records = [bench_record("2026-01-01T00:00:02", packed_x=2.5), bench_record("2026-01-01T00:00:01", packed_x=1.5),
               failure(name, "2026-01-01T00:00:03"),  # a later failure of the same run: the success stays
               failure("bench:convnextv2_large:compile-nchw:bs64:224px:bf16", "2026-01-01T00:00:04")]
    for i, rec in enumerate(records):
        (tmp_path / f"r{i}.json").write_text(json.dumps(rec))
    doc = gpu_suite.merge(gpu_suite.load_records([str(tmp_path)]))
    assert [r["schema"] for r in doc["records"]] == ["fcmae-bench/1", "fcmae-failure/1"]
    assert doc["records"][0]["backends"]["packed"]["img_s_x_masked"] == 2.5  # the newest success
    assert doc["device"] == "NVIDIA H100 80GB HBM3"
    # a merged file merges again to the same records
    (tmp_path / "merged.json").write_text(json.dumps(doc))
    again = gpu_suite.merge(gpu_suite.load_records([str(tmp_path / "merged.json")]))
    assert again["records"] == doc["records"]


@pytest.mark.parametrize("packed_x,mem_x,mfu,verdicts", [
    (2.5, 0.5, 0.40, ["met", "met", "met"]),
    (1.8, 0.7, 0.20, ["NOT met", "NOT met", "NOT met"]),
])
def test_table_checks_base_targets(packed_x, mem_x, mfu, verdicts):
    text = gpu_suite.table(gpu_suite.merge([bench_record("d", packed_x=packed_x, mem_x=mem_x, mfu=mfu)]))
    line = next(line for line in text.splitlines() if line.strip().startswith("targets"))
    assert re.findall(r"\((?:>=|<=) [\d.]+%?: ([A-Za-z ]+)\)", line) == verdicts, line
    assert f"{packed_x:.2f}" in line and f"{100 * mfu:.1f}%" in line


def test_finetune_step_compares_ours_with_timm(tmp_path):
    spec = importlib.util.spec_from_file_location("finetune_step", os.path.join(ROOT, "bench", "finetune_step.py"))
    finetune_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finetune_step)
    path = tmp_path / "ft.json"
    doc = finetune_step.main(["--model", "convnextv2_atto", "--batch-size", "2", "--image-size", "32", "--classes",
                              "3", "--steps", "1", "--warmup", "0", "--device", "cpu", "--json", str(path)])
    assert json.loads(path.read_text()) == doc
    ours, timm_ = doc["steps_compared"]["ours"], doc["steps_compared"]["timm"]
    assert ours["img_s"] > 0 and timm_["img_s"] > 0
    assert doc["ours_x_timm_img_s"] == pytest.approx(ours["img_s"] / timm_["img_s"])
    assert doc["name"] == "finetune-step:convnextv2_atto:eager-nchw:bs2:fp32"
    assert "ours" in gpu_suite.table(gpu_suite.merge([doc]))


def test_e2e_kills_and_resumes_a_real_pretraining(tmp_path):
    """atto at 64 px, 24 images, batch 4: 6 steps per epoch, 2 epochs; killed once step 2 is logged, resumed."""
    data, out = tmp_path / "data", tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    helper = [sys.executable, os.path.join(ROOT, "bench", "gpu_suite.py")]
    subprocess.run(helper + ["jpegs", str(data), "--n", "24", "--width", "72", "--height", "64", "--procs", "1"],
                   check=True, env=env)
    record = tmp_path / "e2e.json"
    cmd = [sys.executable, "-m", "fcmae", "pretrain", "device=cpu", "model.decoder_dim=32", "data.image_size=64",
           "data.batch_size=4", "data.num_workers=0", "optim.epochs=2", "optim.warmup_epochs=0", "optim.lr=2e-3",
           "checkpoint.every_steps=1", "log.every_steps=1", "log.vis_every_epochs=0", "log.progress=false",
           "log.tensorboard=false", f"data.path={data}", f"output_dir={out}"]
    subprocess.run(helper + ["e2e", "--name", "e2e-test", "--model", "convnextv2_atto", "--out", str(out), "--batch",
                             "4", "--epochs", "2", "--total-steps", "12", "--kill-step", "2", "--timeout", "240",
                             "--json", str(record), "--log", str(tmp_path / "log.txt"), "--", *cmd],
                   check=True, env=env)
    doc = json.loads(record.read_text())
    assert doc["killed"] and 1 <= doc["checkpoint_step_at_kill"] < 12  # step 2 may be mid-write
    assert doc["resumed_from_step"] == doc["checkpoint_step_at_kill"] and doc["final_step"] == 12
    assert doc["checks"] == {k: True for k in doc["checks"]} and doc["ok"]
    assert len(doc["epoch_losses"]) == 2 and doc["img_s_whole_run"] > 0
