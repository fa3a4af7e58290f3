# `make demo` and `make test` create .venv when it is missing and (re)install the project when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
# Pinned so the CPU machines here take torch from local disk; override for another CUDA/torch build.
TORCH ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python

.PHONY: venv demo test clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: venv
	$(PY) -m fcmae demo

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
