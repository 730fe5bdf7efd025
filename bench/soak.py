"""`cacheopt soak`: a long steady load with misbehaving clients against a running cluster,
then the books checked at idle.

Poisson arrivals of streamed completions (random prompt token ids and output lengths,
`ignore_eos`). Of the clients, `disconnect_share` leave early (half before the first byte,
half after a few chunks) and `slow_share` read slowly (a pause between chunks). Every
`rss_period_s` the resident memory of the cluster's processes is sampled by role (replica,
engine core, Serve proxy and controller, global scheduler, raylet, GCS), so that growth can
be attributed. At the end, once the cluster is idle, /metrics must show nothing in flight,
every KV block free, every request the servers received in exactly one outcome, and each
engine abort matched by a request the servers saw cancelled (a cancellation without an
abort is a client that left after the engine had finished: nothing was left to abort).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass

from bench.http_bench import Target

REPLICA_TITLE = "ServeReplica:cacheopt:LLMServer"


@dataclass(frozen=True)
class SoakSpec:
    duration_s: float = 1200.0
    rate_rps: float = 4.0
    disconnect_share: float = 0.10
    slow_share: float = 0.05
    prompt_tokens: tuple[int, int] = (16, 256)
    output_tokens: tuple[int, int] = (8, 128)
    slow_pause_s: float = 0.2
    rss_period_s: float = 5.0
    vocab_ids: tuple[int, int] = (3, 256)  # prompt token ids drawn from here: in any model's vocabulary
    seed: int = 0


# Ray sets each worker's process title to "ray::<actor class>..."; the engine core is the
# replica's child. Order matters: the first role whose marker is in the command line wins.
PROCESS_ROLES = (("replica", REPLICA_TITLE), ("serve_proxy", "ray::ProxyActor"),
                 ("serve_controller", "ray::ServeController"), ("global_scheduler", "ray::ClusterControl"),
                 ("raylet", "/raylet/raylet"), ("gcs_server", "/gcs_server"))
SERVING_ROLES = ("replica", "engine_core")  # what `rss_drift` is about: the processes that serve


def cluster_rss_by_role() -> dict[str, int]:
    """Resident memory of this machine's cluster processes, summed by role: the serving
    replicas, their engine cores (every process under a replica), Serve's proxy and
    controller, the global scheduler, and Ray's raylet and GCS."""
    import psutil

    totals = dict.fromkeys((*SERVING_ROLES, *(role for role, _ in PROCESS_ROLES[1:])), 0)
    roles: dict[int, str] = {}
    for process in psutil.process_iter(["cmdline"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or ())
            role = next((role for role, marker in PROCESS_ROLES if marker in cmdline), None)
            if role is not None:
                roles.setdefault(process.pid, role)
                if role == "replica":  # its children (forked with its title, too) are the engine core
                    roles.update((child.pid, "engine_core") for child in process.children(recursive=True))
        except psutil.Error:
            continue  # gone meanwhile
    for pid, role in roles.items():
        try:
            totals[role] += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            continue
    return totals


def growth_per_minute(samples: list[tuple[float, int]]) -> float | None:
    """Least-squares slope of (seconds, bytes) samples, in bytes per minute."""
    if len(samples) < 2:
        return None
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_b = sum(b for _, b in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    return 60 * sum((t - mean_t) * (b - mean_b) for t, b in samples) / var if var else None


def read_metrics(text: str) -> dict[str, float]:
    """Prometheus text: each unlabelled sample, and each labelled family summed over its labels."""
    out: dict[str, float] = {}
    for name, _labels, value in re.findall(r"^([a-z_:]+)(\{[^}]*\})? (\S+)$", text, re.M):
        out[name] = out.get(name, 0.0) + float(value)
    return out


async def soak(target: Target, spec: SoakSpec, *, on_request: Callable[[], None] | None = None,
               rss: Callable[[], dict[str, int]] = cluster_rss_by_role, idle_timeout_s: float = 120.0) -> dict:
    import httpx

    rng = random.Random(spec.seed)
    outcomes: Counter[str] = Counter()
    ttfts: list[float] = []  # of the clients that read normally (not slow, not leaving)
    error_samples: list[str] = []
    rss_samples: list[tuple[float, dict[str, int]]] = []  # (seconds since start, bytes by role)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=target.url, timeout=600, limits=limits, headers=target.headers) as client:
        before = read_metrics((await client.get("/metrics")).text)
        started = time.time()

        async def one(kind: str, body: dict, leave_after: int) -> None:
            got_bytes = False
            sent = time.time()
            try:
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    if response.status_code != 200:
                        outcomes[f"status {response.status_code}"] += 1
                        await response.aread()
                        return
                    chunks = 0
                    async for line in response.aiter_lines():
                        got_bytes = True
                        if not line.startswith("data: "):
                            continue
                        chunks += 1
                        if chunks == 1 and kind == "normal":
                            ttfts.append(time.time() - sent)
                        if kind == "leave_mid_stream" and chunks >= leave_after:
                            outcomes["left mid-stream"] += 1
                            return  # closing the response drops the connection
                        if kind == "slow":
                            await asyncio.sleep(spec.slow_pause_s)
                        if line == "data: [DONE]":
                            outcomes["completed"] += 1
                            return
                        if "error" in json.loads(line[6:]):  # an error event, not a chunk whose text says "error"
                            outcomes[f"error event ({kind})"] += 1
                            if len(error_samples) < 5:
                                error_samples.append(line[:300])
                            return
                    outcomes["ended without [DONE]"] += 1
            except asyncio.CancelledError:
                outcomes["left before the first byte" if not got_bytes else "left mid-stream"] += 1
            except httpx.HTTPError as error:
                outcomes[f"transport error {type(error).__name__}"] += 1
            finally:
                if on_request:
                    on_request()

        async def leave_early(task: asyncio.Task, after_s: float) -> None:
            await asyncio.sleep(after_s)
            task.cancel()

        async def sample_rss() -> None:
            while True:
                rss_samples.append((time.time() - started, await asyncio.to_thread(rss)))
                await asyncio.sleep(spec.rss_period_s)

        sampler = asyncio.create_task(sample_rss())
        tasks: list[asyncio.Task] = []
        kinds: Counter[str] = Counter()
        next_arrival = started
        while next_arrival < started + spec.duration_s:
            await asyncio.sleep(max(0.0, next_arrival - time.time()))
            draw = rng.random()
            kind = ("leave_before_first_byte" if draw < spec.disconnect_share / 2 else
                    "leave_mid_stream" if draw < spec.disconnect_share else
                    "slow" if draw < spec.disconnect_share + spec.slow_share else "normal")
            kinds[kind] += 1
            body = {"model": target.model, "stream": True, "ignore_eos": True,
                    "prompt": [rng.randrange(*spec.vocab_ids) for _ in range(rng.randint(*spec.prompt_tokens))],
                    "max_tokens": rng.randint(*spec.output_tokens)}
            task = asyncio.create_task(one(kind, body, leave_after=rng.randint(1, 3)))
            tasks.append(task)
            if kind == "leave_before_first_byte":
                asyncio.create_task(leave_early(task, rng.uniform(0.0, 0.005)))
            next_arrival += rng.expovariate(spec.rate_rps)
        await asyncio.gather(*tasks, return_exceptions=True)
        loaded_s = time.time() - started
        # Idle: nothing in flight, queued or running anywhere, as the next reports show.
        deadline = time.time() + idle_timeout_s
        while True:
            await asyncio.sleep(1.0)
            after = read_metrics((await client.get("/metrics")).text)
            idle = (after.get("cacheopt_requests_in_flight", 1) == 0 and after.get("vllm:num_requests_running", 1) == 0
                    and after.get("vllm:num_requests_waiting", 1) == 0)
            if idle or time.time() > deadline:
                break
        sampler.cancel()
        rss_samples.append((time.time() - started, await asyncio.to_thread(rss)))

    def delta(name: str) -> int:
        return int(after.get(name, 0) - before.get(name, 0))

    received = delta("cacheopt_requests_total")
    answered = {k: delta(f"cacheopt_requests_{k}_total") for k in ("failed", "cancelled", "left_early", "rejected",
                                                                   "invalid")}
    answered["finished"] = delta("vllm:request_success_total")
    ttfts.sort()

    def quantile(q: float) -> float | None:
        return round(ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))], 3) if ttfts else None

    # Warm: past the first tenth of the load (allocator pools and caches filling), while loaded.
    warm_samples = [(t, b) for t, b in rss_samples if 0.1 * spec.duration_s <= t <= loaded_s] or rss_samples
    serving = [(t, sum(b[role] for role in SERVING_ROLES)) for t, b in warm_samples]
    roles = list(rss_samples[0][1]) if rss_samples else []
    return {
        "spec": asdict(spec), "loaded_s": round(loaded_s, 1), "sent": len(tasks), "client_kinds": dict(kinds),
        "client_outcomes": dict(outcomes), "error_samples": error_samples,
        "ttft_s": {"p50": quantile(0.5), "p99": quantile(0.99), "max": ttfts[-1] if ttfts else None},
        "server": {"received": received, **answered, "engine_aborts": delta("cacheopt_engine_aborts_total")},
        "books_balance": received == sum(answered.values()),
        # Every abort is a cancellation; a cancellation without an abort is a client that left
        # after the engine had finished (its last outputs still on their way): no engine work leaked.
        "aborts_match_cancellations": delta("cacheopt_engine_aborts_total") == answered["cancelled"],
        "cancelled_after_the_engine_finished": answered["cancelled"] - delta("cacheopt_engine_aborts_total"),
        "idle": {"in_flight": after.get("cacheopt_requests_in_flight"),
                 "running": after.get("vllm:num_requests_running"), "waiting": after.get("vllm:num_requests_waiting"),
                 "kv_usage": after.get("vllm:kv_cache_usage_perc")},
        "rss_mb": {role: [(round(t), round(b[role] / 2**20, 1)) for t, b in rss_samples] for role in roles},
        # Each role's growth while loaded and warm (least squares), and its share of the whole.
        "rss_growth_mb_per_min": {role: round((growth_per_minute([(t, b[role]) for t, b in warm_samples]) or 0) / 2**20, 2)
                                  for role in roles},
        "rss_drift": (serving[-1][1] - serving[0][1]) / serving[0][1] if serving and serving[0][1] else None,
    }
