# Fresh-machine entry points: `make demo` and `make test` create/refresh .venv themselves.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed
# pip prints a warning per package for the machine's file-based extra indexes; keep real errors.
QUIET := 2> >(grep -v "is neither a file nor a directory" >&2)

.PHONY: setup demo test test-fast lint clean slurm-up slurm-down

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip $(QUIET)
	@# Without CUDA, install the CPU build of torch first: an unpinned torch pulls GBs of CUDA wheels.
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(PIP) install -q "torch>=2.6" $(QUIET); \
	else \
	  $(PIP) install -q "torch==$(TORCH_VERSION)" $(QUIET); \
	fi
	$(PIP) install -q -e '.[dev,slurm]' $(QUIET)
	touch $(STAMP)

demo: setup
	$(BIN)/python launch/demo.py

# Two pytest-xdist workers: a launcher test's ranks leave a core idle much of the time (start-up, rank 0 first).
test: setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -ra -n 2 --dist loadgroup --durations=25 tests

test-fast: setup
	$(BIN)/python -m pytest -q -ra -n 2 --dist loadgroup -m "not slow" tests

# A real two-node SLURM cluster on this host for tests/test_slurm.py and docs/slurm.md (apt-installs it if missing).
slurm-up:
	bash launch/slurm/local_cluster.sh up

slurm-down:
	bash launch/slurm/local_cluster.sh down

lint: setup
	$(BIN)/lint-imports
	$(BIN)/ruff check moetrain launch tests
	$(BIN)/ruff format --check moetrain launch tests

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
