"""The cluster simulator: N simulated replicas behind the real cluster's routing rule and
global scheduler logic, with replica state reaching the router late.

Each replica is `bench.simulate.ReplicaSim` (the pure core and simulated engine of
`cacheopt sim`). Routing is one of:

- `kv`: `cluster.routing.rank_by_headroom`, the rule the Ray Serve router runs, over the
  replicas' KV snapshots as the router would have them: each replica publishes one every
  `state_period_s` (phase drawn per replica), seen `state_delay_s` later; requests sent
  since a snapshot are charged as the router charges them. Without a fresh snapshot of
  every replica (older than cluster.routing.SNAPSHOT_MAX_AGE_S) it falls back to power of
  two choices, as the real router does.
- `p2c`: Ray Serve's default: two replicas drawn, the shorter queue wins. Queue lengths
  are fresh (Serve probes them), so the baseline gets the best information it could have.
- `least-loaded`: the shortest queue of all, fresh; `round-robin`.

`kv` and `least-loaded` add prefix affinity (`prefix_slack`, cluster.routing.PrefixIndex):
among replicas within that many requests of the least loaded, the one sent the longest
prefix of the request's prompt lately goes first. `least-loaded` so is Ray Serve LLM's
PrefixCacheAffinityRouter with fresh queue lengths; `prefix_slack=none` turns it off
(`least-loaded:prefix_slack=none` is HAProxy's least connections). `kv` ranks by load (as
the router sees it, late) and prefix, as deployed; `kv:headroom=on` adds the rule's KV part
(cluster.routing.ROUTER_HEADROOM).

Every `report_period_s` each replica reports to `global_scheduler.control.ClusterControl`
(the global scheduler's own logic) and takes back p and its reserve lease, applied as the
replica applies them. Reserve: `pressure` (the scheduler's split), `static` (an equal
split of the same budget) or `none` (no reserve). p (confidence mode "rate"): from the
cluster's arrival rate (`cluster`, as deployed) or each replica's own (`replica`).

Deterministic for a seed: events are ordered by (time, kind, sequence). One difference
from `simulate`: a replica that has work but can run nothing plans again every
iteration time (as an engine keeps stepping), where the single-replica loop jumps to the
next arrival; with one replica and p fixed the two agree unless admission turns on time
passing between arrivals (tests/test_cluster_sim.py).
"""

from __future__ import annotations

import heapq
import random
import time
from collections import deque
from dataclasses import dataclass, fields, replace

from bench.metrics import RunStats
from bench.simulate import STUCK_IDLE_PLANS, ReplicaSim, SimResult, SimSetup, fits_context, outcome_of
from bench.traces import TraceRequest
from cluster.routing import (
    PREFIX_SLACK_REQUESTS,
    ROUTER_HEADROOM,
    ROUTING_STATS_PERIOD_S,
    PrefixIndex,
    ReplicaView,
    rank_by_headroom,
)
from global_scheduler.confidence import ArrivalRateEstimator, RateTunedConfidence
from global_scheduler.control import REPLICA_SILENT_S, REPORT_PERIOD_S, ClusterControl
from predictor.base import OutputLengthPredictor
from replicas.plan import blocks_for
from replicas.request import Request
from replicas.snapshot import KVSnapshot, take_snapshot

ROUTERS = ("kv", "p2c", "least-loaded", "round-robin")
RESERVES = ("pressure", "static", "none")
P_SCOPES = ("cluster", "replica")
REQUEST_BLOCKS_SMOOTHING = 0.1  # as the serving replica smooths what a request asks (cluster/server.py)

# Event kinds, in their order at equal times: arrivals before a step's end, so that a
# request arriving as a step ends is offered admission in the next step (as `simulate`).
ARRIVAL, STEP_END, REPORT, PLAN = 0, 1, 2, 3


@dataclass(frozen=True)
class ClusterSimSetup:
    replicas: int = 4
    router: str = "kv"
    # How often a replica's snapshot reaches the router, and how late. As deployed: Serve's
    # controller collects routing statistics every ROUTING_STATS_PERIOD_S and broadcasts
    # them on a later loop, so they arrive about one period after they were taken.
    state_period_s: float = ROUTING_STATS_PERIOD_S
    state_delay_s: float = ROUTING_STATS_PERIOD_S
    report_period_s: float = REPORT_PERIOD_S  # replica <-> global scheduler
    reserve: str = "pressure"
    p_scope: str = "cluster"
    prefix_slack: float | None = PREFIX_SLACK_REQUESTS  # kv and least-loaded; None: no prefix affinity
    headroom: str = "on" if ROUTER_HEADROOM else "off"  # kv: "on" adds the rule's KV part (off as deployed)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas={self.replicas} must be >= 1")
        for name, value, allowed in (("router", self.router, ROUTERS), ("reserve", self.reserve, RESERVES),
                                     ("p_scope", self.p_scope, P_SCOPES), ("headroom", self.headroom, ("on", "off"))):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}; choose one of {', '.join(allowed)}")
        if self.state_period_s <= 0 or self.state_delay_s < 0 or not 0 < self.report_period_s <= REPLICA_SILENT_S / 2:
            raise ValueError(f"state_period_s must be > 0, state_delay_s >= 0 and report_period_s in (0, "
                             f"{REPLICA_SILENT_S / 2:g}] (the global scheduler forgets a replica silent for "
                             f"{REPLICA_SILENT_S:g} s)")


