#!/usr/bin/env bash
# Build MinkowskiEngine 0.5.4 (the reference's sparse library) for the torch in a venv, cache the wheel, install it.
#
#   scripts/build_minkowski.sh [PYTHON]        (PYTHON defaults to .venv/bin/python; `make minkowski` calls this)
#
# PyPI has 0.5.4 only as an sdist, which needs small fixes on Python >= 3.10 and modern setuptools/torch
# (see the `patch_sources` function). The compiled extension only works with the exact torch it was built
# against, so the wheel is cached per torch + Python + CPU/CUDA:
#   ${FCMAE_CACHE:-$HOME/.cache/fcmae}/wheels/<torch>-<cpXY>-<cpu|cuda>/minkowskiengine-0.5.4-*.whl
# and reused when present (delete that folder to force a rebuild).
#
# Environment:
#   MINKOWSKI_CUDA=auto|0|1  auto (default): CUDA build only when torch sees a GPU and nvcc exists; else CPU.
#                            A CUDA torch on a machine without a GPU (as here) gets the CPU build.
#   MAX_JOBS=N               parallel compile jobs (default 2; ~1.2 GB RAM per job).
#   MINKOWSKI_SDIST=PATH     use this local MinkowskiEngine-0.5.4.tar.gz instead of downloading it.
#   FCMAE_NO_APT=1           never call apt-get (then install libopenblas-dev, ninja-build, g++ yourself).
set -euo pipefail

PY=${1:-.venv/bin/python}
VERSION=0.5.4
SDIST_SHA256=b1879c00d0b0b1d30ba622cce239886a7e3c78ee9da1064cdfe2f64c2ab15f94
CACHE=${FCMAE_CACHE:-$HOME/.cache/fcmae}
export MAX_JOBS=${MAX_JOBS:-2}

log() { echo "[minkowski] $*"; }
die() { echo "[minkowski] error: $*" >&2; exit 1; }

[ -x "$PY" ] || die "no python at $PY; run 'make venv' first (or pass the venv's python as the first argument)"
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")

installed_ok() {
    # Importing checks the extension links against this torch (a stale build fails with undefined symbols).
    "$PY" - <<'EOF' >/dev/null 2>&1
import MinkowskiEngine as ME
assert ME.__version__ == "0.5.4"
EOF
}

if installed_ok; then
    log "MinkowskiEngine $VERSION already installed and importable in $PY"
    exit 0
fi

read -r TORCH_VER PYTAG HAS_GPU TORCH_CUDA < <("$PY" - <<'EOF'
import sys, torch
print(torch.__version__, f"cp{sys.version_info[0]}{sys.version_info[1]}",
      int(torch.cuda.is_available()), torch.version.cuda or "none")
EOF
)

case "${MINKOWSKI_CUDA:-auto}" in
    1) VARIANT=cuda ;;
    0) VARIANT=cpu ;;
    auto) if [ "$HAS_GPU" = 1 ] && [ "$TORCH_CUDA" != none ] && command -v nvcc >/dev/null; then VARIANT=cuda; else VARIANT=cpu; fi ;;
    *) die "MINKOWSKI_CUDA must be auto, 0 or 1 (got '${MINKOWSKI_CUDA}')" ;;
esac
[ "$VARIANT" = cpu ] || [ "$TORCH_CUDA" != none ] || die "MINKOWSKI_CUDA=1 needs a CUDA build of torch (have $TORCH_VER)"

WHEEL_DIR="$CACHE/wheels/${TORCH_VER}-${PYTAG}-${VARIANT}"
# New setuptools names the wheel minkowskiengine-*.whl, older ones MinkowskiEngine-*.whl: match either.
find_wheel() { find "$1" -maxdepth 1 -iname "minkowskiengine-$VERSION-*.whl" 2>/dev/null | head -n1 || true; }
WHEEL=$(find_wheel "$WHEEL_DIR")

install_system_deps() {
    local missing=()
    for pkg in libopenblas-dev ninja-build g++; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    local inc
    inc=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
    [ -f "$inc/Python.h" ] || missing+=("python3-dev")
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ -n "${FCMAE_NO_APT:-}" ] || ! command -v apt-get >/dev/null; then
        die "missing build dependencies: ${missing[*]} (install them, e.g. apt-get install -y ${missing[*]})"
    fi
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    log "installing build dependencies: ${missing[*]}"
    $sudo apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null \
        || { $sudo apt-get update >/dev/null && $sudo apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; } \
        || die "apt-get install ${missing[*]} failed"
}

