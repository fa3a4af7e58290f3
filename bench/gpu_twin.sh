#!/usr/bin/env bash
# A twin of the GPU image, here: proves without a GPU that the one device call (bench/gpu_call.sh) will not die on
# set-up. Builds a venv holding only what the GPU image has (as read on the lent machines: torch as here, and the packages
# below; not webdataset, braceexpand, submitit, simplejpeg), fetches the carried wheel set for its Python
# (bench/fetch_wheels.sh with PYVER = the twin's), and runs in it, with those wheels only:
#   1. the imports fail WITHOUT the carried wheels (the twin is really missing them),
#   2. `python -m fcmae --help`, and collecting the CUDA tests,
#   3. the one call's CPU dry run (GPU_CALL_DRY=1), which must finish under its own deadline with every step passed.
#
#   bash bench/gpu_twin.sh          # ~1 min to build the venv (torch from local disk), ~3 min for the dry run
#
# TWIN=/path keeps the venv elsewhere (default /tmp/fcmae-gpu-twin; reused when it exists), GPU_CALL_SECONDS the dry
# run's deadline (default: the real call's 470 s).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TWIN=${TWIN:-/tmp/fcmae-gpu-twin}
TORCH=${TORCH:-$(sed -n 's/^TORCH ?= //p' Makefile)}  # the torch build the Makefile pins (as here)
# What the GPU image has that fcmae touches (timm at an older release: the carried pin must win).
IMAGE=(timm==1.0.20 einops pillow pyyaml safetensors tensorboard tqdm pytest pytest-timeout numpy scikit-learn
       opencv-python-headless)
PY=$TWIN/bin/python
fail() { echo "gpu_twin: FAILED: $*" >&2; exit 1; }

if [ ! -x "$PY" ]; then
  python3 -m venv "$TWIN"
  "$PY" -m pip install --quiet $TORCH
  "$PY" -m pip install --quiet "${IMAGE[@]}"
fi
for absent in simplejpeg webdataset braceexpand submitit; do
  ! "$PY" -c "import $absent" 2>/dev/null || fail "the twin has $absent, which the GPU image lacks"
done
echo "== twin: $($PY -V), torch $($PY -c 'import torch; print(torch.__version__)'), no simplejpeg/webdataset/submitit"

WHEELS=$TWIN/wheels
PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")') DEST=$WHEELS \
  bash bench/fetch_wheels.sh | tail -1

echo "== 1. without the carried wheels, fcmae does not import"
! PYTHONPATH=$ROOT "$PY" -c "import fcmae.cli" 2>/dev/null || fail "fcmae.cli imports without the carried wheels"

SITE=$(mktemp -d /tmp/fcmae-twin-site.XXXXXX)
"$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl
echo "== 2. with them: fcmae --help, jobs, the CUDA tests collected"
PYTHONPATH=$SITE:$ROOT "$PY" -m fcmae --help > /dev/null || fail "python -m fcmae --help"
PYTHONPATH=$SITE:$ROOT "$PY" -c "import jobs.cli, timm, sys; sys.exit(timm.__version__ != '$(
  .venv/bin/python -c 'import timm; print(timm.__version__)')')" || fail "jobs.cli, or the carried timm is not first"
PYTHONPATH=$SITE:$ROOT "$PY" -m pytest -q --collect-only -p no:cacheprovider tests/test_cuda.py \
  "tests/test_packed.py::test_compiled_train_step_matches_eager" | tail -1
rm -rf "$SITE"

echo "== 3. the one call's CPU dry run, with the twin's wheels as its carry"
OUT=$(mktemp -d /tmp/fcmae-twin-out.XXXXXX)
GPU_CALL_DRY=1 GPU_CALL_WHEELS=$WHEELS PYTHON=$PY OUT=$OUT bash bench/gpu_call.sh
"$PY" - "$OUT/gpu-call.json" <<'EOF' || fail "the dry run: see $OUT"
import json, sys
doc = json.load(open(sys.argv[1]))
names = sorted(r.get("name") or r["schema"] for r in doc["records"])
failed = [f"{r['name']}: {r['reason']}" for r in doc["records"] if r["schema"] == "fcmae-failure/1"]
print(f"{len(doc['records'])} records: {', '.join(names)}")
assert not failed, failed
EOF
echo "== gpu_twin: passed (dry-run results in $OUT)"
