#!/usr/bin/env bash
# Issue 13's cluster study (docs/RESULTS.md section 7): the cluster simulator at 1, 4, 16
# and 64 replicas (rates per replica, so the cluster's rate scales with N), the whole test
# split of each trace, seed 0, 2 processes. Results in $OUT/<part>/summary.md.
#   routing   conv at N = 1 4 16 64, code and alpaca at 16: kv, p2c, least-loaded, round-robin
#   stale     conv at 16: kv with its snapshots 0.01, 0.1, 1 and 10 s apart, against p2c
#   reserve   conv at 16, kv: reserve split by pressure, static, none; p tuned per cluster or per replica
#   control   cacheopt control-plane (router decision time, Redis commands per replica)
# PARTS="routing" runs some of them. KV is the KV router's variant: section 7 was measured
# with the rule's KV part on, the default then (off since docs/RESULTS.md 4.7): KV=kv for today's.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-reports/cluster}
PARTS=${PARTS:-routing stale reserve control}
JOBS=${JOBS:-2}
want() { [[ " $PARTS " == *" $1 "* ]]; }
SIM=".venv/bin/cacheopt sim --jobs $JOBS --no-progress"
CONV_RATES=${CONV_RATES:-16,18,20,22}
KV=${KV:-kv:headroom=on}
ROUTERS="$KV,p2c,least-loaded,round-robin"
if want routing; then
  for n in ${SIZES:-1 4 16 64}; do
    $SIM --trace conv --replicas "$n" --rates "$CONV_RATES" --routers "$ROUTERS" --out "$OUT/conv-$n"
  done
  $SIM --trace code --replicas 16 --rates 7,8,9,10 --routers "$ROUTERS" --out "$OUT/code-16"
  $SIM --trace alpaca --replicas 16 --rates 40,43,46,49 --routers "$ROUTERS" --out "$OUT/alpaca-16"
fi
if want stale; then
  $SIM --trace conv --replicas 16 --rates "$CONV_RATES" --out "$OUT/stale-16" \
    --routers "p2c,$KV:state_period_s=0.01,$KV:state_period_s=0.1,$KV:state_period_s=1,$KV:state_period_s=10"
fi
if want reserve; then
  $SIM --trace conv --replicas 16 --rates "$CONV_RATES" --out "$OUT/reserve-16" --confidence-mode rate \
    --routers "$KV,$KV:reserve=static,$KV:reserve=none,$KV:p_scope=replica"
fi
if want control; then
  .venv/bin/cacheopt control-plane --replicas 16,64,256 --out "$OUT/control-plane.json"
fi