patch_sources() {
    # $1: unpacked sdist. Every fix is checked so a changed sdist fails loudly instead of silently.
    local src=$1
    # Python >= 3.10 moved the ABCs out of `collections`.
    for f in MinkowskiCommon.py MinkowskiCoordinateManager.py MinkowskiTensorField.py utils/quantization.py; do
        grep -q "^from collections import Sequence$" "$src/MinkowskiEngine/$f" || die "unexpected source in $f"
        sed -i 's/^from collections import Sequence$/from collections.abc import Sequence/' "$src/MinkowskiEngine/$f"
    done
    f="$src/MinkowskiEngine/MinkowskiKernelGenerator.py"
    grep -q "^from collections import Sequence, namedtuple$" "$f" || die "unexpected source in $f"
    sed -i 's/^from collections import Sequence, namedtuple$/from collections import namedtuple\nfrom collections.abc import Sequence/' "$f"
    # torch._six is gone from modern torch (only the optional gradcheck utility uses it).
    f="$src/MinkowskiEngine/utils/gradcheck.py"
    sed -i 's/^from torch._six import container_abcs, istuple$/import collections.abc as container_abcs\nistuple = lambda x: isinstance(x, tuple)/' "$f"
    # setup.py runs `pip uninstall MinkowskiEngine` with whatever pip is on PATH (maybe another env): drop it;
    # this script installs with the venv's own pip.
    grep -q '^run_command("pip", "uninstall", "MinkowskiEngine", "-y")$' "$src/setup.py" || die "unexpected setup.py"
    sed -i 's/^run_command("pip", "uninstall", "MinkowskiEngine", "-y")$/pass  # fcmae: uninstall handled by the build script/' "$src/setup.py"
}

fetch_sdist() {
    # $1: destination folder. pip's metadata step imports numpy.distutils, which clashes with new setuptools
    # unless setuptools uses the stdlib distutils; it also runs setup.py, hence the venv's pip first on PATH.
    local dst=$1
    if [ -n "${MINKOWSKI_SDIST:-}" ]; then
        cp "$MINKOWSKI_SDIST" "$dst/"
    else
        log "downloading the MinkowskiEngine==$VERSION sdist from PyPI"
        PATH="$(dirname "$PY"):$PATH" SETUPTOOLS_USE_DISTUTILS=stdlib "$PY" -m pip download --quiet --no-deps \
            --no-binary :all: --no-build-isolation "MinkowskiEngine==$VERSION" -d "$dst" \
            || die "pip download MinkowskiEngine==$VERSION failed (offline? set MINKOWSKI_SDIST=path/to/sdist)"
    fi
    local tgz
    tgz=$(ls "$dst"/MinkowskiEngine-"$VERSION".tar.gz) || die "no sdist in $dst"
    echo "$SDIST_SHA256  $tgz" | sha256sum -c --quiet - || die "sdist checksum mismatch: $tgz"
    tar xzf "$tgz" -C "$dst"
}

if [ -z "$WHEEL" ]; then
    install_system_deps
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/minkowski-build.XXXXXX")
    log "working in $WORK (removed on success, kept on failure)"
    fetch_sdist "$WORK"
    SRC="$WORK/MinkowskiEngine-$VERSION"
    patch_sources "$SRC"
    FLAGS=(--blas=openblas)  # explicit BLAS: skips numpy.distutils' BLAS search (gone on new numpy/Python)
    if [ "$VARIANT" = cpu ]; then FLAGS+=(--cpu_only); else FLAGS+=(--force_cuda); fi
    log "building the $VARIANT wheel for torch $TORCH_VER / $PYTAG with MAX_JOBS=$MAX_JOBS (5-8 min on 2 cores)"
    start=$SECONDS
    (cd "$SRC" && "$PY" setup.py bdist_wheel "${FLAGS[@]}" -d "$WORK/dist") > "$WORK/build.log" 2>&1 \
        || { tail -n 40 "$WORK/build.log" >&2; die "build failed (log above; full log $WORK/build.log)"; }
    log "built in $((SECONDS - start)) s"
    built=$(find_wheel "$WORK/dist")
    [ -n "$built" ] || die "no wheel in $WORK/dist (full log $WORK/build.log)"
    mkdir -p "$WHEEL_DIR"
    # Copy then rename: a concurrent or interrupted build never leaves a half-written wheel in the cache.
    cp "$built" "$WHEEL_DIR/.$(basename "$built").tmp"
    mv "$WHEEL_DIR/.$(basename "$built").tmp" "$WHEEL_DIR/$(basename "$built")"
    WHEEL="$WHEEL_DIR/$(basename "$built")"
    rm -rf "$WORK"
else
    log "using cached wheel $WHEEL"
fi

"$PY" -m pip install --quiet --no-deps --force-reinstall "$WHEEL"
installed_ok || die "MinkowskiEngine installed from $WHEEL but does not import in $PY; delete $WHEEL_DIR and rerun"
log "MinkowskiEngine $VERSION ($VARIANT) installed in $PY"
