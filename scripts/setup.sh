#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a virtual environment with the project and its
# test dependencies. Everything the project needs is installed from here.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
# The local model the CPU vLLM engine runs (config and tokenizer, no download; 1 s).
[ -f models/tiny-llama/config.json ] || .venv/bin/cacheopt model build --out models/tiny-llama > /dev/null
