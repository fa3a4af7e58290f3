#!/usr/bin/env bash
# Every GPU measurement in ONE call of the device tool, at most 8 minutes of wall clock (BENCHMARKS.md, "GPU runs"):
#
#   here, once:  bash bench/fetch_wheels.sh                                 # -> .whl/ (Python 3.12 wheels)
#   the call:    run(command="bash bench/gpu_call.sh", carry=[".whl"], timeout_s=540)
#
# Steps, in priority order; each runs under its own timeout, and only when the time left can hold its minimum:
#   a  correctness  pytest tests/test_cuda.py + the CUDA compiled-step test: packed == masked in fp32 (outputs, loss,
#                   gradients), bf16 within tolerance, the compiled step, pretraining steps under
#                   torch.cuda.set_sync_debug_mode("error")
#   b  cli          the real `fcmae pretrain` of base, 224 px, batch 64, on generated JPEGs with 14 loader workers:
#                   SIGKILLed at ~40% of its steps and resumed; img/s and the data-wait share
#   c  eager        `fcmae bench` base, 224 px, batch 64, bf16, channels_last: masked / packed / dense, img/s, peak
#                   memory, MFU, --profile (and bench/roofline.py's measured-against-predicted table)
#   d  compiled     the same with --compile, packed first, then masked and dense
#   e  more         tiny and large, eager, if time remains
# After every step the records are merged into $OUT/gpu-call.json (nothing measured is lost when the call is cut
# short); the log is $OUT/gpu-call.log, the per-step files (logs, profiles, JUnit XML) $OUT/gpu-call-files.tar.gz:
# three files come back. Without $OUT: runs/gpu_call/.
#
# Knobs: GPU_CALL_SECONDS (the call's own deadline, default 470), PYTHON (python3), GPU_CALL_WHEELS (.whl),
# GPU_CALL_DRY=1: the CPU dry run of the same logic (atto, 64 px, a few images, device cpu; the compiled step only
# with GPU_CALL_DRY_COMPILE=1). bench/gpu_twin.sh runs that dry run in a venv holding only what the GPU image has.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$(date +%s)
DEADLINE=$((START + ${GPU_CALL_SECONDS:-470}))
OUTDIR=${OUT:-$ROOT/runs/gpu_call}
WORK=$(mktemp -d /tmp/fcmae-call.XXXXXX)
REC=$WORK/records LOGS=$WORK/logs
mkdir -p "$OUTDIR" "$REC" "$LOGS"
exec > >(tee -a "$OUTDIR/gpu-call.log") 2>&1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DRY=${GPU_CALL_DRY:-0}
left() { echo $((DEADLINE - $(date +%s))); }

