# `make demo` and `make test` create .venv when it is missing and (re)install the project when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
# Pinned so the CPU machines here take torch from local disk; override for another CUDA/torch build.
TORCH ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python

.PHONY: venv demo demo-full test minkowski clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: venv
	$(PY) -m fcmae demo

# the recipe that shows the gain on the digits: 120 FCMAE epochs (~25 min on 2 CPU cores)
demo-full: venv
	$(PY) -m fcmae demo --full

test: venv
	$(PY) -m pytest -q

# MinkowskiEngine 0.5.4 for the `minkowski` backend: built once per torch + Python version into
# ${FCMAE_CACHE:-~/.cache/fcmae}/wheels/, then installed into the venv (see README).
minkowski: venv
	scripts/build_minkowski.sh $(PY)

clean:
	rm -rf $(VENV) build *.egg-info
