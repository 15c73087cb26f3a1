# Two commands matter: `make demo` (train a small recorded run, then open the dashboard on it)
# and `make test` (install everything and run the whole suite). Both create the environment if needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
CONSTRAINTS := requirements/constraints.txt

.PHONY: venv test demo bench lint typecheck browser clean

# torch first, pinned: any other torch (or an unpinned one) pulls several GB of CUDA wheels.
$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(CONSTRAINTS) torch==2.13.0
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[all,dev]"
	@touch $(STAMP)

venv: $(STAMP)

browser:
	@bash .ci/ensure-chromium

# Two workers, one test file each at a time (module fixtures are built once): 9.5 min instead of 14.5 on a
# 2-core machine, because much of the suite waits on subprocesses, servers and the browser.
# `make test PYTEST_WORKERS=0` runs it in one process.
PYTEST_WORKERS ?= 2

test: venv browser
	$(PY) -m pytest $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile) $(PYTEST_ARGS)

demo: venv
	$(PY) -m comgra_callbacks.demo $(DEMO_ARGS)

bench: venv
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

lint: venv
	$(VENV)/bin/ruff check comgra_callbacks tests benchmarks

typecheck: venv
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache
