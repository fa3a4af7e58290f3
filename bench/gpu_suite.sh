#!/usr/bin/env bash
# The GPU measurements of issue 13 in phases that each fit one 10-minute call of the device tool.
#
#   bash bench/gpu_suite.sh PHASE [PHASE...]      PHASE: correctness | e2e | speed | compile | all
#
#   correctness  pytest tests/test_cuda.py tests/test_packed.py (the CUDA tests and the compiled-step test)
#   e2e          `fcmae pretrain` (tiny, a few hundred steps, SIGKILLed mid-run and resumed) and `fcmae finetune`
#                (from that checkpoint, killed and resumed) on generated 500x375 JPEGs, pretrain base for its img/s,
#                and bench/data_loading.py with the machine's cores: whole-run img/s vs the bench's step rate
#   speed        `fcmae bench` eager: base, tiny, large x NCHW / channels_last; masked, packed, dense; batch 64,
#                224 px, bf16 autocast
#                then bench/finetune_step.py (base): our fine-tuning step vs a plain timm step, NCHW / channels_last
#   compile      the same with --compile, masked and packed (base first: the targets are for base), and the
#                finetune step compiled
#   all          every phase in turn (longer than one call: for a machine without the 10-minute limit)
#
# Each command runs under `timeout`, within the phase's budget and the call's deadline (SUITE_DEADLINE seconds from
# the start, default 570), so the script ends, with its results written, before the call's 600 s; what did not fit
# is recorded as skipped. Results: one JSON record per measurement (bench/gpu_suite.py), merged after every step
# into $OUT/<device>-<date>-<phases>.json, with the log ($OUT/suite-<phases>.log) and the per-run files
# ($OUT/suite-<phases>-files.tar.gz). Without $OUT: runs/gpu_suite/. The table is printed last.
#
# Wheels: carried in .whl/ (bash bench/fetch_wheels.sh, here), installed to /tmp/site first when present.
# SUITE_TINY=1: a CPU dry run of the same logic (atto, 64 px, 2 steps, a few images, device cpu, no compile runs).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && { echo "usage: bash bench/gpu_suite.sh correctness|e2e|speed|compile|all [...]" >&2; exit 2; }
for p in "${PHASES[@]}"; do
  case $p in correctness|e2e|speed|compile|all) ;; *) echo "gpu_suite: error: unknown phase '$p'; use correctness, e2e, speed, compile or all" >&2; exit 2;; esac
done
[ "${PHASES[*]}" = all ] && PHASES=(correctness e2e speed compile)
START=$(date +%s)
DEADLINE=$((START + ${SUITE_DEADLINE:-570}))
TAG=$(IFS=-; echo "${PHASES[*]}")
OUTDIR=${OUT:-$ROOT/runs/gpu_suite}
WORK=${SUITE_WORK:-$(mktemp -d /tmp/fcmae-suite.XXXXXX)}
REC=$WORK/records
LOGS=$WORK/logs
mkdir -p "$OUTDIR" "$REC" "$LOGS"
exec > >(tee -a "$OUTDIR/suite-$TAG.log") 2>&1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SITE=${SUITE_SITE:-/tmp/site}  

