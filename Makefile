# Two commands matter: `make demo` (set up, train a small GPT with --cp-backend dcp on 4 CPU ranks, draw
# the figures) and `make test` (set up, run the whole suite). Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/demo

.PHONY: setup test demo clean lint

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

clean:
	rm -rf $(VENV) runs build *.egg-info .pytest_cache
