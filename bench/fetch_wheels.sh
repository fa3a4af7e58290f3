#!/usr/bin/env bash
# Download the wheels bench/gpu_suite.sh installs on the GPU machine (which has no network) into .whl/.
#
# The GPU image already holds torch, torchvision, timm, triton, numpy, pillow, pytest, cloudpickle and
# typing_extensions; of fcmae's needs it lacks webdataset (+ braceexpand) and submitit. einops, tqdm, safetensors and
# pyyaml are there too, but small, so they travel pinned to the versions of our venv as well. tensorboard and
# scikit-learn are left out on purpose (large; the suite runs with log.tensorboard=false and no digits data).
# Versions: those of the shared venv (`pip freeze`), Python 3.12 x86_64 (the GPU machine's python3).
#
#   bash bench/fetch_wheels.sh            # then: run(..., carry=[".whl"], command="bash bench/gpu_suite.sh ...")
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl}
MAX_MIB=${MAX_MIB:-40}
WHEELS=(
  webdataset==1.0.2 braceexpand==0.1.7 submitit==1.5.4
  einops==0.8.2 tqdm==4.70.1 safetensors==0.8.0 PyYAML==6.0.3
)
mkdir -p "$DEST"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${WHEELS[@]}"
ls -l "$DEST"/*.whl
mib=$(du -sm "$DEST" | cut -f1)
echo "$DEST: $(ls "$DEST"/*.whl | wc -l) wheels, ${mib} MiB (limit ${MAX_MIB} MiB)"
if [ "$mib" -gt "$MAX_MIB" ]; then
  echo "fetch_wheels: error: $DEST holds ${mib} MiB, over ${MAX_MIB} MiB; remove what the GPU machine already has" >&2
  exit 1
fi
