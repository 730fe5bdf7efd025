"""The global scheduler's logic, plain (no Ray): the real cluster runs it in a Ray actor
(global_scheduler/actor.py), the cluster simulator (bench/cluster_sim.py) calls it directly.

Every serving replica reports to it twice a second: the arrivals it saw, its KV snapshot,
its request counters, whether its engine is warm, and the requests it finished. It answers
with the confidence p for the cluster's arrival rate, the replica's share of the KV reserve
(written to Redis when configured, fenced by epoch), how many replicas are ready, and the
length table refitted on the deployment's completions when the replica lacks its latest
version (online calibration, predictor/online.py). Its state is soft: after a restart it
relearns the rate within one estimator window, the replicas within one report period and
the table within `min_samples` completions.
"""

from __future__ import annotations

import logging
import time

from global_scheduler.confidence import ArrivalRateEstimator, RateTunedConfidence
from global_scheduler.reserve import rebalance_reserve
from global_scheduler.store import LEASE_TTL_S, RedisStore, StoreUnavailable
from predictor.online import OnlineLengthTable
from replicas.snapshot import KVSnapshot

log = logging.getLogger("cacheopt.global_scheduler")
REPORT_PERIOD_S = 0.5  # how often each replica reports
REPLICA_SILENT_S = 5.0  # a replica not heard from for this long is gone: no lease, not counted ready
REDIS_RETRY_S = 2 * REPORT_PERIOD_S  # after a failed write: back within two exchanges of its return
SPLIT_PERIOD_S = REPORT_PERIOD_S / 4  # the reserve is split anew at most this often
WRITE_PERIOD_S = REPORT_PERIOD_S / 2  # and written to Redis at most this often (leases live LEASE_TTL_S)
REFIT_PERIOD_S = 10.0  # the length table is refitted at most this often: each version goes to every replica


def control_settings(*, replicas: int, p_range: tuple[float, float], rate_band_rps: tuple[float, float],
                     reserve_fraction: float, redis_url: str | None = None,
                     calibration: tuple[int, int] | None = None) -> dict:
    """ClusterControl's settings for a deployment of `replicas`: the confidence band is
    per replica (RateTunedConfidence), the scheduler sees the cluster's rate;
    `calibration` is (min_samples, window) of the online length table, None for none."""
    low, high = (r * replicas for r in rate_band_rps)
    return {"p_min": p_range[0], "p_max": p_range[1], "low_rps": low, "high_rps": high,
            "reserve_fraction": reserve_fraction, "redis_url": redis_url, "replicas": replicas,
            "calibration": None if calibration is None else list(calibration)}


class ClusterControl:
    """The global scheduler's logic, plain (tested without Ray); `GlobalScheduler` is the
    actor around it."""

    def __init__(self, settings: dict):
        self.started_s = time.time()
        self.rate = ArrivalRateEstimator()
        self.replicas: dict[str, dict] = {}  # id -> {"seen_s", "snapshot", "metrics", "ready"}
        self._parsed: dict[str, KVSnapshot] = {}  # the live replicas' last snapshots, parsed
        self.leases: dict[str, int] = {}
        self.epoch = 0
        self.store: RedisStore | None = None
        self.redis_url: str | None = None
        # One split and one Redis write per period, not one per report: with N replicas
        # reporting, both would cost O(N) each, O(N^2) per period (bench/control_plane.py).
        self.next_split_s = 0.0
        self.next_write_s = 0.0  # after a failed write, REDIS_RETRY_S later
        self.lengths: OnlineLengthTable | None = None
        self.next_refit_s = 0.0
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
        calibration = settings.get("calibration")
        if calibration is None:
            self.lengths = None
        elif self.lengths is None or [self.lengths.min_samples, self.lengths.window] != list(calibration):
            min_samples, window = calibration
            self.lengths = OnlineLengthTable(min_samples=min_samples, window=window)

    def report(self, replica: str, arrivals: list[float], snapshot: dict | None, metrics: dict,
               ready: bool, now: float | None = None, completions: list | tuple = (),
               length_table_version: int = 0) -> dict:
        """`completions`: (prompt tokens, output tokens, SLO class) of the requests the
        replica finished since its last report; `length_table_version`: the table it has."""
        now = time.time() if now is None else now
        for t in arrivals:
            self.rate.observe(t)
        self.replicas[replica] = {"seen_s": now, "snapshot": snapshot, "metrics": metrics, "ready": ready}
        if snapshot:
            self._parsed[replica] = KVSnapshot.from_dict(snapshot)  # once per report, not once per replica per report
        else:
            self._parsed.pop(replica, None)
        live = self._live(now)
        # (A throttle further ahead than its period: the clock stepped back; do not wait for it.)
        if self._parsed and (not 0 < self.next_split_s - now <= SPLIT_PERIOD_S or replica not in self.leases):
            budget = int(self.settings["reserve_fraction"] * sum(s.total_blocks for s in self._parsed.values()))
            self.leases = rebalance_reserve(budget, self._parsed)
            # Epochs from the clock: a restarted scheduler's splits still come after its predecessor's.
            self.epoch = max(self.epoch + 1, int(now * 1000))
            self.next_split_s = now + SPLIT_PERIOD_S
            if not 0 < self.next_write_s - now <= REDIS_RETRY_S:
                self._write_leases(now)
        rate = self.rate.rate_rps(now)
        lease = self.leases.get(replica)
        return {"confidence": self.tuner.confidence(rate), "arrival_rate_rps": rate,
                "lease": None if lease is None else {"blocks": lease, "epoch": self.epoch, "ttl_s": LEASE_TTL_S},
                "started_s": self.started_s,
                "ready_replicas": sum(r["ready"] for r in live.values()),
                "expected_replicas": self.settings["replicas"],
                "length_table": self._length_table_for(length_table_version, completions, now)}

    def _length_table_for(self, version: int, completions: list | tuple, now: float) -> dict | None:
        """The latest length table, for a replica that has an older one (else None)."""
        if self.lengths is None:
            return None
        self.lengths.observe_many(completions)
        if (now >= self.next_refit_s or self.lengths.latest is None) and self.lengths.table() is not None:
            self.next_refit_s = now + REFIT_PERIOD_S
        # Numbered from the start time, in ms: a restarted scheduler's tables come after its predecessor's.
        latest = int(self.started_s * 1000) + self.lengths.version
        if self.lengths.latest is None or version >= latest:
            return None
        return {"version": latest, "table": self.lengths.latest}

    def state(self, now: float | None = None) -> dict:
        """Everything the replicas last reported (for /metrics, tests and operators)."""
        now = time.time() if now is None else now
        rate = self.rate.rate_rps(now)
        return {"confidence": self.tuner.confidence(rate), "arrival_rate_rps": rate, "leases": dict(self.leases),
                "started_s": self.started_s, "replicas": self._live(now),
                "expected_replicas": self.settings["replicas"],
                "calibration": None if self.lengths is None else
                {"samples": self.lengths.samples, "version": self.lengths.version}}

    def _live(self, now: float) -> dict[str, dict]:
        for name in [n for n, r in self.replicas.items() if now - r["seen_s"] > REPLICA_SILENT_S]:
            del self.replicas[name]  # gone: its lease is no longer renewed and expires in Redis
            self._parsed.pop(name, None)
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
            self.next_write_s = now + WRITE_PERIOD_S
        except StoreUnavailable:  # back off: every report waiting on a dead Redis would stall the replicas
            self.next_write_s = now + REDIS_RETRY_S
