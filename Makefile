# vitalstore: `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export VITALSTORE_DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/vitalstore

.PHONY: help setup run test lint lock bench bench-scale bench-dashboard loadtest profile clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

# constraints.txt pins every package (indirect ones and the build backend too); the Docker
# image installs from the same file.
PIP_PINNED := -c constraints.txt --build-constraint constraints.txt

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt pip
	$(BIN)/pip install -q $(PIP_PINNED) -e '.[dev,bench]'
	touch $(STAMP)

setup: $(STAMP) ## .venv, pinned deps, browser assets, TimescaleDB on the local PostgreSQL, database at head
	bash scripts/install-ui-assets.sh
	bash scripts/install-timescaledb.sh
	$(BIN)/vitalstore db upgrade

run: setup ## set up, then serve on 127.0.0.1:8000 (VITALSTORE_* settings apply)
	$(BIN)/vitalstore keys local-admin --file .vitalstore/admin.key
	$(BIN)/vitalstore serve

test: setup ## set up (and Chromium for the browser tests), then the whole test suite
	bash scripts/install-browser.sh
	$(BIN)/pytest

lock: ## after changing a pin in pyproject.toml: resolve everything again into constraints.txt
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade pip setuptools
	.lock-venv/bin/pip install -q -e '.[dev,bench]'
	{ sed -n '/^#/p' constraints.txt; .lock-venv/bin/pip freeze --all --exclude-editable \
	  | grep -E '^(pip|setuptools)=='; .lock-venv/bin/pip freeze --exclude-editable; } \
	  > constraints.txt.new && mv constraints.txt.new constraints.txt && rm -rf .lock-venv

lint: $(STAMP) ## ruff on src, tests, loadtest, alembic; mypy --strict on src
	$(BIN)/ruff check src tests loadtest alembic
	$(BIN)/mypy

bench: setup ## side-by-side benchmark (BENCH_DURATION s a phase): loadtest/results/bench.json
	$(BIN)/python loadtest/bench.py

bench-scale: setup ## latency at 1M then 20M readings (BENCH_SCALE_SIZES; ~12 GB disk, ~15 min)
	$(BIN)/python loadtest/bench_scale.py

bench-dashboard: setup ## dashboard in Chromium: 30-day device view to charts drawn, page weight
	bash scripts/install-browser.sh
	$(BIN)/python loadtest/dashboard_bench.py

loadtest: setup ## locust fleet, headless (LOADTEST_DURATION, LOADTEST_USERS, LOADTEST_HOST)
	$(BIN)/python loadtest/run_locust.py

profile: setup ## py-spy profile under load: PROFILE=single|batch|noop|latest (default single)
	$(BIN)/python loadtest/profile.py $(PROFILE)

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
