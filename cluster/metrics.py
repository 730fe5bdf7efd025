"""Prometheus text exposition of the cluster: vLLM's metric names where they overlap,
`cacheopt_*` for CacheOPT's own. Written by hand (the format is four lines of grammar).
Each replica counts what it served; `/metrics`, answered by whichever replica the proxy
picks, renders the sums of what every live replica last reported to the global scheduler
(at most one report period, 0.5 s, old).
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import deque
from collections.abc import Mapping

from replicas.snapshot import KVSnapshot

TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
# Snapshot counter -> (metric, help, labels)
CACHEOPT_COUNTERS = {
    "admit": ("cacheopt_reservations_total", "requests admitted with a reservation of their own", {}),
    "embed": ("cacheopt_embeddings_total", "requests embedded in another request's idle reservation", {}),
    "critical_admit": ("cacheopt_critical_admissions_total", "requests admitted as critical (minimum allocation)", {}),
    "topup": ("cacheopt_topups_total", "reservations topped up ahead of running out", {}),
    "reserve_draw_blocks": ("cacheopt_reserve_draw_blocks_total", "blocks drawn from the global reserve", {}),
    "preempt_recompute": ("cacheopt_preemptions_total", "preemptions by mode", {"mode": "recompute"}),
    "preempt_swap": ("cacheopt_preemptions_total", "preemptions by mode", {"mode": "swap"}),
    "length_table_switches": ("cacheopt_length_table_switches_total", "times the engine switched to a length "
                              "table refitted on the served completions (online calibration)", {}),
    "prefix_query_tokens": ("cacheopt_prefix_cache_queried_tokens_total", "prompt tokens of requests placed, "
                            "looked up in vLLM's prefix cache", {}),
    "prefix_hit_tokens": ("cacheopt_prefix_cache_hit_tokens_total", "of those, tokens vLLM's prefix cache held "
                          "(their prefill skipped)", {}),
    "abort": ("cacheopt_engine_aborts_total", "requests the engine aborted before their end (client left, stop "
              "sequence)", {}),
}


class ReplicaMetrics:
    """One replica's request counters and TTFT histogram; `as_dict` travels to the global
    scheduler with each report, and `render` sums what every replica last reported."""

    # Every request that reaches a completions endpoint is counted in `requests` and, once
    # answered, in exactly one of finished, failed, cancelled, left_early, rejected (429) and invalid.
    COUNTERS = ("requests", "finished", "failed", "cancelled", "left_early", "rejected", "shed", "invalid",
                "store_errors", "prompt_tokens", "generation_tokens")

    def __init__(self) -> None:
        self.requests = 0
        self.finished = 0
        self.failed = 0
        self.cancelled = 0  # the client left before the end, after its request reached the engine (which aborted it)
        self.left_early = 0  # the client left before its request reached the engine
        self.rejected = 0
        self.shed = 0  # of the rejected: refused by the replica's policy after a bounded wait
        self.invalid = 0  # refused with a 4xx other than 429: bad input, no API key, too large
        self.store_errors = 0  # Redis calls that failed or values that did not parse
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft_counts = [0] * (len(TTFT_BUCKETS_S) + 1)
        self.ttft_sum = 0.0

    def on_request(self, prompt_tokens: int) -> None:
        """A request goes to the engine (counted in `requests` when it arrived)."""
        self.prompt_tokens += prompt_tokens

    def on_first_token(self, ttft_s: float) -> None:
        self.ttft_counts[bisect.bisect_left(TTFT_BUCKETS_S, ttft_s)] += 1
        self.ttft_sum += ttft_s

    def on_finish(self, tokens: int) -> None:
        self.finished += 1
        self.generation_tokens += tokens

    def as_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in self.COUNTERS}, "ttft_counts": list(self.ttft_counts),
                "ttft_sum": self.ttft_sum}


class LoopLagMonitor:
    """How late the event loop wakes a task that asked to sleep PERIOD_S: the time a
    request handler, a tokenizer call or a JSON parse held the loop that every stream of
    this replica shares. Keeps the last WINDOW samples (about a minute)."""

    PERIOD_S = 0.02
    WINDOW = 3000

    def __init__(self) -> None:
        self.samples: deque[float] = deque(maxlen=self.WINDOW)
        self.max_s = 0.0

    async def run(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(self.PERIOD_S)
            self.record(time.perf_counter() - started - self.PERIOD_S)

    def record(self, lag_s: float) -> None:
        lag_s = max(0.0, lag_s)
        self.samples.append(lag_s)
        self.max_s = max(self.max_s, lag_s)

    def as_dict(self) -> dict:
        ordered = sorted(self.samples)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else 0.0
        return {"loop_lag_p99_s": p99, "loop_lag_max_s": self.max_s}


def render(replicas: Mapping[str, dict], confidence: float, arrival_rate: float) -> str:
    """The cluster's metrics from each live replica's last report: {"metrics":
    ReplicaMetrics.as_dict(), "snapshot": KVSnapshot dict or None}."""
    totals = {k: sum(r["metrics"].get(k, 0) for r in replicas.values()) for k in (*ReplicaMetrics.COUNTERS, "in_flight")}
    ttft_counts = [sum(c) for c in zip(*(r["metrics"].get("ttft_counts", ()) for r in replicas.values()))] \
        or [0] * (len(TTFT_BUCKETS_S) + 1)
    ttft_sum = sum(r["metrics"].get("ttft_sum", 0.0) for r in replicas.values())
    snapshots = {name: KVSnapshot.from_dict(r["snapshot"]) for name, r in sorted(replicas.items()) if r.get("snapshot")}
    loop_lag = {key: max((r["metrics"].get(key, 0.0) for r in replicas.values()), default=0.0)
                for key in ("loop_lag_p99_s", "loop_lag_max_s")}
    return _render(totals, ttft_counts, ttft_sum, snapshots, confidence, arrival_rate, loop_lag)


def _render(totals: dict, ttft_counts: list[int], ttft_sum: float, snapshots: Mapping[str, KVSnapshot],
            confidence: float, arrival_rate: float, loop_lag: Mapping[str, float]) -> str:
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict, float]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
            out.append(f"{name}{{{label_text}}} {value}" if label_text else f"{name} {value}")

    metric("vllm:request_success_total", "counter", "requests that finished", [({}, totals["finished"])])
    metric("vllm:prompt_tokens_total", "counter", "prompt tokens received", [({}, totals["prompt_tokens"])])
    metric("vllm:generation_tokens_total", "counter", "tokens generated", [({}, totals["generation_tokens"])])
    metric("cacheopt_requests_failed_total", "counter", "requests a replica failed", [({}, totals["failed"])])
    metric("cacheopt_requests_cancelled_total", "counter",
           "requests whose client left before the end, after the request reached the engine", [({}, totals["cancelled"])])
    metric("cacheopt_requests_left_early_total", "counter",
           "requests whose client left before the request reached the engine", [({}, totals["left_early"])])
    metric("cacheopt_requests_rejected_total", "counter", "requests refused with 429", [({}, totals["rejected"])])
    metric("cacheopt_requests_shed_total", "counter",
           "requests a replica's policy refused after a bounded wait (429; also in rejected)", [({}, totals["shed"])])
    metric("cacheopt_requests_invalid_total", "counter",
           "requests refused with a 4xx other than 429 (bad input, missing or wrong API key, too large)",
           [({}, totals["invalid"])])
    metric("cacheopt_requests_total", "counter", "requests received by the completion endpoints",
           [({}, totals["requests"])])
    metric("cacheopt_requests_in_flight", "gauge", "requests a replica is handling now (body read or parsed, queued, running)",
           [({}, totals["in_flight"])])
    metric("cacheopt_store_errors_total", "counter", "Redis calls that failed or values that did not parse",
           [({}, totals["store_errors"])])
    metric("cacheopt_event_loop_lag_seconds", "gauge",
           "how late a replica's event loop ran a due task over the last minute (worst replica)",
           [({"quantile": "0.99"}, loop_lag["loop_lag_p99_s"]), ({"quantile": "1"}, loop_lag["loop_lag_max_s"])])
    cumulative, buckets = 0, []
    for edge, count in zip(TTFT_BUCKETS_S, ttft_counts):
        cumulative += count
        buckets.append(({"le": f"{edge}"}, cumulative))
    buckets.append(({"le": "+Inf"}, cumulative + ttft_counts[-1]))
    out.append("# HELP vllm:time_to_first_token_seconds time to first token, seen by the serving replica")
    out.append("# TYPE vllm:time_to_first_token_seconds histogram")
    for labels, value in buckets:
        out.append(f'vllm:time_to_first_token_seconds_bucket{{le="{labels["le"]}"}} {value}')
    out.append(f"vllm:time_to_first_token_seconds_sum {ttft_sum}")
    out.append(f"vllm:time_to_first_token_seconds_count {cumulative + ttft_counts[-1]}")

    live = list(snapshots.items())
    metric("vllm:num_requests_running", "gauge", "requests running, per replica",
           [({"replica": str(i)}, s.num_running) for i, s in live])
    metric("vllm:num_requests_waiting", "gauge", "requests waiting, per replica",
           [({"replica": str(i)}, s.num_waiting) for i, s in live])
    metric("vllm:kv_cache_usage_perc", "gauge", "share of KV blocks holding data, per replica",
           [({"replica": str(i)}, round(1 - (s.free_blocks + s.reserve_free_blocks + s.idle_blocks)
                                     / s.total_blocks, 6)) for i, s in live])
    metric("cacheopt_kv_reserved_idle_blocks", "gauge", "blocks promised to running requests but unwritten",
           [({"replica": str(i)}, s.idle_blocks) for i, s in live])
    metric("cacheopt_kv_headroom_blocks", "gauge", "free plus idle blocks less the queue's needs",
           [({"replica": str(i)}, s.headroom_blocks) for i, s in live])
    metric("cacheopt_reserve_free_blocks", "gauge", "global-reserve blocks free, per replica",
           [({"replica": str(i)}, s.reserve_free_blocks) for i, s in live])
    metric("cacheopt_reserve_lease_blocks", "gauge", "global-reserve lease, per replica",
           [({"replica": str(i)}, s.reserve_target_blocks) for i, s in live])
    by_name: dict[str, list] = {}
    helps = {}
    for key, (name, help_, labels) in CACHEOPT_COUNTERS.items():
        helps[name] = help_
        for i, s in live:
            by_name.setdefault(name, []).append(({"replica": str(i), **labels}, s.counters.get(key, 0)))
    for name, samples in by_name.items():
        metric(name, "counter", helps[name], samples)
    metric("cacheopt_confidence_p", "gauge", "confidence p the global scheduler set", [({}, confidence)])
    metric("cacheopt_arrival_rate_rps", "gauge", "cluster arrival rate the global scheduler estimates",
           [({}, arrival_rate)])
    return "\n".join(out) + "\n"