def parse_variant(text: str, base: ClusterSimSetup) -> ClusterSimSetup:
    """`ROUTER[:FIELD=VALUE...]`, e.g. `kv`, `p2c`, `kv:state_period_s=1`, `kv:reserve=static`:
    `base` with the router and the fields named."""
    router, *options = text.split(":")
    changes: dict[str, object] = {"router": router}
    known = {f.name: f for f in fields(ClusterSimSetup)}
    for option in options:
        name, sep, value = option.partition("=")
        if not sep or name not in known or name in ("router", "replicas"):
            raise ValueError(f"variant {text!r}: {option!r} is not FIELD=VALUE with FIELD one of "
                             f"{', '.join(n for n in known if n not in ('router', 'replicas'))}")
        what = "seconds" if name.endswith("_s") else "requests or none" if name == "prefix_slack" else ""
        try:
            if name == "prefix_slack":
                changes[name] = None if value == "none" else float(value)
            else:
                changes[name] = float(value) if name.endswith("_s") else value
        except ValueError:
            raise ValueError(f"variant {text!r}: {name} takes {what}, not {value!r}") from None
    return replace(base, **changes)  # type: ignore[arg-type]


class _PublishedState:
    """What the router can know of one replica: the snapshot of the state it was in at the
    last publication tick at least `delay` ago. State changes only at events, so a
    snapshot is taken only for a state that some tick saw (lazily)."""

    def __init__(self, replica: ReplicaSim, period: float, delay: float, phase: float):
        self.replica, self.period, self.delay, self.phase = replica, period, delay, phase
        self.changed_s = float("-inf")  # when the current state began
        self.current: KVSnapshot | None = None  # its snapshot, once taken
        self.history: deque[tuple[float, float, KVSnapshot]] = deque()  # (from, until, snapshot) of earlier states

    def _last_tick(self, t: float, strict: bool) -> float:
        k = (t - self.phase) // self.period
        tick = self.phase + k * self.period
        return tick - self.period if strict and tick >= t else tick

    def changing(self, now: float) -> None:
        """Call before the replica's state changes at `now`."""
        if now == self.changed_s:
            self.current = None  # a snapshot taken at this instant saw the state before this change
            return
        if self._last_tick(now, strict=True) >= self.changed_s:  # a tick saw the state that ends now
            snap = self.current or take_snapshot(self.replica.scheduler, now)
            self.history.append((self.changed_s, now, snap))
        self.changed_s, self.current = now, None

    def seen_at(self, now: float) -> KVSnapshot | None:
        tick = self._last_tick(now - self.delay, strict=False)
        if tick < 0:
            return None  # nothing published yet
        while self.history and self.history[0][1] <= tick:
            self.history.popleft()  # states that ended before this tick: no later routing needs them
        if tick >= self.changed_s:
            if self.current is None:
                self.current = take_snapshot(self.replica.scheduler, tick)
            snap = self.current
        else:
            snap = next(s for start, until, s in self.history if start <= tick < until)
        return snap if snap.taken_s == tick else replace(snap, taken_s=tick)


