"""The one GPU call on CPU: bench/gpu_suite.py's bookkeeping (records merge: newest success wins, failures kept only
without one, runs told apart by every setting; the table checks the base targets) and bench/gpu_call.sh's dry run
(every step in priority order, a real `fcmae pretrain` killed and resumed, records merged after each step, steps
skipped when the call's deadline is near). The GPU numbers themselves come from `bash bench/gpu_call.sh` on a GPU
machine (BENCHMARKS.md, "GPU runs")."""
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


def bench_record(date, variant="eager-nchw", packed_x=2.5, mem_x=0.5, mfu=0.4, dense_x=2.2, backends=None):
    rows = {
        "masked": {"img_s": 100.0, "step_ms": 640.0, "peak_mem_gib": 10.0, "mfu": mfu / packed_x},
        "packed": {"img_s": 100.0 * packed_x, "step_ms": 640.0 / packed_x, "peak_mem_gib": 10.0 * mem_x, "mfu": mfu},
        "dense": {"img_s": 100.0 * packed_x / dense_x, "step_ms": 640.0 * dense_x / packed_x, "peak_mem_gib": 12.0,
                  "mfu": mfu / dense_x},
    }
    for r in rows.values():
        r["img_s_x_masked"], r["peak_mem_x_masked"] = r["img_s"] / 100.0, r["peak_mem_gib"] / 10.0
    backends = backends or ["masked", "packed", "dense"]
    return {"schema": "fcmae-bench/1", "date": date, "device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0",
            "cuda": "13.0", "cudnn": 91000, "timm": "1.0.31", "model": "convnextv2_base", "variant": variant,
            "compile": variant.startswith("compile"), "batch_size": 64, "image_size": 224, "dtype": "bf16",
            "patch_size": 32, "mask_ratio": 0.6, "decoder_dim": 512, "backends_asked": backends,
            "backends": {b: rows[b] for b in backends}}


def failure(name, date):
    return {"schema": "fcmae-failure/1", "name": name, "date": date, "command": "x", "rc": 124, "reason": "timed out"}


def test_merge_keeps_newest_success_and_unmatched_failures(tmp_path):
    name = gpu_suite.key(bench_record("d"))
    assert name == "bench:convnextv2_base:eager-nchw:bs64:224px:bf16:p32:m0.6:d512:dense,masked,packed"
    records = [bench_record("2026-01-01T00:00:02", packed_x=2.5), bench_record("2026-01-01T00:00:01", packed_x=1.5),
               failure(name, "2026-01-01T00:00:03"),  # a later failure of the same run: the success stays
               failure("compiled", "2026-01-01T00:00:04")]
    for i, rec in enumerate(records):
        (tmp_path / f"r{i}.json").write_text(json.dumps(rec))
    doc = gpu_suite.merge(gpu_suite.load_records([str(tmp_path)]))
    assert sorted(r["schema"] for r in doc["records"]) == ["fcmae-bench/1", "fcmae-failure/1"]
    bench = next(r for r in doc["records"] if r["schema"] == "fcmae-bench/1")
    assert bench["backends"]["packed"]["img_s_x_masked"] == 2.5  # the newest success
    assert doc["device"] == "NVIDIA H100 80GB HBM3"
    # a merged file merges again to the same records
    (tmp_path / "merged.json").write_text(json.dumps(doc))
    again = gpu_suite.merge(gpu_suite.load_records([str(tmp_path / "merged.json")]))
    assert again["records"] == doc["records"]


def test_runs_of_one_variant_with_other_backends_are_both_kept():
    """Two single-backend runs of the same variant (e.g. a rerun of the one backend that timed out) do not overwrite
    each other."""
    doc = gpu_suite.merge([bench_record("2", backends=["packed"]), bench_record("1", backends=["masked"])])
    assert sorted(next(iter(r["backends"])) for r in doc["records"]) == ["masked", "packed"]


@pytest.mark.parametrize("variant,packed_x,dense_x,mem_x,mfu,verdicts", [
    ("compile-channels_last", 2.5, 2.2, 0.5, 0.40, ["met", "met", "met", "met"]),
    ("compile-channels_last", 1.8, 1.5, 0.7, 0.20, ["NOT met"] * 4),
    ("eager-channels_last", 2.5, 1.9, 0.5, 0.20, ["met", "NOT met", "met"]),  # MFU: a compiled-run target
])
def test_table_checks_base_targets(variant, packed_x, dense_x, mem_x, mfu, verdicts):
    rec = bench_record("d", variant=variant, packed_x=packed_x, dense_x=dense_x, mem_x=mem_x, mfu=mfu)
    text = gpu_suite.table(gpu_suite.merge([rec]))
    line = next(line for line in text.splitlines() if line.strip().startswith("targets"))
    assert re.findall(r"\((?:>=|<=) [\d.]+%?: ([A-Za-z ]+)\)", line) == verdicts, line
    assert f"packed/masked img/s {packed_x:.2f}" in line and f"packed/dense img/s {dense_x:.2f}" in line


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


def run_call(tmp_path, seconds):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "GPU_CALL_DRY": "1", "GPU_CALL_SECONDS": str(seconds), "GPU_CALL_WHEELS": str(tmp_path / "no-wheels"),
           "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_call.sh")], env=env, capture_output=True,
                          text=True, timeout=seconds + 120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["gpu-call-files.tar.gz", "gpu-call.json", "gpu-call.log"]
    return json.loads((tmp_path / "out" / "gpu-call.json").read_text()), proc.stdout


def test_one_call_dry_run(tmp_path):
    """The one call's CPU dry run (atto, 64 px): the CUDA tests skip and say so, a real pretraining is killed after its
    first checkpoint and resumed to the end, the eager bench and its profile run, and every record is merged."""
    doc, out = run_call(tmp_path, 470)
    recs = {r.get("name") or f"bench:{r['model']}": r for r in doc["records"]}
    assert not [r for r in doc["records"] if r["schema"] == "fcmae-failure/1"], out[-3000:]
    assert recs["correctness"]["skipped"] >= 5 and recs["correctness"]["rc"] == 0
    cli = recs["cli"]
    assert cli["killed"] and cli["resumed_from_step"] == cli["checkpoint_step_at_kill"] == 6 and cli["final_step"] == 12
    assert cli["ok"] and 0 <= cli["data_wait_epoch_median"] <= 1
    bench = recs["bench:convnextv2_atto"]
    assert set(bench["backends"]) == {"masked", "packed", "dense"} and bench["complete"]
    assert "packed (eager): measured (profile, per step) against predicted" in out  # the roofline read the profile
    assert "compiled: not in the CPU dry run" in out


def test_one_call_skips_what_its_deadline_cannot_hold(tmp_path):
    """With 20 s left no step fits: each is recorded as skipped (with the time it needed), and the call still ends 0."""
    doc, out = run_call(tmp_path, 20)
    reasons = {r["name"]: r["reason"] for r in doc["records"] if r["schema"] == "fcmae-failure/1"}
    assert {"correctness", "jpegs", "eager", "eager-atto"} <= set(reasons), reasons
    assert all(r.startswith("skipped: ") and "the step needs" in r for r in reasons.values())
