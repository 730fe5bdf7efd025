"""`cacheopt control-plane`: what the cluster's coordination costs, measured.

- Router decision time: the KV router's work per request (cluster.routing.RoutingState,
  what the Ray Serve router runs) over N replicas' routing statistics, with the statistics
  unchanged since the last decision (the common case: they change every 0.1 s) and with
  every replica's statistics new (the worst case).
- Redis: N replicas' control loops (RedisStore: publish a snapshot, read the lease, every
  report period) and the global scheduler's lease writes, against a real redis-server,
  counted by Redis itself (INFO commandstats, bytes in and out). Requests never touch
  Redis, so its load grows with replicas, not with the request rate.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace

from cluster.routing import RANKED_CANDIDATES, RoutingState
from global_scheduler.control import REPORT_PERIOD_S
from replicas.snapshot import KVSnapshot

# Ray Serve 2.60 re-sends every replica's routing statistics to the routers whenever one
# replica's change, which each does every cluster.routing.ROUTING_STATS_PERIOD_S.
STATS_BROADCASTS_PER_S = 10.0


def synthetic_snapshot(i: int, now_s: float, total_blocks: int = 4096) -> KVSnapshot:
    """Replica i's snapshot: varied headroom and load, as a busy cluster's would be."""
    free = (i * 7919) % total_blocks // 2
    return KVSnapshot(taken_s=now_s, total_blocks=total_blocks, free_blocks=free, reserve_free_blocks=i % 41,
                      reserve_target_blocks=40, idle_blocks=(i * 31) % 200, queued_need_blocks=(i * 13) % 300,
                      num_running=20 + i % 50, num_waiting=i % 7, counters={"admit": 1000 + i, "preempt": i % 3},
                      confidence=0.7)


def candidates(n: int, now_s: float) -> list[SimpleNamespace]:
    """Replica objects as Serve hands them to a router: an id and the routing statistics
    the replica last recorded (cluster/server.py record_routing_stats)."""
    return [SimpleNamespace(replica_id=SimpleNamespace(unique_id=f"replica-{i}"),
                            routing_stats={"kv": synthetic_snapshot(i, now_s).to_dict(), "healthy": True,
                                           "request_blocks": 40.0}) for i in range(n)]


def router_decision_us(n: int, decisions: int = 2000, *, fresh_stats: bool = False) -> dict[str, float]:
    """Microseconds per routing decision over `n` replicas (p50, p99, mean): what
    KVHeadroomRouter does per request (rank, then record the send)."""
    state = RoutingState()
    now = time.time()
    replicas = candidates(n, now)
    samples = []
    for _ in range(decisions):
        if fresh_stats:
            for replica in replicas:  # new objects: every snapshot parsed again
                replica.routing_stats = dict(replica.routing_stats)
        started = time.perf_counter()
        order = state.rank(replicas, now, limit=RANKED_CANDIDATES)
        assert order is not None
        state.on_send(replicas[order[0]].replica_id.unique_id, now)
        samples.append(1e6 * (time.perf_counter() - started))
    samples.sort()
    return {"p50": samples[len(samples) // 2], "p99": samples[int(0.99 * len(samples))],
            "mean": statistics.fmean(samples)}


def redis_load(redis_url: str, replicas: int, rounds: int = 20,
               on_round: Callable[[], None] | None = None) -> dict:
    """`rounds` report periods of `replicas` replicas against Redis, counted by Redis
    itself. In each period every replica does what its control loop does (publish its
    snapshot, read its lease: cluster/server.py) and reports to the global scheduler's
    logic (ClusterControl, with this Redis), whose clock advances one period per round so
    that its write throttling applies as in service."""
    import redis as redis_lib

    from global_scheduler.control import ClusterControl, control_settings
    from global_scheduler.store import RedisStore

    store = RedisStore(redis_url)
    store.check()
    control = ClusterControl(control_settings(replicas=replicas, p_range=(0.3, 0.9), rate_band_rps=(8.0, 16.5),
                                              reserve_fraction=0.01, redis_url=redis_url))
    admin = redis_lib.Redis.from_url(redis_url)
    admin.config_resetstat()
    in_scheduler_s = 0.0
    clock = time.time()
    for _ in range(rounds):
        for i in range(replicas):
            now = clock + REPORT_PERIOD_S * i / replicas  # reports spread over the period
            snapshot = synthetic_snapshot(i, now).to_dict()
            store.publish_snapshot(f"replica-{i}", snapshot)
            store.lease(f"replica-{i}")
            started = time.perf_counter()
            control.report(f"replica-{i}", [], snapshot, {}, True, now=now)
            in_scheduler_s += time.perf_counter() - started
        clock += REPORT_PERIOD_S
        if on_round:
            on_round()
    commandstats = admin.info("commandstats")
    stats = admin.info("stats")
    commands = {name.removeprefix("cmdstat_"): v["calls"] for name, v in commandstats.items()
                if name not in ("cmdstat_config|resetstat", "cmdstat_info")}
    per_period = sum(commands.values()) / rounds
    return {"replicas": replicas, "rounds": rounds, "commands": commands,
            "commands_per_s_in_service": per_period / REPORT_PERIOD_S,
            "bytes_per_s_in_service": (stats["total_net_input_bytes"] + stats["total_net_output_bytes"])
            / rounds / REPORT_PERIOD_S,
            # The global scheduler's time in report() (its Redis writes included), per second of service.
            "scheduler_busy_share": in_scheduler_s / (rounds * REPORT_PERIOD_S)}


@contextlib.contextmanager
def scratch_redis() -> Iterator[str]:
    """A private redis-server on a free loopback port, for the measurement only."""
    import redis as redis_lib

    from cluster.serve import free_port

    if shutil.which("redis-server") is None:
        raise ValueError("redis-server is not installed: give --redis-url, or install it (scripts/setup.sh does)")
    port = free_port()
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no"], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis_lib.Redis.from_url(url)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis_lib.exceptions.ConnectionError:
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def redis_capacity(port: int, host: str = "127.0.0.1") -> float | None:
    """Commands per second this Redis serves (redis-benchmark: GET and SET, 50 clients, no
    pipelining), or None without redis-benchmark or with a password (it would need it on
    the command line)."""
    if shutil.which("redis-benchmark") is None:
        return None
    out = subprocess.run(["redis-benchmark", "-h", host, "-p", str(port), "-t", "set,get", "-n", "100000", "-q"],
                         capture_output=True, text=True, timeout=120).stdout
    rates = [float(m) for m in re.findall(r"([\d.]+) requests per second", out)]
    return statistics.fmean(rates) if rates else None
