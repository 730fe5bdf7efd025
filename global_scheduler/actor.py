"""The global scheduler as a Ray actor: one per cluster, named and detached.

Every serving replica reports to it twice a second: the arrivals it saw, its KV snapshot,
its request counters and whether its engine is warm. It answers with the confidence p for
the cluster's arrival rate, the replica's share of the KV reserve (written to Redis when
configured, fenced by epoch) and how many replicas are ready. Its state is soft: after a
restart it relearns the rate within one estimator window and the replicas within one
report period.
"""

from __future__ import annotations

import logging
import time

import ray

from global_scheduler.confidence import ArrivalRateEstimator, RateTunedConfidence
from global_scheduler.reserve import rebalance_reserve
from global_scheduler.store import LEASE_TTL_S, RedisStore, StoreUnavailable
from replicas.snapshot import KVSnapshot

log = logging.getLogger("cacheopt.global_scheduler")
GLOBAL_SCHEDULER = "cacheopt-global-scheduler"
NAMESPACE = "cacheopt"
REPORT_PERIOD_S = 0.5  # how often each replica reports
REPLICA_SILENT_S = 5.0  # a replica not heard from for this long is gone: no lease, not counted ready
REDIS_RETRY_S = 2 * REPORT_PERIOD_S  # after a failed write: back within two exchanges of its return


class ClusterControl:
    """The global scheduler's logic, plain (tested without Ray); `GlobalScheduler` is the
    actor around it."""

    def __init__(self, settings: dict):
        self.started_s = time.time()
        self.rate = ArrivalRateEstimator()
        self.replicas: dict[str, dict] = {}  # id -> {"seen_s", "snapshot", "metrics", "ready"}
        self.leases: dict[str, int] = {}
        self.epoch = 0
        self.store: RedisStore | None = None
        self.redis_url: str | None = None
        self.store_retry_s = 0.0  # after a failed write, leave Redis alone until then
        self.configure(settings)

    def configure(self, settings: dict) -> None:
        """A (re)deployment's settings: the last one wins, also for a detached actor that
        outlived the deployment that made it."""
        self.settings = dict(settings)
        self.tuner = RateTunedConfidence(p_min=settings["p_min"], p_max=settings["p_max"],
                                         low_rps=settings["low_rps"], high_rps=settings["high_rps"])
        url = settings.get("redis_url")
        if url != self.redis_url:
            self.store = RedisStore(url) if url else None
            self.redis_url = url

    def report(self, replica: str, arrivals: list[float], snapshot: dict | None, metrics: dict,
               ready: bool, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        for t in arrivals:
            self.rate.observe(t)
        self.replicas[replica] = {"seen_s": now, "snapshot": snapshot, "metrics": metrics, "ready": ready}
        live = self._live(now)
        parsed = {name: KVSnapshot.from_dict(r["snapshot"]) for name, r in live.items() if r["snapshot"]}
        if parsed:
            budget = int(self.settings["reserve_fraction"] * sum(s.total_blocks for s in parsed.values()))
            self.leases = rebalance_reserve(budget, parsed)
            # Epochs from the clock: a restarted scheduler's splits still come after its predecessor's.
            self.epoch = max(self.epoch + 1, int(now * 1000))
            if now >= self.store_retry_s:
                self._write_leases(now)
        rate = self.rate.rate_rps(now)
        lease = self.leases.get(replica)
        return {"confidence": self.tuner.confidence(rate), "arrival_rate_rps": rate,
                "lease": None if lease is None else {"blocks": lease, "epoch": self.epoch, "ttl_s": LEASE_TTL_S},
                "started_s": self.started_s,
                "ready_replicas": sum(r["ready"] for r in live.values()),
                "expected_replicas": self.settings["replicas"]}

    def state(self, now: float | None = None) -> dict:
        """Everything the replicas last reported (for /metrics, tests and operators)."""
        now = time.time() if now is None else now
        rate = self.rate.rate_rps(now)
        return {"confidence": self.tuner.confidence(rate), "arrival_rate_rps": rate, "leases": dict(self.leases),
                "started_s": self.started_s, "replicas": self._live(now),
                "expected_replicas": self.settings["replicas"]}

    def _live(self, now: float) -> dict[str, dict]:
        for name in [n for n, r in self.replicas.items() if now - r["seen_s"] > REPLICA_SILENT_S]:
            del self.replicas[name]  # gone: its lease is no longer renewed and expires in Redis
        return self.replicas

    def _write_leases(self, now: float) -> None:
        """To Redis when configured; while it is away the leases live here and reach the
        replicas in the replies, and the next write after it returns reconciles."""
        if self.store is None:
            return
        try:
            stored = self.store.set_leases(self.epoch, self.leases)
            if stored > self.epoch:  # a newer split exists (a clock stepped back): continue after it
                self.epoch = self.store.set_leases(stored + 1, self.leases)
        except StoreUnavailable:  # back off: every report waiting on a dead Redis would stall the replicas
            self.store_retry_s = now + REDIS_RETRY_S


GlobalScheduler = ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=0)(ClusterControl)


def global_scheduler_handle(settings: dict):
    """The cluster's global scheduler, started if it is not running."""
    actor = GlobalScheduler.options(name=GLOBAL_SCHEDULER, namespace=NAMESPACE, lifetime="detached",
                                    get_if_exists=True)
    return actor.remote(settings)
