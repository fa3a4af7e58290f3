#!/usr/bin/env bash
# Download the wheels bench/gpu_call.sh installs on the GPU machine (no network there) into .whl/.
#
# The GPU machines' image (as read there, 2026-11) has torch, torchvision, numpy, pillow, pyyaml, einops, safetensors, tqdm,
# tensorboard, pytest, scikit-learn and a timm of unknown version; it lacks simplejpeg (the pretraining loader's
# JPEG decoder: `import fcmae.cli` needs it), webdataset + braceexpand, submitit (+ cloudpickle, not listed there).
# Those travel, plus timm pinned to the version the tests pass with here (the backends use timm internals), each at
# this venv's version, for Python $PYVER (3.12: the GPU machine's python3) on x86_64. bench/gpu_twin.sh proves the
# set is enough, with PYVER=3.11 wheels in a venv holding only what the GPU image has.
#
#   bash bench/fetch_wheels.sh            # then: run(command="bash bench/gpu_call.sh", carry=[".whl"], ...)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl}
MAX_MIB=${MAX_MIB:-20}
PACKAGES=(simplejpeg webdataset braceexpand submitit cloudpickle timm)
pins=()
for p in "${PACKAGES[@]}"; do
  v=$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p") \
    || { echo "fetch_wheels: error: $p is not installed in $PYTHON; run make venv first" >&2; exit 1; }
  pins+=("$p==$v")
done
mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # exactly this set: a stale wheel of another version would be installed beside it
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${pins[@]}"
ls -l "$DEST"/*.whl
mib=$(du -sm "$DEST" | cut -f1)
echo "$DEST: $(ls "$DEST"/*.whl | wc -l) wheels (${pins[*]}), ${mib} MiB, Python $PYVER"
if [ "$mib" -gt "$MAX_MIB" ]; then
  echo "fetch_wheels: error: $DEST holds ${mib} MiB, over ${MAX_MIB} MiB; carry only what the GPU image lacks" >&2
  exit 1
fi
