"""Helpers of bench/gpu_call.sh: generated JPEGs, the kill/resume end-to-end check, records of tests and failures,
and the merge of every record into one results file with a short table.

Records are JSON files, one per measurement, told apart by "schema":
  fcmae-bench/1   `fcmae bench --json` (one model / variant, every backend)
  fcmae-e2e/1     one `fcmae pretrain` / `fcmae finetune` run, killed and resumed (or not), with its img/s and checks
  fcmae-tests/1   a pytest run (counts from its JUnit XML)
  fcmae-finetune-step/1  bench/finetune_step.py: our fine-tuning step vs a plain timm one
  fcmae-failure/1 a command that failed, timed out or was skipped for lack of time
  fcmae-suite/1   a merge of the above (merging merged files again is fine: records are keyed, the newest wins)

    python bench/gpu_suite.py merge -o bench/results/<device>-<date>.json RESULTS/*.json
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from multiprocessing import Pool
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# convnextv2_base's targets (the GPU issue), checked per variant in the table; the MFU one for compiled runs only.
TARGETS = {"packed_x_masked_img_s": 2.0, "packed_x_dense_img_s": 2.0, "packed_x_masked_mem": 0.6,
           "packed_mfu_compiled": 0.30}


def write_json(path: str, doc: dict[str, Any]) -> None:
    """Atomic: a temporary file beside `path`, then a rename."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------- generated JPEGs
