# bnsweep: `make sweep` runs a study, `make test` checks everything. Both set themselves up.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BNSWEEP := $(VENV)/bin/bnsweep
STAMP := $(VENV)/.installed-bnsweep
ARGS ?=
SWEEP ?= default
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The offline dataset mirror beside this checkout, when there is one (env wins).
export BNSWEEP_DATA_MIRROR ?= $(abspath $(wildcard ../shared/data))

.PHONY: setup sweep sweep-slurm report claims train test test-fast test-cluster bench bench-peers ui optuna-ui down lint clean chromium

setup: $(STAMP)

# torch/torchvision pinned to the builds on our machines; other platforms take pyproject's ranges.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 \
	  || $(PY) -m pip install -q --disable-pip-version-check torch torchvision
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

sweep: $(STAMP)  ## a study: make sweep SWEEP=placement_x_activation ARGS="workers=2"
	$(BNSWEEP) sweep sweep=$(SWEEP) $(ARGS)

sweep-slurm: $(STAMP)  ## the study as a SLURM job array: make sweep-slurm SWEEP=default ARGS="launcher.workers=8 storage=postgresql://..."
	$(BNSWEEP) sweep sweep=$(SWEEP) launcher=slurm $(ARGS)

report: $(STAMP)  ## the study report of a sweep (reads it, never trains): make report SWEEP=default
	$(BNSWEEP) report sweep=$(SWEEP) $(ARGS)

claims: $(STAMP)  ## the seeds' claims tested: runs (or resumes) conf/sweep/claims_*.yaml, writes reports/claims/
	$(BNSWEEP) claims $(ARGS)

train: $(STAMP)  ## one run: make train ARGS="experiment=seed001_bn"
	$(BNSWEEP) train $(ARGS)

# No root needed: the report test renders with headless Chromium when one is on PATH and otherwise skips,
# saying so (.ci/run installs Debian's package first, so CI always renders; `make chromium` does it here).
# Two test processes (pytest-xdist, a file each at a time): most tests wait on a server or a subprocess, so one
# process left a core idle. TEST_JOBS=1 runs them in one process, in order.
TEST_JOBS ?= 2
test: $(STAMP)  ## the whole suite, CPU only; starts (and stops) its own MLflow server
	$(PY) -m ruff check src tests
	$(PY) -m pytest -q -m "not cluster" $(if $(filter-out 1,$(TEST_JOBS)),-n $(TEST_JOBS) --dist loadfile) $(ARGS)  # tests/cluster: make test-cluster

test-fast: $(STAMP)  ## the edit loop (< 3 min): every test that starts no process, server or sweep
	$(PY) -m ruff check src tests
	$(PY) -m pytest -q -m "not cluster and not slow" $(ARGS)

# A SLURM cluster of 3 nodes on this machine (munge, slurmctld, a slurmd per node, slurmdbd over MariaDB) and
# PostgreSQL, started by the project's scripts (Debian packages installed when missing) and always stopped after.
test-cluster: $(STAMP)  ## the SLURM + PostgreSQL tests (tests/cluster), against real daemons
	@export SLURM_CONF=/tmp/bnsweep-slurm/etc/slurm.conf BNSWEEP_TEST_PG=postgresql://postgres@127.0.0.1:54329/ci; \
	trap '$(SUDO) bash scripts/pg-local.sh stop; $(SUDO) bash scripts/slurm-local.sh stop' EXIT; \
	$(SUDO) env NODES=3 bash scripts/slurm-local.sh start && $(SUDO) bash scripts/pg-local.sh start && \
	$(PY) -m pytest -q -m cluster tests/cluster $(ARGS)

bench: $(STAMP)  ## side-by-side speed ratios; numbers go into the issue notes
	$(BNSWEEP) bench $(ARGS)

KERAS_VENV ?= .venv-keras
bench-peers: $(STAMP)  ## bench's peers section plus the seeds' own Keras code (TensorFlow in its own venv, if it installs)
	@if [ ! -x $(KERAS_VENV)/bin/python ]; then \
	  python3 -m venv $(KERAS_VENV) && $(KERAS_VENV)/bin/pip install -q tensorflow-cpu numpy >$(KERAS_VENV).log 2>&1 \
	  || { rm -rf $(KERAS_VENV); echo "TensorFlow could not be installed: see $(KERAS_VENV).log"; }; fi; \
	if [ -x $(KERAS_VENV)/bin/python ]; then export BNSWEEP_KERAS_PYTHON=$(abspath $(KERAS_VENV))/bin/python; \
	else export BNSWEEP_KERAS_SKIP="TensorFlow could not be installed here: see $(KERAS_VENV).log"; fi; \
	$(BNSWEEP) bench --only peers $(ARGS)

ui: $(STAMP)  ## the MLflow dashboard over mlruns/ (starts the local server, or finds it running); links each sweep's runs table
	$(BNSWEEP) ui $(ARGS)

optuna-ui: $(STAMP)  ## optuna-dashboard over a sweep's studies, on 127.0.0.1: make optuna-ui SWEEP=default
	$(BNSWEEP) optuna-ui --sweep $(SWEEP) $(ARGS)

down: $(STAMP)  ## stop the local MLflow server
	$(BNSWEEP) down

lint: $(STAMP)
	$(PY) -m ruff check src tests

chromium:  ## headless Chromium (Debian package, apt-get as root) for the report test; not needed by make test
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
