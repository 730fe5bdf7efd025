#!/usr/bin/env bash
# Set up, then run the main job: the simulator benchmark of CacheOPT against the baselines
# (until the serving cluster lands, this is the project's main job). Extra arguments go
# to `cacheopt sim`.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
exec .venv/bin/cacheopt sim "$@"