def _jpeg(job: tuple[str, int, int, int, int]) -> None:
    path, seed, w, h, label = job
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    low = rng.random((12, 16, 3)) * 255  # as bench/data_loading.py: ImageNet-like size and bytes
    if label >= 0:  # a class colour, so that fine-tuning has something to learn
        tint = np.random.default_rng(10 ** 6 + label).random(3) * 255
        low = 0.5 * low + 0.5 * tint
    low = low.astype(np.uint8)
    img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC)).astype(np.int16)
    img = img + rng.integers(-20, 20, img.shape)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def cmd_jpegs(args: argparse.Namespace) -> None:
    """N JPEGs (w x h) in ROOT, or with --classes an ImageFolder ROOT/train/class_k + ROOT/val/class_k."""
    jobs = []
    if args.classes:
        for split, per_class in (("train", args.n // args.classes), ("val", args.val // args.classes)):
            for c in range(args.classes):
                folder = os.path.join(args.root, split, f"class_{c}")
                os.makedirs(folder, exist_ok=True)
                seed = (split == "val") * 10 ** 7 + c * 10 ** 5
                jobs += [(os.path.join(folder, f"{i:05d}.jpg"), seed + i, args.width, args.height, c)
                         for i in range(per_class)]
    else:
        os.makedirs(args.root, exist_ok=True)
        jobs = [(os.path.join(args.root, f"{i:05d}.jpg"), i, args.width, args.height, -1) for i in range(args.n)]
    t0 = time.time()
    with Pool(args.procs or os.cpu_count()) as pool:
        pool.map(_jpeg, jobs, chunksize=16)
    print(f"{len(jobs)} JPEGs {args.width}x{args.height} in {args.root} ({time.time() - t0:.1f}s)", flush=True)


# --------------------------------------------------------------------------------------------------- end to end run
def read_metrics(out: str) -> list[dict[str, Any]]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    rows = []
    for line in open(path):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by the kill
            pass
    return rows


def checkpoint_step(path: str) -> int | None:
    if not os.path.isfile(path):
        return None
    import torch
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


def cmd_e2e(args: argparse.Namespace) -> None:
    """Run CMD; with --kill-step, SIGKILL it once metrics.jsonl shows that step, then run it again to the end (it must
    resume from last.pt). Writes one fcmae-e2e/1 record: img/s of the whole (resumed) run and per step, and checks."""
    cmd, log = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd, open(args.log, "a")
    doc: dict[str, Any] = {"schema": "fcmae-e2e/1", "name": args.name, "date": now(), "command": " ".join(cmd),
                           "model": args.model, "batch_size": args.batch, "total_steps": args.total_steps, "checks": {}}
    deadline = time.time() + args.timeout
    children: list[subprocess.Popen] = []

    def on_term(signum, frame):  # `timeout` stopping this helper stops the training run (its own session) too
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    if args.kill_step:
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        children.append(proc)
        killed = False
        while proc.poll() is None and time.time() < deadline:
            steps = [r["step"] for r in read_metrics(args.out) if r.get("kind") == "step"]
            if steps and max(steps) >= args.kill_step:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the DataLoader workers too
                killed = True
                break
            time.sleep(0.05)
        if proc.poll() is None and not killed:  # out of time
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        doc["first_run_s"] = time.time() - t0
        doc["killed"] = killed
        doc["killed_after_step"] = max([r["step"] for r in read_metrics(args.out) if r.get("kind") == "step"] or [0])
        doc["checkpoint_step_at_kill"] = checkpoint_step(os.path.join(args.out, "last.pt"))
        doc["checks"]["killed_mid_run"] = killed and doc["checkpoint_step_at_kill"] is not None \
            and 0 < doc["checkpoint_step_at_kill"] < args.total_steps
    rows_before = len(read_metrics(args.out))
    log.flush()
    offset = log.tell()
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    children.append(proc)
    try:
        proc.wait(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    wall = time.time() - t0
    log.flush()
    with open(args.log) as f:
        f.seek(offset)
        text = f.read()
    doc["rc"] = proc.returncode
    doc["run_s"] = wall
    resumed = re.search(r"resumed from \S+: epoch (\d+), step (\d+)", text)
    doc["resumed_from_step"] = int(resumed.group(2)) if resumed else None
    final = checkpoint_step(os.path.join(args.out, "last.pt"))
    doc["final_step"] = final
    rows = read_metrics(args.out)
    new_rows = rows[rows_before:]
    epochs = {r["epoch"]: r for r in rows if r.get("kind") == "epoch"}  # a re-run epoch's row replaces the first
    losses = [epochs[e]["loss"] for e in sorted(epochs)]
    start = doc["resumed_from_step"] or 0
    doc["img_s_whole_run"] = (final - start) * args.batch / wall if final is not None else None
    step_ips = [r["img_per_s"] for r in new_rows if r.get("kind") == "step"]
    epoch_ips = [r["img_per_s"] for r in new_rows if r.get("kind") == "epoch"]
    waits = [r["data_wait"] for r in new_rows if r.get("kind") == "epoch" and "data_wait" in r]
    doc["data_wait_epoch_median"] = statistics.median(waits) if waits else None  # share of step time: loader-bound?
    doc["img_s_step_median"] = statistics.median(step_ips) if step_ips else None
    doc["img_s_epoch_median"] = statistics.median(epoch_ips) if epoch_ips else None
    doc["img_s_epoch_best"] = max(epoch_ips) if epoch_ips else None
    doc["epoch_losses"] = losses
    top1 = [epochs[e].get("top1") for e in sorted(epochs) if epochs[e].get("top1") is not None]
    if top1:
        doc["epoch_top1"] = top1
    c = doc["checks"]
    c["exit_0"] = proc.returncode == 0
    c["finished_all_steps"] = final == args.total_steps
    c["all_epochs_logged"] = sorted(epochs) == list(range(1, args.epochs + 1))
    c["losses_finite"] = bool(losses) and all(math.isfinite(x) for x in losses)
    if args.epochs >= 2:
        c["loss_fell"] = len(losses) >= 2 and losses[-1] < losses[0]
    if args.kill_step:
        c["resumed"] = doc["resumed_from_step"] is not None and doc["resumed_from_step"] == doc["checkpoint_step_at_kill"]
    if top1:
        c["top1_in_range"] = all(0 <= t <= 100 for t in top1)
    doc["ok"] = all(c.values())
    write_json(args.json, doc)
    print(f"e2e {args.name}: rc {proc.returncode}  {wall:.1f}s  whole-run {doc['img_s_whole_run'] or 0:.0f} img/s  "
          f"checks " + " ".join(f"{k}={'ok' if v else 'FAIL'}" for k, v in c.items()), flush=True)


# ------------------------------------------------------------------------------------------------- tests, failures
def cmd_tests(args: argparse.Namespace) -> None:
    doc: dict[str, Any] = {"schema": "fcmae-tests/1", "name": args.name, "date": now(), "command": args.command,
                           "rc": args.rc}
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed, skipped = [], []
    if os.path.isfile(args.junit):
        root = ET.parse(args.junit).getroot()
        for suite in root.iter("testsuite"):
            for k in counts:
                counts[k] += int(suite.get(k, 0))
        for case in root.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(name)
            skip = case.find("skipped")
            if skip is not None:
                skipped.append(f"{name}: {skip.get('message', '')}")
    doc.update(counts, passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
               failed=failed, skipped_reasons=skipped, ok=args.rc == 0 and counts["tests"] > 0)
    write_json(args.json, doc)


def cmd_failure(args: argparse.Namespace) -> None:
    tail = open(args.log).read()[-2000:] if args.log and os.path.isfile(args.log) else ""
    write_json(args.json, {"schema": "fcmae-failure/1", "name": args.name, "date": now(), "command": args.command,
                           "rc": args.rc, "reason": args.reason, "log_tail": tail})


# ------------------------------------------------------------------------------------------------------ merge, table
def key(rec: dict[str, Any]) -> str:
    """What a record measures: a later record of the same key replaces it (a failure never replaces a success).
    A bench record is keyed on every setting that tells runs apart, its backends included, so two runs of one variant
    with other backends are both kept."""
    if rec["schema"] == "fcmae-bench/1":
        backends = ",".join(sorted(rec.get("backends_asked") or rec["backends"]))
        return (f"bench:{rec['model']}:{rec['variant']}:bs{rec['batch_size']}:{rec['image_size']}px:{rec['dtype']}:"
                f"p{rec.get('patch_size', 32)}:m{rec['mask_ratio']}:d{rec['decoder_dim']}:{backends}")
    return rec["name"]


def load_records(paths: list[str]) -> list[dict[str, Any]]:
    """Records from files, globs and folders (their *.json); merged files give their records."""
    recs = []
    for pattern in paths:
        files = sorted(glob.glob(os.path.join(pattern, "*.json"))) if os.path.isdir(pattern) else \
            sorted(glob.glob(pattern))
        for path in files:
            doc = json.load(open(path))
            if doc.get("schema") == "fcmae-suite/1":
                recs += doc["records"]
            elif str(doc.get("schema", "")).startswith("fcmae-"):
                recs.append(doc)
    return recs


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def merge(records: list[dict[str, Any]], device: str | None = None) -> dict[str, Any]:
    by_key: dict[str, dict[str, Any]] = {}
    # failures first, then successes, each oldest first: the newest success of a key wins, else its newest failure
    for rec in sorted(records, key=lambda r: (r["schema"] != "fcmae-failure/1", r.get("date", ""))):
        by_key[key(rec)] = rec
    recs = list(by_key.values())
    bench = [r for r in recs if r["schema"] == "fcmae-bench/1"]
    env = bench[0] if bench else {}
    return {"schema": "fcmae-suite/1", "date": now(), "device": env.get("device") or device, "torch": env.get("torch"),
            "cuda": env.get("cuda"), "cudnn": env.get("cudnn"), "timm": env.get("timm"),
            "records": sorted(recs, key=key)}


def target_checks(rec: dict[str, Any]) -> list[str]:
    """The base targets a bench record can tell: 'what value (target: met | NOT met)' each."""
    b, t = rec["backends"], TARGETS
    p, m, d = b["packed"], b.get("masked"), b.get("dense")

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    out = []
    if m:
        out.append(f"packed/masked img/s {p['img_s'] / m['img_s']:.2f} (>= {t['packed_x_masked_img_s']}: "
                   f"{verdict(p['img_s'] / m['img_s'] >= t['packed_x_masked_img_s'])})")
    if d:
        out.append(f"packed/dense img/s {p['img_s'] / d['img_s']:.2f} (>= {t['packed_x_dense_img_s']}: "
                   f"{verdict(p['img_s'] / d['img_s'] >= t['packed_x_dense_img_s'])})")
    if m and p.get("peak_mem_gib") is not None and m.get("peak_mem_gib"):
        mem = p["peak_mem_gib"] / m["peak_mem_gib"]
        out.append(f"memory packed/masked {mem:.2f} (<= {t['packed_x_masked_mem']}: "
                   f"{verdict(mem <= t['packed_x_masked_mem'])})")
    if rec.get("compile"):
        out.append(f"MFU {100 * p['mfu']:.1f}% (>= {100 * t['packed_mfu_compiled']:.0f}%: "
                   f"{verdict(p['mfu'] >= t['packed_mfu_compiled'])})")
    return out


def fmt(x: Any, spec: str = ".0f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def table(doc: dict[str, Any]) -> str:
    recs = doc["records"]
    lines = [f"device {doc.get('device')}  torch {doc.get('torch')}  CUDA {doc.get('cuda')}  timm {doc.get('timm')}"]
    bench = sorted((r for r in recs if r["schema"] == "fcmae-bench/1"), key=lambda r: (r["model"], r["variant"]))
    if bench:
        lines.append(f"{'model':<18}{'variant':<22}{'backend':<8}{'img/s':>9}{'step ms':>9}{'peak GiB':>9}{'MFU':>7}"
                     f"{'x masked':>9}{'mem x m':>8}")
        for r in bench:
            for b, v in r["backends"].items():
                lines.append(f"{r['model']:<18}{r['variant']:<22}{b:<8}{v['img_s']:>9.1f}{v['step_ms']:>9.1f}"
                             f"{fmt(v['peak_mem_gib'], '.2f'):>9}{100 * v['mfu']:>6.1f}%"
                             f"{fmt(v['img_s_x_masked'], '.2f'):>9}{fmt(v['peak_mem_x_masked'], '.2f'):>8}")
            if r["model"].endswith("_base") and "packed" in r["backends"]:
                lines.append(f"  targets ({r['variant']}): " + "; ".join(target_checks(r)))
    for r in recs:
        if r["schema"] == "fcmae-e2e/1":
            ref = next((b["backends"].get("packed") for b in bench if b["model"] == r["model"] and not b["compile"]
                        and b["batch_size"] == r["batch_size"] and "packed" in b["backends"]), None)
            vs = f"  = {r['img_s_epoch_best'] / ref['img_s']:.2f}x bench packed eager" if ref and r.get(
                "img_s_epoch_best") else ""
            wait = r.get("data_wait_epoch_median")
            bad = [k for k, v in r["checks"].items() if not v]
            lines.append(f"e2e {r['name']}: {fmt(r.get('final_step'), 'd')}/{r['total_steps']} steps, whole run "
                         f"{fmt(r.get('img_s_whole_run'), '.1f')} img/s, best epoch {fmt(r.get('img_s_epoch_best'), '.1f')} img/s{vs}"
                         f", data wait {fmt(None if wait is None else 100 * wait, '.0f')}% of step time"
                         f"; checks {'all ok' if not bad else 'FAILED: ' + ', '.join(bad)}")
        elif r["schema"] == "fcmae-tests/1":
            lines.append(f"tests {r['name']}: {r['passed']} passed, {r['failures'] + r['errors']} failed, "
                         f"{r['skipped']} skipped (rc {r['rc']})" + "".join(f"\n  FAILED {n}" for n in r["failed"]))
        elif r["schema"] == "fcmae-finetune-step/1":
            o, t = r["steps_compared"]["ours"], r["steps_compared"]["timm"]
            lines.append(f"finetune step {r['model']} {r['variant']} bs{r['batch_size']} {r['dtype']}: ours "
                         f"{o['img_s']:.1f} img/s, timm {t['img_s']:.1f} img/s = {r['ours_x_timm_img_s']:.2f}x "
                         f"(target >= 1.0x)")
        elif r["schema"] == "fcmae-failure/1":
            lines.append(f"FAILED {r['name']}: {r['reason']} (rc {r['rc']})")
    return "\n".join(lines)


def cmd_merge(args: argparse.Namespace) -> None:
    doc = merge(load_records(args.inputs), args.device)
    out = args.out
    if out.endswith(os.sep) or os.path.isdir(out):  # a folder: name the file after the device and the date
        os.makedirs(out, exist_ok=True)
        name = args.device or doc["device"] or "unknown"  # --device first: one file name for the whole call
        out = os.path.join(out, f"{device_slug(name)}-{doc['date'][:10]}{args.suffix}.json")
    write_json(out, doc)
    print(table(doc))
    print(f"wrote {out}")


def cmd_table(args: argparse.Namespace) -> None:
    print(table(merge(load_records(args.inputs))))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    j = sub.add_parser("jpegs", help="generate JPEGs (flat folder, or ImageFolder train/val with --classes)")
    j.add_argument("root")
    j.add_argument("--n", type=int, default=1024, help="images (with --classes: training images)")
    j.add_argument("--classes", type=int, default=0)
    j.add_argument("--val", type=int, default=0, help="with --classes: validation images")
    j.add_argument("--width", type=int, default=500)
    j.add_argument("--height", type=int, default=375)
    j.add_argument("--procs", type=int, default=0)
    j.set_defaults(func=cmd_jpegs)
    e = sub.add_parser("e2e", help="run a training command, kill it at a step, resume it, check and time it")
    e.add_argument("--name", required=True, help="the record's name")
    e.add_argument("--out", required=True, help="the run's output_dir")
    e.add_argument("--model", required=True, help="timm name, to compare with the bench of the same model")
    e.add_argument("--batch", type=int, required=True)
    e.add_argument("--epochs", type=int, required=True)
    e.add_argument("--total-steps", type=int, required=True)
    e.add_argument("--kill-step", type=int, default=0, help="0: no kill")
    e.add_argument("--timeout", type=float, default=300, help="seconds for both runs together")
    e.add_argument("--json", required=True)
    e.add_argument("--log", required=True)
    e.add_argument("cmd", nargs=argparse.REMAINDER)
    e.set_defaults(func=cmd_e2e)
    t = sub.add_parser("tests", help="record a pytest run from its JUnit XML")
    for name in ("name", "junit", "json", "command"):
        t.add_argument(f"--{name}", required=True)
    t.add_argument("--rc", type=int, required=True)
    t.set_defaults(func=cmd_tests)
    f = sub.add_parser("failure", help="record a failed, timed-out or skipped command")
    for name in ("name", "json", "command", "reason"):
        f.add_argument(f"--{name}", required=True)
    f.add_argument("--rc", type=int, default=None)
    f.add_argument("--log", default=None)
    f.set_defaults(func=cmd_failure)
    m = sub.add_parser("merge", help="merge records (files, globs, merged files) into one file and print the table")
    m.add_argument("-o", "--out", required=True, help="file, or folder (then <device>-<date><suffix>.json)")
    m.add_argument("--suffix", default="")
    m.add_argument("--device", default=None, help="device name when no bench record gives one")
    m.add_argument("inputs", nargs="+")
    m.set_defaults(func=cmd_merge)
    tb = sub.add_parser("table", help="print the table of records")
    tb.add_argument("inputs", nargs="+")
    tb.set_defaults(func=cmd_table)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
