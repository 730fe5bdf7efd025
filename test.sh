#!/usr/bin/env bash
# Set up, then run every test (the fast policy core and the simulator tests; markers
# registered in pyproject.toml select heavier groups). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