echo "== gpu_suite ${PHASES[*]}  $(date -u +%FT%TZ)  work $WORK  out $OUTDIR"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  # one pip call; when a wheel does not fit this Python (e.g. PyYAML's cp312), install the others one by one
  if ! $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl; then
    for w in .whl/*.whl; do
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$w" \
        || echo "gpu_suite: warning: $w did not install (the machine's own copy is used, if any)"
    done
  fi
  export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
$PY - > "$WORK/env.txt" <<'EOF' || { cat "$WORK/env.txt"; echo "gpu_suite: error: the imports fcmae needs failed (missing wheels? run bash bench/fetch_wheels.sh here and carry .whl)"; exit 1; }
import os, platform, torch, timm, einops, webdataset, submitit, safetensors, yaml, PIL
import fcmae.cli  # every command's module-level imports
cuda = torch.cuda.is_available()
print(f"python {platform.python_version()}  torch {torch.__version__}  CUDA {torch.version.cuda}  "
      f"cuDNN {torch.backends.cudnn.version()}  timm {timm.__version__}  cores {os.cpu_count()}")
print(torch.cuda.get_device_name() if cuda else f"cpu {platform.machine()}")
EOF
head -1 "$WORK/env.txt"
DEVNAME=$(tail -1 "$WORK/env.txt")
echo "device $DEVNAME"

if [ "${SUITE_TINY:-0}" = 1 ]; then  # CPU dry run: the logic, not the numbers
  DEVICE=cpu DTYPE=fp32 SIZE=64 BATCH=4 STEPS=2 WARMUP=1 DEC=(--decoder-dim 32) WORKERS=0
  MODELS=(convnextv2_atto) E2E_SMALL=convnextv2_atto E2E_BIG=convnextv2_atto
  N_PRE=32 FT_CLASSES=2 N_FT=16 N_VAL=8 PRE_EPOCHS=2 FT_EPOCHS=2 BIG_EPOCHS=1 LOADER_IMAGES=16
  EXTRA=(model.decoder_dim=32) JPEG_W=96 JPEG_H=72 FT_STEP_CLASSES=5
else
  DEVICE=cuda DTYPE=bf16 SIZE=224 BATCH=64 STEPS=${SUITE_STEPS:-20} WARMUP=${SUITE_WARMUP:-3} DEC=() WORKERS=$(( $(nproc) - 2 ))
  MODELS=(convnextv2_base convnextv2_tiny convnextv2_large) E2E_SMALL=convnextv2_tiny E2E_BIG=convnextv2_base
  N_PRE=2048 FT_CLASSES=10 N_FT=640 N_VAL=320 PRE_EPOCHS=8 FT_EPOCHS=6 BIG_EPOCHS=3 LOADER_IMAGES=1024
  EXTRA=() JPEG_W=500 JPEG_H=375 FT_STEP_CLASSES=1000
fi
[ -n "${SUITE_MODELS:-}" ] && read -ra MODELS <<< "$SUITE_MODELS"

left() { echo $((DEADLINE - $(date +%s))); }

merge() {  # after every step, so a call cut short still returns every finished record
  $PY bench/gpu_suite.py merge -o "$OUTDIR" --suffix="-$TAG" --device "$DEVNAME" "$REC" > "$WORK/table.txt" 2>&1 \
    || { echo "gpu_suite: warning: merge failed:"; cat "$WORK/table.txt"; }
  tar -czf "$OUTDIR/suite-$TAG-files.tar.gz" -C "$WORK" records logs 2>/dev/null
}

# step NAME PHASE_END CAP_SECONDS CMD...: run CMD under timeout min(CAP, time left to the phase end and the deadline
# minus a 20 s reserve); on failure or when no time is left, write a failure record named NAME.
step() {
  local name=$1 phase_end=$2 cap=$3; shift 3
  local now t rc log=$LOGS/${name//[^A-Za-z0-9._-]/_}.log
  now=$(date +%s)
  t=$(( cap < phase_end - now ? cap : phase_end - now ))
  t=$(( t < DEADLINE - 20 - now ? t : DEADLINE - 20 - now ))
  if [ "$t" -lt 20 ]; then
    echo "-- skip $name: ${t}s left"
    $PY bench/gpu_suite.py failure --name "$name" --json "$REC/fail-${name//[^A-Za-z0-9._-]/_}.json" \
      --command "$*" --reason "skipped: no time left in this call (${t}s)"
    return 1
  fi
  echo "-- $name (timeout ${t}s): $*"
  timeout -k 10 "$t" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  if [ $rc -ne 0 ]; then
    local reason="exit $rc"; [ $rc -eq 124 ] || [ $rc -eq 137 ] && reason="timed out after ${t}s"
    echo "-- $name FAILED: $reason"
    $PY bench/gpu_suite.py failure --name "$name" --json "$REC/fail-${name//[^A-Za-z0-9._-]/_}.json" \
      --command "$*" --reason "$reason" --rc $rc --log "$log"
  fi
  return $rc
}

phase_correctness() {
  local end=$(( $(date +%s) + ${BUDGET_CORRECTNESS:-300} ))
  local tests=(tests/test_cuda.py tests/test_packed.py)
  [ "${SUITE_TINY:-0}" = 1 ] && tests=(tests/test_cuda.py)  # the dry run: skips with the reason, proves the record
  step tests-cuda "$end" 300 $PY -m pytest "${tests[@]}" -rs -q -p no:cacheprovider --junitxml="$LOGS/junit.xml"
  local rc=$?
  if [ -f "$LOGS/junit.xml" ]; then  # pytest ran (passed or not): its counts; else the failure record stands
    $PY bench/gpu_suite.py tests --name tests-cuda --junit "$LOGS/junit.xml" --json "$REC/tests-cuda.json" \
      --command "pytest ${tests[*]} -rs -q" --rc $rc
  fi
  merge
}

bench_run() {  # bench_run PHASE_END CAP MODEL VARIANT_FLAGS...
  local end=$1 cap=$2 model=$3; shift 3
  local variant compile=eager layout=nchw profile=()
  [[ " $* " == *" --compile "* ]] && compile=compile
  [[ " $* " == *" --channels-last "* ]] && layout=channels_last
  variant=$compile-$layout
  if [ "$model" = "${MODELS[0]}" ]; then  # the first model (base) also gets torch.profiler's top ops per backend
    profile=(--profile "$LOGS/profile-$model-$variant"); mkdir -p "$LOGS/profile-$model-$variant"
  fi
  step "bench:$model:$variant:bs$BATCH:${SIZE}px:$DTYPE" "$end" "$cap" \
    $PY -m fcmae bench --model "$model" --batch-size "$BATCH" --image-size "$SIZE" --device "$DEVICE" --dtype "$DTYPE" \
    --steps "$STEPS" --warmup "$WARMUP" --backends "${BACKENDS:-masked,packed,dense}" "${DEC[@]}" "$@" "${profile[@]}" \
    --json "$REC/bench-$model-$variant.json"
  merge
}

finetune_run() {  # finetune_run PHASE_END CAP VARIANT_FLAGS...: our fine-tuning step vs timm's, first model
  local end=$1 cap=$2; shift 2
  local model=${MODELS[0]} variant compile=eager layout=nchw
  [[ " $* " == *" --compile "* ]] && compile=compile
  [[ " $* " == *" --channels-last "* ]] && layout=channels_last
  variant=$compile-$layout
  step "finetune-step:$model:$variant:bs$BATCH:$DTYPE" "$end" "$cap" $PY bench/finetune_step.py --model "$model" \
    --batch-size "$BATCH" --image-size "$SIZE" --device "$DEVICE" --dtype "$DTYPE" --steps "$STEPS" \
    --warmup "$WARMUP" --classes $FT_STEP_CLASSES "$@" --json "$REC/finetune-step-$model-$variant.json"
  merge
}

phase_speed() {
  local end=$(( $(date +%s) + ${BUDGET_SPEED:-450} )) m
  for m in "${MODELS[@]}"; do
    bench_run "$end" 120 "$m"
    bench_run "$end" 120 "$m" --channels-last
  done
  finetune_run "$end" 120
  finetune_run "$end" 120 --channels-last
}

phase_compile() {
  local end=$(( $(date +%s) + ${BUDGET_COMPILE:-560} )) m
  if [ "${SUITE_TINY:-0}" = 1 ] && [ "${SUITE_TINY_COMPILE:-0}" != 1 ]; then
    echo "-- compile phase: skipped in the CPU dry run (set SUITE_TINY_COMPILE=1 to compile on CPU: minutes)"
    return
  fi
  # compiling takes minutes per backend: masked and packed only (SUITE_COMPILE_BACKENDS to change), the most wanted
  # runs first: the first model (base) in channels_last (the layout packed uses inside), then NCHW, the finetune
  # step, then the other models in channels_last, then NCHW
  local BACKENDS=${SUITE_COMPILE_BACKENDS:-masked,packed}
  bench_run "$end" 360 "${MODELS[0]}" --compile --channels-last
  bench_run "$end" 300 "${MODELS[0]}" --compile
  finetune_run "$end" 240 --compile --channels-last
  for m in "${MODELS[@]:1}"; do bench_run "$end" 300 "$m" --compile --channels-last; done
  for m in "${MODELS[@]:1}"; do bench_run "$end" 300 "$m" --compile; done
}

phase_e2e() {
  local end=$(( $(date +%s) + ${BUDGET_E2E:-420} ))
  local data=$WORK/data pre=$WORK/pretrain ft=$WORK/finetune big=$WORK/pretrain-big
  step jpegs "$end" 120 $PY bench/gpu_suite.py jpegs "$data/pretrain" --n $N_PRE --width $JPEG_W --height $JPEG_H \
    && step jpegs-labeled "$end" 120 $PY bench/gpu_suite.py jpegs "$data/labeled" --n $N_FT --val $N_VAL \
         --classes $FT_CLASSES --width $JPEG_W --height $JPEG_H || { merge; return; }
  local common=(device=$DEVICE data.image_size=$SIZE data.batch_size=$BATCH data.num_workers=$WORKERS
                log.progress=false log.tensorboard=false log.every_steps=5 checkpoint.keep_every_epochs=0)
  local spe=$(( N_PRE / BATCH )) total kill
  total=$(( spe * PRE_EPOCHS )); kill=$(( total * 2 / 5 ))
  # pretrain: SIGKILL at ~40% of the steps (checkpoint every 10 steps), then the same command resumes it
  step e2e-pretrain "$end" 300 $PY bench/gpu_suite.py e2e --name e2e-pretrain --model $E2E_SMALL --out "$pre" \
    --batch $BATCH --epochs $PRE_EPOCHS --total-steps $total --kill-step $kill --timeout 280 \
    --json "$REC/e2e-pretrain.json" --log "$LOGS/e2e-pretrain-runs.log" -- \
    $PY -m fcmae pretrain model.name=$E2E_SMALL "${common[@]}" "${EXTRA[@]}" data.path="$data/pretrain" \
    output_dir="$pre" optim.epochs=$PRE_EPOCHS optim.warmup_epochs=1 optim.blr=1.5e-3 checkpoint.every_steps=10 \
    log.vis_every_epochs=$PRE_EPOCHS
  merge
  if [ -f "$pre/last.pt" ]; then  # finetune from it: killed and resumed too
    spe=$(( N_FT / BATCH )); total=$(( spe * FT_EPOCHS )); kill=$(( total / 2 ))
    step e2e-finetune "$end" 240 $PY bench/gpu_suite.py e2e --name e2e-finetune --model $E2E_SMALL --out "$ft" \
      --batch $BATCH --epochs $FT_EPOCHS --total-steps $total --kill-step $kill --timeout 220 \
      --json "$REC/e2e-finetune.json" --log "$LOGS/e2e-finetune-runs.log" -- \
      $PY -m fcmae finetune model.name=$E2E_SMALL model.init="$pre/last.pt" "${common[@]}" data.path="$data/labeled" \
      data.eval_batch_size=$BATCH output_dir="$ft" optim.epochs=$FT_EPOCHS optim.warmup_epochs=1 \
      checkpoint.every_steps=5
    merge
  fi
  # the bigger model, uninterrupted: its img/s against the bench's packed step rate
  spe=$(( N_PRE / BATCH )); total=$(( spe * BIG_EPOCHS ))
  step e2e-pretrain-big "$end" 200 $PY bench/gpu_suite.py e2e --name e2e-pretrain-big --model $E2E_BIG --out "$big" \
    --batch $BATCH --epochs $BIG_EPOCHS --total-steps $total --timeout 180 \
    --json "$REC/e2e-pretrain-big.json" --log "$LOGS/e2e-pretrain-big-runs.log" -- \
    $PY -m fcmae pretrain model.name=$E2E_BIG "${common[@]}" "${EXTRA[@]}" data.path="$data/pretrain" \
    output_dir="$big" optim.epochs=$BIG_EPOCHS optim.warmup_epochs=1 checkpoint.every_steps=1000 \
    log.vis_every_epochs=0
  merge
  # the loader alone, on as many workers as the pretraining runs used
  if step loader "$end" 120 $PY bench/data_loading.py --images $LOADER_IMAGES --workers $(( WORKERS > 0 ? WORKERS : 1 )) \
       --size $SIZE --batch $BATCH; then
    $PY bench/gpu_suite.py loader --name loader --log "$LOGS/loader.log" --json "$REC/loader.json" \
      --command "python bench/data_loading.py --images $LOADER_IMAGES --workers $WORKERS --size $SIZE --batch $BATCH"
  fi
  merge
}

for p in "${PHASES[@]}"; do
  echo "== phase $p ($(left)s left in this call)"
  "phase_$p"
done
merge
echo "== results ($(( $(date +%s) - START ))s)"
cat "$WORK/table.txt"
