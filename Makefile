# `make demo` and `make test` install what is missing, then run. Both are idempotent and fast once
# installed: the venv is rebuilt only when pyproject.toml changes.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install ffmpeg demo demo-repro lint test test-all bench clean

install: ffmpeg $(STAMP)

# Debian's ffmpeg through apt when we are root; otherwise say what to install.
ffmpeg:
	@command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing ffmpeg with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null; \
	  else \
	    echo "ffmpeg is missing: install it (Debian/Ubuntu: sudo apt-get install ffmpeg) and rerun" >&2; \
	    exit 1; \
	  fi; }

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) is required" >&2; exit 1; }
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

# The whole pipeline on the built-in demo data, on CPU: the Prefect flow (a temporary server), which runs
# the MAM2 and motion branches side by side, each stage on its share of the cores, and every stage
# through DVC (afterwards `dvc status` is clean). `make demo-repro` runs the same stages one at a time.
demo: install
	$(BIN)/mam2 pipeline

demo-repro: install
	$(BIN)/dvc repro

# ruff (pyproject.toml [tool.ruff]) and the contract tests (tests/test_contracts.py) run with the suite.
lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -m "not slow and not gpu" -q

test-all: install
	$(BIN)/python -m pytest -q

# bench/flow_budget.py is a recipe study (hours on CPU, minutes on a GPU): run it by hand.
BENCHES = decode loader pretrain_step pretrain_cpu targets pretrain_gpu
bench: install
	@for b in $(BENCHES); do echo "== bench/$$b.py"; $(BIN)/python bench/$$b.py || exit 1; done
	@echo "== every figure against its target (bench/summary.py)"; $(BIN)/python bench/summary.py

clean:  # DVC outputs and run state; metrics/ is tracked in git and stays
	rm -rf data artifacts runs mlflow.db mlartifacts
	git clean -fdXq reports
