"""Run one policy over one trace on the simulated engine, and collect outcomes.

Event order is explicit: at equal times an arrival comes before a step boundary (key
(time, ARRIVAL < STEP_END, sequence)), so a request arriving exactly when a step ends is
offered admission in the very next step. With one engine the event queue reduces to a
merge of the sorted arrivals with the engine clock.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from bench.metrics import RequestOutcome, RunStats
from bench.traces import TraceRequest
from global_scheduler.confidence import ConfidenceController
from predictor.base import OutputLengthPredictor
from replicas.config import CacheOptConfig
from replicas.engines.config import LLAMA3_8B_H100, EngineConfig
from replicas.kv_blocks import SimBlockPool
from replicas.latency import get_latency_model
from replicas.plan import StepPlan
from replicas.policies import make_policy
from replicas.request import Request
from replicas.scheduler import build_scheduler
from replicas.sim_engine import SimEngine

ARRIVAL, STEP_END = 0, 1  # event-kind priority at equal times
STUCK_IDLE_PLANS = 100_000  # plans in a row with nothing to run: a policy that can never admit


@dataclass(frozen=True)
class SimSetup:
    """One simulated replica: the engine it models (the same `EngineConfig` a serving
    replica and the engine benchmark start vLLM with; `kv_blocks` counts vLLM's null block,
    None sizes the cache from the latency model's GPU memory) and how the simulation runs."""

    engine: EngineConfig = LLAMA3_8B_H100
    # The cost model the policy plans with (step budget, swap or recompute); None: the
    # engine's own. The engine bench sets it to what the real engine's policies use.
    policy_latency_model: str | None = None
    max_tokens: int = 1024  # per-request output cap (the Azure conv trace's longest output is 1000)
    host_swap_blocks: int | None = None  # None: as many as the GPU has
    can_swap: bool = True  # False: an engine that only recomputes (vLLM V1)
    cacheopt: CacheOptConfig = field(default_factory=CacheOptConfig)
    check_invariants: bool = False  # ledger.check_invariants() after every step (tests)

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.max_tokens >= self.engine.max_model_len:
            raise ValueError(f"max_tokens={self.max_tokens} must lie in [1, max_model_len={self.engine.max_model_len})")

    def total_blocks(self) -> int:
        return self.engine.usable_kv_blocks()


@dataclass
class SimResult:
    policy: str
    outcomes: list[RequestOutcome]
    stats: RunStats
    num_steps: int
    num_dropped: int  # requests longer than the model's context, as a server would reject them
    wall_s: float


def fits_context(item: TraceRequest, setup: SimSetup) -> bool:
    return item.prompt_tokens + min(item.output_tokens, setup.max_tokens) <= setup.engine.max_model_len


class ReplicaSim:
    """One simulated replica: the policy, the pure scheduler core and the simulated engine.
    The single-replica loop (`simulate`) and the cluster simulator (bench/cluster_sim.py)
    drive it."""

    def __init__(self, policy_name: str, setup: SimSetup, predictor: OutputLengthPredictor | None, *, seed: int = 0):
        e = setup.engine
        self.setup = setup
        self.policy_name = policy_name
        latency = get_latency_model(e.latency_model)
        self.block_size = e.block_size
        self.total_blocks = setup.total_blocks()
        costs = latency if setup.policy_latency_model is None else get_latency_model(setup.policy_latency_model)
        self.policy = make_policy(policy_name, predictor=predictor, costs=costs, cacheopt_config=setup.cacheopt)
        self.engine = SimEngine(latency, self.block_size, rng=random.Random(seed))
        swap_blocks = self.total_blocks if setup.host_swap_blocks is None else setup.host_swap_blocks
        pool = SimBlockPool(self.total_blocks, self.block_size) if e.prefix_caching else None
        self.scheduler = build_scheduler(self.policy, total_blocks=self.total_blocks, config=e.scheduler_config(),
                                         can_swap=self.engine.can_swap and setup.can_swap,
                                         host_swap_blocks=swap_blocks, pool=pool)
        self.ledger = self.scheduler.ledger
        self.tunable = hasattr(self.policy, "set_confidence")
        self.num_steps = 0
        self.held_block_sum = 0

    def request_of(self, item: TraceRequest) -> Request:
        setup, e = self.setup, self.setup.engine
        return Request(request_id=item.request_id, arrival_s=item.arrival_s, prompt_tokens=item.prompt_tokens,
                       max_tokens=min(setup.max_tokens, e.max_model_len - item.prompt_tokens),
                       slo=item.slo, true_output_tokens=min(item.output_tokens, setup.max_tokens),
                       prompt_text=item.prompt_text,
                       prefix_keys=item.prefix_keys(self.block_size) if e.prefix_caching else None)

    def step(self, now: float) -> tuple[StepPlan, float] | None:
        """Plan a step at `now`: the plan and how long it computes, or None when nothing could run."""
        plan = self.scheduler.schedule(now)
        if not plan.scheduled:
            return None
        return plan, self.engine.step_duration_s(plan)

    def step_done(self, plan: StepPlan, end: float, duration: float) -> list[Request]:
        """The step ended at `end`: the requests it finished."""
        finished = self.scheduler.on_step_done(plan, end, duration, _is_finished)
        self.held_block_sum += self.ledger.held_total
        self.num_steps += 1
        if self.setup.check_invariants:
            self.ledger.check_invariants()
            self.scheduler.check_blocks()
        return finished

    def stats(self, duration_s: float) -> RunStats:
        counters = dict(self.scheduler.counters)
        return RunStats(
            duration_s=duration_s,
            preemptions_by_mode={"recompute": counters.pop("preempt_recompute", 0),
                                 "swap": counters.pop("preempt_swap", 0)},
            kv_utilization_mean=self.held_block_sum / (self.num_steps * self.total_blocks) if self.num_steps else 0.0,
            counters=counters,
        )


def _is_finished(request: Request) -> bool:
    return request.num_output_tokens >= request.true_output_tokens


def simulate(trace: list[TraceRequest], policy_name: str, setup: SimSetup,
             predictor: OutputLengthPredictor | None,
             controller: ConfidenceController | None = None, *, seed: int = 0) -> SimResult:
    """Replay `trace` through one replica. `controller` plays the global scheduler: it
    hears every arrival and finish and sets the policy's confidence p (policies with a p).
    `seed` draws the engine's stalls, for a latency model that has them."""
    started = time.perf_counter()
    replica = ReplicaSim(policy_name, setup, predictor, seed=seed)
    scheduler, policy = replica.scheduler, replica.policy
    kept = [item for item in trace if fits_context(item, setup)]
    requests = sorted((replica.request_of(item) for item in kept), key=lambda r: r.arrival_s)
    tunable = controller is not None and replica.tunable

    now = 0.0
    next_arrival = 0
    num_idle_plans = 0
    while next_arrival < len(requests) or scheduler.has_work:
        if not scheduler.has_work:
            now = max(now, requests[next_arrival].arrival_s)
        while next_arrival < len(requests) and requests[next_arrival].arrival_s <= now:
            if tunable:
                controller.observe_arrival(requests[next_arrival].arrival_s)
                policy.set_confidence(controller.confidence(now))
            scheduler.add_request(requests[next_arrival], now)
            next_arrival += 1
        step = replica.step(now)
        if step is None:
            # Nothing could run: everyone preempted itself (admission resumes next step), or
            # nothing fits until time passes (an arrival, or a waiting request turning critical).
            num_idle_plans += 1
            if num_idle_plans > 2:
                if next_arrival < len(requests):
                    now = max(now, requests[next_arrival].arrival_s)
                elif num_idle_plans > STUCK_IDLE_PLANS:
                    raise RuntimeError(f"{policy_name}: scheduler stuck with {len(scheduler.waiting)} waiting")
                else:
                    now += max(scheduler.max_recent_iteration_s, 1e-3)
            continue
        num_idle_plans = 0
        plan, duration = step
        now += duration
        finished = replica.step_done(plan, now, duration)
        if tunable:
            for request in finished:
                controller.observe_finish(request.true_output_tokens > request.bound_at_admission_tokens)

    stats = replica.stats(now - (requests[0].arrival_s if requests else 0.0))
    return SimResult(policy=policy_name, outcomes=[outcome_of(r) for r in requests], stats=stats,
                     num_steps=replica.num_steps, num_dropped=len(trace) - len(kept),
                     wall_s=time.perf_counter() - started)


def outcome_of(request: Request) -> RequestOutcome:
    return RequestOutcome(
        request_id=request.request_id, slo=request.slo, arrival_s=request.arrival_s,
        prompt_tokens=request.prompt_tokens, output_tokens=request.num_output_tokens,
        true_output_tokens=request.true_output_tokens, first_token_s=request.first_token_s,
        finish_s=request.finish_s, token_gaps_s=request.token_gaps_s,
        num_preemptions=request.num_preemptions, num_recomputed_tokens=request.num_recomputed_tokens,
        bound_tokens=request.bound_at_admission_tokens, shed=request.shed_s is not None)
