# Two commands matter: `make demo` (set up, train a small GPT with --cp-backend dcp on 4 CPU ranks, draw
# the figures) and `make test` (set up, run the whole suite). Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/demo

# The one-shot GPU check (tools/gpu_verify.py, at most ~5 minutes; exits non-zero on any failure). It runs
# with the GPU image's own python (Dockerfile); elsewhere: make setup && make gpu-check GPU_PYTHON=.venv/bin/python
GPU_PYTHON ?= python3

.PHONY: setup test demo gpu-check clean lint

setup: $(STAMP)

$(STAMP): requirements-cpu.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-cpu.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) examples/cpu_demo.py --run-dir $(RUN_DIR)

gpu-check:
	$(GPU_PYTHON) tools/gpu_verify.py

clean:
	rm -rf $(VENV) runs build *.egg-info .pytest_cache
