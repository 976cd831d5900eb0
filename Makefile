# vitalstore: `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export VITALSTORE_DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/vitalstore

.PHONY: help setup run test lint bench bench-scale loadtest clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $(STAMP)

setup: $(STAMP) ## .venv, pinned deps, TimescaleDB on the local PostgreSQL, database at head
	bash scripts/install-timescaledb.sh
	$(BIN)/vitalstore db upgrade

run: setup ## set up, then serve on 127.0.0.1:8000 (VITALSTORE_* settings apply)
	$(BIN)/vitalstore keys local-admin --file .vitalstore/admin.key
	$(BIN)/vitalstore serve

test: setup ## set up, then run the whole test suite against the real database
	$(BIN)/pytest

lint: $(STAMP) ## ruff and mypy (strict) on src
	$(BIN)/ruff check src tests loadtest alembic
	$(BIN)/mypy

bench: setup ## benchmark: no-op vs durable POST, batch vs COPY ceiling (prints a table)
	$(BIN)/python loadtest/bench.py

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
