# IMG Studio. Quick start: `make run` (sets up .venv, starts the app) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 7860
PRESET ?=

.PHONY: run test test-fast setup bench bench-gpu clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) app.py --host $(HOST) --port $(PORT) $(if $(PRESET),--preset $(PRESET),)

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

# The same suite without the tests marked slow (browser, subprocess, multi-process).
test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" tests

bench: setup
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_core.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_mllm.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_trainer.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_ui.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_reliability.py

# Measured seconds and GPU memory of the README memory table (random-weight real architectures, no downloads).
bench-gpu: setup
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_gpu.py

clean:
	rm -rf $(VENV) .pytest_cache
