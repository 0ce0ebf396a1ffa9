#!/usr/bin/env bash
# Set up glmgguf in ./.venv on a fresh machine: Python deps (CPU torch first, so the wide torch range of the
# package is already satisfied and no multi-GB CUDA build is pulled) and the package itself, editable.
# The pinned llama.cpp is fetched and built on first use, cached under ~/.cache/glmgguf (the patched build
# starts from the plain build's objects).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
