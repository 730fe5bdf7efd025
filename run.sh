#!/usr/bin/env bash
# Set up, then run the main job: the serving cluster on its embedded default (a local Ray,
# two CPU vLLM replicas of the local model with CacheOPT inside each engine, no Redis), the
# OpenAI API on http://127.0.0.1:8000/v1 until Ctrl-C. Extra arguments go to `cacheopt serve`.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
exec .venv/bin/cacheopt serve "$@"
