#!/usr/bin/env bash
# Issue 9's figures (docs/RESULTS.md section 5): the simulated sweeps on the test split of
# conv, code and alpaca with three seeds, and the ablation on conv. About 45 minutes on 2 cores.
# The choices they rest on were made on the training split first (--replay train), below.
set -euo pipefail
cd "$(dirname "$0")/.."
SIM=".venv/bin/cacheopt sim --no-progress --jobs 2"
BASELINES=vllm,vllm-2048,edf,past-future

# 1. Choices, on the conv training split only: the design (peak against locked) and
#    critical admission (on against off).
$SIM --replay train --policies edf,cacheopt,cacheopt-locked,cacheopt-no_reserve,cacheopt-no_padding \
  --cacheopt-option critical_admission=true --rates 14,16,18,20 --out reports/train-critical-on
$SIM --replay train --policies edf,cacheopt,cacheopt-locked,cacheopt-no_reserve,cacheopt-no_padding \
  --rates 14,16,18,19,20,22 --out reports/train-critical-off
#    The bounded wait: shed after 1.5, 2, 3 or 5 times the TTFT SLO.
for m in 1.5 2 3 5; do
  $SIM --replay train --policies cacheopt --cacheopt-option shed_wait_ttft_multiple=$m --rates 12,16,18,20,22 \
    --out reports/train-shed-$m
done

# 2. The headline sweeps, test split, seeds 0-2.
$SIM --trace conv --policies $BASELINES,cacheopt,oracle --seeds 0,1,2 --rates 10,12,14,16,17,18,19,20,22 \
  --out reports/kv-conv
$SIM --trace code --policies $BASELINES,cacheopt,oracle --seeds 0,1,2 --rates 4,6,7,8,9,10,12 \
  --out reports/kv-code
$SIM --trace alpaca --policies $BASELINES,cacheopt,oracle --seeds 0,1,2 --rates 24,28,32,36,40,44,48,56 \
  --out reports/kv-alpaca

# 3. The ablation on conv (seed 0): the locked design, each mechanism off, and critical admission on.
$SIM --trace conv --policies vllm,edf,cacheopt --ablation --rates 12,14,16,17,18,19,20,22 --out reports/kv-ablation
$SIM --trace conv --policies cacheopt --cacheopt-option critical_admission=true --rates 12,14,16,17,18,19,20,22 \
  --out reports/kv-ablation-critical
