#!/usr/bin/env bash
# Reproduces docs/RESULTS.md section 2.2: CacheOPT with fixed, rate-tuned and feedback
# confidence on three workloads, plus the oracle and vLLM. About 25 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
cacheopt=.venv/bin/cacheopt
[ -d artifacts/text-length ] || $cacheopt predictor train
run() { $cacheopt sim --no-progress "$@" > /dev/null; }
study() {  # trace rates rate-band [extra options]
  local trace=$1 rates=$2 band=$3; shift 3
  run --trace "$trace" --policies vllm,oracle --rates "$rates" "$@" --out "reports/study-$trace-baselines"
  for p in 0.3 0.5 0.7 0.9; do
    run --trace "$trace" --policies cacheopt --confidence $p --rates "$rates" "$@" --out "reports/study-$trace-p$p"
  done
  run --trace "$trace" --policies cacheopt --confidence-mode rate --p-range 0.3,0.9 --rate-band "$band" \
    --rates "$rates" "$@" --out "reports/study-$trace-rate"
  run --trace "$trace" --policies cacheopt --confidence-mode feedback --p-range 0.3,0.9 --rates "$rates" "$@" \
    --out "reports/study-$trace-feedback"
}
alpaca=(--max-tokens 2048 --limit 5000)
study conv 12,13,14,15,16,17,18 8,16.5
study code 8,10,12,14,16,18,20 8,16
study alpaca 22,25,28,31,34,37,40 14,28 --predictor learned "${alpaca[@]}"
run --trace alpaca --policies cacheopt --predictor length --confidence-mode rate --p-range 0.3,0.9 --rate-band 14,28 \
  --rates 22,25,28,31,34,37,40 "${alpaca[@]}" --out reports/study-alpaca-length-rate
run --trace alpaca --policies cacheopt --predictor length --rates 22,25,28,31,34,37,40 "${alpaca[@]}" \
  --out reports/study-alpaca-length-p0.7
for f in reports/study-*/summary.md; do echo "$f: $(grep -E '^\| (cacheopt|vllm|oracle) ' "$f" | head -2 | cut -d'|' -f2,3 | tr '\n' ' ')"; done
