# bnsweep: `make sweep` runs a study, `make test` checks everything. Both set themselves up.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-bnsweep
ARGS ?=
SWEEP ?= default
# The offline dataset mirror beside this checkout, when there is one (env wins).
export BNSWEEP_DATA_MIRROR ?= $(abspath $(wildcard ../shared/data))

.PHONY: setup sweep train test bench ui down lint clean

setup: $(STAMP)

# torch/torchvision pinned to the builds on our machines; other platforms take pyproject's ranges.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 \
	  || $(PY) -m pip install -q --disable-pip-version-check torch torchvision
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

sweep: $(STAMP)  ## a study: make sweep SWEEP=placement_x_activation ARGS="workers=2"
	$(PY) -m bnsweep.sweep sweep=$(SWEEP) $(ARGS)

train: $(STAMP)  ## one run: make train ARGS="experiment=seed001_bn"
	$(PY) -m bnsweep.train $(ARGS)

test: $(STAMP)  ## the whole suite, CPU only; starts (and stops) its own MLflow server
	$(PY) -m ruff check src tests
	$(PY) -m pytest -q $(ARGS)

bench: $(STAMP)  ## side-by-side speed ratios; numbers go into the issue notes
	$(PY) -m bnsweep.bench $(ARGS)

ui: $(STAMP)  ## the MLflow dashboard over mlruns/ (starts the local server, or finds it running)
	$(PY) -m bnsweep.server start $(ARGS)

down: $(STAMP)  ## stop the local MLflow server
	$(PY) -m bnsweep.server stop

lint: $(STAMP)
	$(PY) -m ruff check src tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