echo "== gpu_call $(date -u +%FT%TZ)  deadline ${GPU_CALL_SECONDS:-470}s  work $WORK  out $OUTDIR"
WHEELS=${GPU_CALL_WHEELS:-.whl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then  # what the GPU image lacks, first on the path (--no-deps: a pinned set)
  SITE=$WORK/site
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl \
    || { echo "gpu_call: error: the carried wheels in $WHEELS do not install on this Python ($($PY -V)); rerun" \
              "bash bench/fetch_wheels.sh with PYVER set to it"; exit 1; }
  export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
$PY - > "$WORK/env.txt" 2>&1 <<'EOF' || { cat "$WORK/env.txt"; echo "gpu_call: error: the imports fcmae needs failed (carry .whl: bash bench/fetch_wheels.sh)"; exit 1; }
import os, platform, torch, timm
import fcmae.cli, jobs.cli  # every command's module-level imports
print(f"python {platform.python_version()}  torch {torch.__version__}  CUDA {torch.version.cuda}  "
      f"cuDNN {torch.backends.cudnn.version()}  timm {timm.__version__}  cores {os.cpu_count()}")
print(torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu {platform.machine()}")
EOF
head -1 "$WORK/env.txt"
DEVNAME=$(tail -1 "$WORK/env.txt")

if [ "$DRY" = 1 ]; then  # the logic, not the numbers
  # patch 32 as the bench's (auto would pick 16 at 64 px, whose loss barely moves in two tiny epochs)
  DEV=cpu DTYPE=fp32 SIZE=64 BATCH=4 STEPS=1 WARMUP=0 WORKERS=1 MODEL=convnextv2_atto MORE=(convnextv2_atto)
  DEC=(--decoder-dim 32) EXTRA=(model.decoder_dim=32 model.patch_size=32) N_PRE=24 JPEG_W=96 JPEG_H=72 EPOCHS=2
else
  DEV=cuda DTYPE=bf16 SIZE=224 BATCH=64 STEPS=20 WARMUP=3 WORKERS=14 MODEL=convnextv2_base
  MORE=(convnextv2_tiny convnextv2_large) DEC=() EXTRA=() N_PRE=1536 JPEG_W=500 JPEG_H=375 EPOCHS=8
fi

merge() {
  $PY bench/gpu_suite.py merge -o "$OUTDIR/gpu-call.json" --device "$DEVNAME" "$REC" > "$WORK/table.txt" 2>&1 \
    || { echo "gpu_call: warning: merge failed:"; cat "$WORK/table.txt"; }
  tar -czf "$OUTDIR/gpu-call-files.tar.gz" -C "$WORK" records logs 2>/dev/null
}

# step NAME CAP MIN CMD...: CMD under timeout min(CAP, time left - 15 s reserve), or a "skipped" record when less than
# MIN seconds are left; a failure or timeout writes a failure record with the log's tail. Records merge after it.
step() {
  local name=$1 cap=$2 min=$3; shift 3
  local t rc log=$LOGS/$name.log
  t=$(( $(left) - 15 )); [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt "$min" ]; then
    echo "-- skip $name: ${t}s left, needs ${min}s"
    $PY bench/gpu_suite.py failure --name "$name" --json "$REC/fail-$name.json" --command "$*" \
      --reason "skipped: ${t}s left in the call, the step needs ${min}s"
    merge; return 1
  fi
  echo "-- $name (timeout ${t}s, $(left)s left): $*"
  timeout -k 10 "$t" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    local reason="exit $rc"; { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && reason="timed out after ${t}s"
    echo "-- $name FAILED: $reason"
    $PY bench/gpu_suite.py failure --name "$name" --json "$REC/fail-$name.json" --command "$*" --reason "$reason" \
      --rc "$rc" --log "$log"
  fi
  merge
  return "$rc"
}

bench() {  # bench NAME CAP MIN MODEL FLAGS...: one `fcmae bench` run, its JSON rewritten as backends finish
  local name=$1 cap=$2 min=$3 model=$4; shift 4
  step "$name" "$cap" "$min" $PY -m fcmae bench --model "$model" --batch-size "$BATCH" --image-size "$SIZE" \
    --device "$DEV" --dtype "$DTYPE" --steps "$STEPS" --warmup "$WARMUP" --channels-last "${DEC[@]}" "$@" \
    --json "$REC/$name.json"
}

# a. correctness on CUDA (on the CPU dry run these skip and say why)
step correctness 110 40 $PY -m pytest -q -rs -p no:cacheprovider --junitxml="$LOGS/junit.xml" tests/test_cuda.py \
  "tests/test_packed.py::test_compiled_train_step_matches_eager[cuda]"
rc=$?
[ -f "$LOGS/junit.xml" ] && $PY bench/gpu_suite.py tests --name correctness --junit "$LOGS/junit.xml" \
  --json "$REC/correctness.json" --command "pytest tests/test_cuda.py tests/test_packed.py::...[cuda]" --rc $rc

# b. the real CLI, killed and resumed: img/s and data wait against the bench's step rate
DATA=$WORK/jpegs PRE=$WORK/pretrain
SPE=$((N_PRE / BATCH)) TOTAL=$((N_PRE / BATCH * EPOCHS))
KILL=$((TOTAL * 2 / 5 > SPE ? TOTAL * 2 / 5 : SPE + 2))  # after the first checkpoint (one per epoch)
step jpegs 40 10 $PY bench/gpu_suite.py jpegs "$DATA" --n "$N_PRE" --width "$JPEG_W" --height "$JPEG_H" \
  && step cli 140 60 $PY bench/gpu_suite.py e2e --name cli --model "$MODEL" --out "$PRE" --batch "$BATCH" \
    --epochs "$EPOCHS" --total-steps "$TOTAL" --kill-step "$KILL" --timeout 130 --json "$REC/cli.json" \
    --log "$LOGS/cli-runs.log" -- $PY -m fcmae pretrain model.name="$MODEL" device="$DEV" data.path="$DATA" \
    output_dir="$PRE" data.image_size="$SIZE" data.batch_size="$BATCH" data.num_workers="$WORKERS" \
    optim.epochs="$EPOCHS" optim.warmup_epochs=1 optim.blr=1.5e-4 channels_last=true checkpoint.every_steps="$SPE" \
    checkpoint.keep_every_epochs=0 log.every_steps=4 log.progress=false log.tensorboard=false log.vis_every_epochs=0 \
    "${EXTRA[@]}"

# c. eager, with the profile and the roofline's reading of it
mkdir -p "$LOGS/profile-eager"
bench eager 100 45 "$MODEL" --backends masked,packed,dense --profile "$LOGS/profile-eager" \
  && $PY bench/roofline.py --model "$MODEL" --image-size "$SIZE" --batch "$BATCH" --dtype "$DTYPE" \
       "${DEC[@]}" --profile "$LOGS/profile-eager" | tee "$LOGS/roofline-eager.txt"

# d. compiled, packed first (compiling takes a minute or more per backend)
if [ "$DRY" != 1 ] || [ "${GPU_CALL_DRY_COMPILE:-0}" = 1 ]; then
  bench compiled 200 90 "$MODEL" --compile --backends packed,masked,dense
else
  echo "-- compiled: not in the CPU dry run (GPU_CALL_DRY_COMPILE=1 compiles on the CPU: minutes)"
fi

# e. the other sizes, eager, while time remains
for m in "${MORE[@]}"; do bench "eager-${m#convnextv2_}" 80 40 "$m" --backends masked,packed,dense; done

merge
echo "== results ($(( $(date +%s) - START ))s of ${GPU_CALL_SECONDS:-470}s)"
cat "$WORK/table.txt"
