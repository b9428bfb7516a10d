# xmodal — every target bootstraps .venv when it is missing (or when pyproject.toml changed).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xmodal-installed
export PYTHONPATH := $(CURDIR)/src:$(PYTHONPATH)
export XMODAL_ROOT ?= $(CURDIR)

.PHONY: help install demo test test-all test-slurm lint format bench rehearse table wandb-sync clean-outputs

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install xmodal with its dev tools

demo: $(STAMP)  ## pretrain the tiny CLIP on the shapes world, run every method, print the tables
	$(PY) scripts/demo.py

test: $(STAMP)  ## fast test suite (no slow/gpu/slurm tests)
	$(PY) -m pytest -q -m "not slow and not gpu and not slurm" -p no:cacheprovider

test-all: $(STAMP)  ## every test except the GPU and SLURM ones, slow ones included
	$(PY) -m pytest -q -m "not gpu and not slurm" -p no:cacheprovider

# Starts a single-node SLURM here (installs slurm-wlm + munge if missing; root), runs the tests
# marked `slurm` against it, and stops it again unless it was already running.
test-slurm: $(STAMP)  ## SLURM tests on a single-node cluster started here (scripts/slurm_local.sh)
	@if scripts/slurm_local.sh status >/dev/null 2>&1; then up=1; else up=0; fi; \
	scripts/slurm_local.sh start || exit 1; \
	$(PY) -m pytest -v -m slurm -p no:cacheprovider --durations=0; rc=$$?; \
	if [ $$up = 0 ]; then scripts/slurm_local.sh stop; \
	else echo "slurm_local: left running (it was running before make test-slurm)"; fi; \
	exit $$rc

lint: $(STAMP)  ## ruff lint + format check
	$(PY) -m ruff check src tests benchmarks scripts
	$(PY) -m ruff format --check src tests benchmarks scripts

format: $(STAMP)  ## ruff autofix + format
	$(PY) -m ruff check --fix src tests benchmarks scripts
	$(PY) -m ruff format src tests benchmarks scripts

bench: $(STAMP)  ## performance benchmarks: print measured ratios against baselines
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

rehearse: $(STAMP)  ## every backbone at full size, random weights, reloaded in every weight format (~25 min)
	$(PY) scripts/rehearse.py

table: $(STAMP)  ## render a paper table from run directories: make table TABLE=<name>
	$(PY) -m xmodal.cli.table table=$(TABLE)

wandb-sync: $(STAMP)  ## upload offline W&B runs under $XMODAL_OUTPUT (default outputs/)
	@runs=$$(find $${XMODAL_OUTPUT:-outputs} -type d -name 'offline-run-*' 2>/dev/null); \
	if [ -z "$$runs" ]; then echo "no offline W&B runs under $${XMODAL_OUTPUT:-outputs}"; \
	else $(VENV)/bin/wandb sync $$runs; fi

clean-outputs:  ## delete outputs/ (run directories, caches, exported checkpoints)
	rm -rf outputs
