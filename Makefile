# IMG Studio. Quick start: `make run` (sets up .venv, starts the app) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 7860
PRESET ?=

.PHONY: run test test-fast test-compat setup reference-packages bench bench-gpu clean

$(VENV)/.installed: requirements.txt requirements-lock.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

# Reference implementations that tests compare the ports with, where they cannot be dependencies: the
# `image-reward` package's own code (it pins timm 0.6 and asks for OpenAI's clip from GitHub) with timm and
# fairscale, and open_clip with ftfy (HPS's CLIP and text cleanup), installed without their dependencies and
# put on the path only by the tests' subprocesses (tests/reference/).
# Without them (no PyPI) those comparisons are skipped, with a warning here.
REFERENCE := .reference-packages
$(REFERENCE)/.installed: $(VENV)/.installed Makefile
	rm -rf $(REFERENCE)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation --target $(REFERENCE) \
		image-reward==1.5 timm==1.0.31 fairscale==0.4.13 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 \
		&& touch $@ \
		|| echo "warning: could not install the reference packages; their comparisons will be skipped"

reference-packages: $(REFERENCE)/.installed

run: setup
	$(PY) app.py --host $(HOST) --port $(PORT) $(if $(PRESET),--preset $(PRESET),)

test: setup reference-packages
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

# The same suite without the tests marked slow (browser, subprocess, multi-process).
test-fast: setup reference-packages
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" tests

# The fast suite on the oldest supported set (requirements-compat.txt: torch 2.9.1, as ZeroGPU provides it,
# with requirements.txt's ranges) in a venv of its own, plus the Space bundle's app answering /generate and
# /refine there. CI runs it after `make test` (.ci/run). The venv (about 7.7 GB: PyPI's torch wheels bring
# CUDA) lives outside the clone, named by the hash of the requirement files it was built from, so a fresh
# clone reuses it and a changed requirement builds a new one. COMPAT_PYTHON: the first of python3.12 (on
# PATH or a pyenv 3.12) and python3 that runs.
COMPAT_HASH := $(shell cat requirements.txt requirements-compat.txt img_core/space_bundle.py | sha256sum | cut -c1-12)
COMPAT_CACHE := $(HOME)/.cache/img-studio-venvs
COMPAT_VENV ?= $(COMPAT_CACHE)/compat-$(COMPAT_HASH)
COMPAT_CANDIDATES := python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3
COMPAT_PYTHON ?= $(firstword $(foreach p,$(COMPAT_CANDIDATES),$(if $(shell $(p) -c "" 2>/dev/null && echo ok),$(p))))
$(COMPAT_VENV)/.installed:
	rm -rf $(COMPAT_CACHE)/compat-* $(COMPAT_VENV)  # older compat venvs (other requirements): 7.7 GB each
	$(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(COMPAT_VENV)/bin/python -m pip install --quiet -r requirements-compat.txt -r requirements.txt "pytest>=8" "playwright>=1.50"
	# the Space bundle's own requirements.txt (requirements.txt's ranges, torch pinned, plus `spaces`) installs there
	$(COMPAT_VENV)/bin/python -m img_core space-bundle --out $(COMPAT_VENV).bundle
	$(COMPAT_VENV)/bin/python -m pip install --quiet -r $(COMPAT_VENV).bundle/requirements.txt
	rm -rf $(COMPAT_VENV).bundle
	touch $@

test-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python -c "import sys, torch; print('test-compat: Python', sys.version.split()[0], 'torch', torch.__version__)"
	HF_HUB_OFFLINE=1 $(COMPAT_VENV)/bin/python -m pytest -q -m "not slow" tests
	HF_HUB_OFFLINE=1 $(COMPAT_VENV)/bin/python -m pytest -q tests/test_space_bundle.py

bench: setup
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_core.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_mllm.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_trainer.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_ui.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_reliability.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_trainer_reliability.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_history.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_export.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_evaluate.py

# Measured seconds and GPU memory of the README memory table (random-weight real architectures, no downloads).
bench-gpu: setup
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_gpu.py

clean:
	rm -rf $(VENV) $(COMPAT_VENV) $(REFERENCE) .pytest_cache
