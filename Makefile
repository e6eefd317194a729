# The two commands of the README: `make run` (main job) and `make test` (test suite).
# Both create the virtual environment first when it is missing.
SHELL := /bin/bash
VENV ?= .venv
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export GX_ANALYTICS_ENABLED ?= false
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK ?= true

.PHONY: setup run test lint
setup:
	@bash scripts/setup.sh

run: setup
	$(VENV)/bin/python -m flows.pipeline

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
