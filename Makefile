# Two entry points: `make demo` (the main job) and `make test` (lint + the test suite).
# Both create/reuse a local virtual environment in .venv and install pinned versions.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.msjax-installed
export JAX_PLATFORMS ?= cpu

.PHONY: venv test lint format demo clean

venv: $(STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test,tpu]"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check msjax tests experiments setup.py
	$(VENV)/bin/ruff format --check msjax tests experiments setup.py

format: $(STAMP)
	$(VENV)/bin/ruff check --fix msjax tests experiments setup.py
	$(VENV)/bin/ruff format msjax tests experiments setup.py

test: lint
	$(PY) -m pytest -n 2 tests

demo: $(STAMP)
	$(PY) -m experiments.demo

clean:
	rm -rf $(VENV) demo_out .pytest_cache