class _Router:
    def __init__(self, setup: ClusterSimSetup, replicas: list[ReplicaSim], rng: random.Random):
        self.setup, self.replicas, self.rng = setup, replicas, rng
        n = len(replicas)
        # Only the KV rule reads published state; the others see the replicas' queues fresh.
        self.published = [_PublishedState(r, setup.state_period_s, setup.state_delay_s,
                                          rng.uniform(0, setup.state_period_s)) for r in replicas] \
            if setup.router == "kv" and n > 1 else []
        self.sent: list[deque[float]] = [deque() for _ in range(n)]
        self.request_blocks = [float(blocks_for(r.setup.engine.max_model_len // 2, r.block_size)) for r in replicas]
        self.next_robin = 0
        self.decision_s = 0.0  # wall time spent choosing
        affine = setup.prefix_slack is not None and setup.router in ("kv", "least-loaded")
        self.prefixes = PrefixIndex() if affine else None

    def _load(self, i: int) -> int:
        core = self.replicas[i].scheduler
        return len(core.running) + len(core.waiting)

    def _p2c(self) -> int:
        a, b = self.rng.sample(range(len(self.replicas)), 2)
        return a if self._load(a) <= self._load(b) else b

    def choose(self, now: float, request: Request) -> int:
        started = time.perf_counter()
        n = len(self.replicas)
        keys = (request.prefix_keys or ()) if self.prefixes is not None else ()
        matched = [self.prefixes.matched(i, keys) if keys else 0 for i in range(n)]  # type: ignore[union-attr]
        if n == 1:
            choice = 0
        elif self.setup.router == "round-robin":
            choice, self.next_robin = self.next_robin, (self.next_robin + 1) % n
        elif self.setup.router == "least-loaded":
            start = self.rng.randrange(n)  # ties to a random one, not always the first
            order = [(start + k) % n for k in range(n)]
            least = min(map(self._load, order))
            slack = self.setup.prefix_slack if self.prefixes is not None else 0.0
            choice = min(order, key=lambda i: (self._load(i) > least + slack, -matched[i], self._load(i)))
        elif self.setup.router == "p2c":
            choice = self._p2c()
        else:
            views = []
            for i, state in enumerate(self.published):
                snap = state.seen_at(now)
                sent = self.sent[i]
                if snap is not None:
                    while sent and sent[0] <= snap.taken_s:
                        sent.popleft()
                views.append(ReplicaView(snap, len(sent), True, self.request_blocks[i], prefix_blocks=matched[i]))
            slack = self.setup.prefix_slack if self.setup.prefix_slack is not None else 0.0
            order = rank_by_headroom(views, now, prefix_slack=slack, headroom=self.setup.headroom == "on")
            choice = self._p2c() if order is None else order[0]
        if self.published:  # the KV rule charges what it sent since a snapshot; the others need no record
            self.sent[choice].append(now)
        if keys:
            self.prefixes.record(choice, keys, self.replicas[choice].total_blocks)  # type: ignore[union-attr]
        self.decision_s += time.perf_counter() - started
        return choice

    def changing(self, i: int, now: float) -> None:
        if self.published:
            self.published[i].changing(now)

    def finished(self, i: int, request: Request) -> None:
        """As the serving replica: what a finished request held is the charge for the next ones."""
        block = self.replicas[i].block_size
        self.request_blocks[i] += REQUEST_BLOCKS_SMOOTHING * (
            blocks_for(request.prompt_tokens + request.num_output_tokens, block) - self.request_blocks[i])


@dataclass
class ClusterSimResult(SimResult):
    replica_requests: list[int] | None = None  # how many requests each replica got
    routing_us_per_request: float = 0.0


def simulate_cluster(trace: list[TraceRequest], policy_name: str, setup: SimSetup, cluster: ClusterSimSetup,
                     predictor: OutputLengthPredictor | None, control_settings: dict | None = None, *,
                     seed: int = 0) -> ClusterSimResult:
    """Replay `trace` through `cluster.replicas` replicas of `setup`. `control_settings`
    (global_scheduler.control.control_settings) tunes p from the arrival rate; None keeps
    the configured p and still splits the reserve."""
    started = time.perf_counter()
    n = cluster.replicas
    rng = random.Random(seed)
    replicas = [ReplicaSim(policy_name, setup, predictor, seed=seed * 1000 + i) for i in range(n)]
    router = _Router(cluster, replicas, rng)
    reserve_fraction = setup.cacheopt.reserve_fraction
    settings = control_settings or {"p_min": 0.5, "p_max": 0.5, "low_rps": 0.0, "high_rps": 1.0,
                                    "reserve_fraction": reserve_fraction, "redis_url": None, "replicas": n}
    control = ClusterControl(settings)
    tune_p = control_settings is not None
    own_rate = [ArrivalRateEstimator() for _ in range(n)]
    own_tuner = RateTunedConfidence(p_min=settings["p_min"], p_max=settings["p_max"],
                                    low_rps=settings["low_rps"] / n, high_rps=settings["high_rps"] / n)

    kept = [item for item in trace if fits_context(item, setup)]
    requests = sorted((replicas[0].request_of(item) for item in kept), key=lambda r: r.arrival_s)
    assigned = [0] * n
    arrivals_since_report: list[list[float]] = [[] for _ in range(n)]

    events: list[tuple] = []
    sequence = 0

    def push(t: float, kind: int, i: int, payload=None) -> None:
        nonlocal sequence
        sequence += 1
        heapq.heappush(events, (t, kind, sequence, i, payload))

    busy = [False] * n  # a step in flight
    plan_token = [0] * n  # only the latest PLAN event of a replica counts
    idle_plans = [0] * n
    pending_arrivals = len(requests)

    def plan_now(i: int, t: float) -> None:
        plan_token[i] += 1
        push(t, PLAN, i, plan_token[i])

    for request in requests:
        push(request.arrival_s, ARRIVAL, -1, request)
    start_s = requests[0].arrival_s if requests else 0.0
    for i in range(n):
        push(start_s + rng.uniform(0, cluster.report_period_s), REPORT, i)

    now = last_step_end = start_s
    while events:
        now, kind, _, i, payload = heapq.heappop(events)
        if kind == ARRIVAL:
            pending_arrivals -= 1
            i = router.choose(now, payload)
            assigned[i] += 1
            arrivals_since_report[i].append(now)
            router.changing(i, now)
            replicas[i].scheduler.add_request(payload, now)
            if not busy[i]:
                plan_now(i, now)
        elif kind == PLAN:
            if busy[i] or payload != plan_token[i]:
                continue
            replica = replicas[i]
            router.changing(i, now)
            step = replica.step(now)
            if step is not None:
                idle_plans[i] = 0
                plan, duration = step
                busy[i] = True
                push(now + duration, STEP_END, i, (plan, duration))
            elif replica.scheduler.has_work:
                # As `simulate`: plan again at once twice (preempted requests resume), then
                # when time has passed or the next arrival here comes (which plans at once).
                idle_plans[i] += 1
                if idle_plans[i] > STUCK_IDLE_PLANS and not pending_arrivals:
                    raise RuntimeError(f"{policy_name}: replica {i} stuck with {len(replica.scheduler.waiting)} waiting")
                wait = 0.0 if idle_plans[i] <= 2 else max(replica.scheduler.max_recent_iteration_s, 1e-3)
                plan_now(i, now + wait)
        elif kind == STEP_END:
            plan, duration = payload
            last_step_end = now
            router.changing(i, now)
            for request in replicas[i].step_done(plan, now, duration):
                router.finished(i, request)
            busy[i] = False
            plan_now(i, now)
        else:  # REPORT
            replica = replicas[i]
            snap = take_snapshot(replica.scheduler, now)
            reply = control.report(f"replica-{i}", arrivals_since_report[i], snap.to_dict(), {}, True, now=now)
            router.changing(i, now)
            if tune_p and replica.tunable:
                if cluster.p_scope == "cluster":
                    replica.policy.set_confidence(reply["confidence"])
                else:
                    for t in arrivals_since_report[i]:
                        own_rate[i].observe(t)
                    replica.policy.set_confidence(own_tuner.confidence(own_rate[i].rate_rps(now)))
            arrivals_since_report[i] = []
            replica.ledger.set_reserve_target(min(_reserve_blocks(cluster, reply, replicas), replica.total_blocks - 1))
            if pending_arrivals or any(r.scheduler.has_work for r in replicas):
                push(now + cluster.report_period_s, REPORT, i)
            if not busy[i] and replica.scheduler.has_work:
                plan_now(i, now)  # a larger reserve or another p may admit what waits

    stats = [r.stats(0.0) for r in replicas]
    counters: dict[str, int] = {}
    for s in stats:
        for name, value in s.counters.items():
            counters[name] = counters.get(name, 0) + value
    total_steps = sum(r.num_steps for r in replicas)
    merged = RunStats(
        duration_s=last_step_end - start_s,  # not the last event: a report may come after the last finish
        preemptions_by_mode={mode: sum(s.preemptions_by_mode[mode] for s in stats) for mode in ("recompute", "swap")},
        kv_utilization_mean=(sum(r.held_block_sum for r in replicas)
                             / sum(r.num_steps * r.total_blocks for r in replicas)) if total_steps else 0.0,
        counters=counters)
    return ClusterSimResult(policy=policy_name, outcomes=[outcome_of(r) for r in requests], stats=merged,
                            num_steps=total_steps, num_dropped=len(trace) - len(kept),
                            wall_s=time.perf_counter() - started, replica_requests=assigned,
                            routing_us_per_request=1e6 * router.decision_s / max(1, len(requests)))


def _reserve_blocks(cluster: ClusterSimSetup, reply: dict, replicas: list[ReplicaSim]) -> int:
    if cluster.reserve == "none":
        return 0
    if cluster.reserve == "static":
        budget = sum(r.total_blocks for r in replicas) * replicas[0].setup.cacheopt.reserve_fraction
        return int(budget) // len(replicas)
    lease = reply["lease"]
    return 0 if lease is None else lease["blocks"]
