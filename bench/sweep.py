"""A rate sweep: every (policy, rate, seed) simulated on its own, in parallel processes.

The predictor is fitted on a training split of the trace (by seed) and the runs replay the
rest, rate-scaled. Each run is deterministic for its seed.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.cluster_sim import ClusterSimSetup, simulate_cluster
from bench.metrics import summarize
from bench.simulate import SimSetup, simulate
from bench.traces import NAMED_TRACES, TraceRequest, load_trace, scale_to_rate, split_train_test
from global_scheduler.confidence import ConfidenceController, FeedbackConfidence, RateController, RateTunedConfidence
from global_scheduler.control import control_settings
from predictor.base import OutputLengthPredictor
from predictor.length_quantile import LengthQuantilePredictor
from predictor.training import DEFAULT_ARTIFACT
from replicas.policies import POLICY_NAMES, check_policy_names

TRACES = (*NAMED_TRACES, "alpaca")
PREDICTORS = ("length", "learned")
CONFIDENCE_MODES = ("fixed", "rate", "feedback")


@dataclass(frozen=True)
class SweepSpec:
    # An Azure trace (conv, code), "alpaca" (AlpacaEval prompts on the conv trace's arrivals),
    # or a trace file (Azure CSV or Mooncake/AIPerf JSONL, bench/traces.py).
    trace: str = "conv"
    length_divisor: float = 1.0  # divide a trace's token counts (small models)
    policies: tuple[str, ...] = POLICY_NAMES
    rates: tuple[float, ...] = (4.0, 6.0, 8.0)
    seeds: tuple[int, ...] = (0,)
    limit: int | None = None  # replay only the first `limit` test requests
    train_fraction: float = 0.2
    # "test" for results; "train" to choose parameters without looking at the test part.
    replay: str = "test"
    predictor: str = "length"  # "learned" needs prompt text: the alpaca workload
    artifact: Path = DEFAULT_ARTIFACT
    # How p is set: the configured p ("fixed"), from the arrival rate ("rate"), or to hold
    # the share of under-predicted requests at `feedback_target` ("feedback").
    confidence_mode: str = "fixed"
    p_range: tuple[float, float] = (0.3, 0.9)
    # Per replica; set from the sustainable rate on the training split (docs/RESULTS.md 2.2).
    rate_band_rps: tuple[float, float] = (8.0, 16.5)
    feedback_target: float = 0.3
    setup: SimSetup = field(default_factory=SimSetup)
    # Several replicas behind a router (bench/cluster_sim.py); `rates` are then per replica.
    cluster: ClusterSimSetup | None = None

    def __post_init__(self) -> None:
        check_policy_names(self.policies)
        if not self.policies or not self.rates or not self.seeds:
            raise ValueError("a sweep needs at least one policy, one rate and one seed")
        if any(r <= 0 for r in self.rates):
            raise ValueError(f"rates must be > 0 req/s, got {list(self.rates)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit} must be >= 1")
        if self.trace not in TRACES and not Path(self.trace).is_file():
            raise ValueError(f"trace={self.trace!r} is neither one of {', '.join(TRACES)} nor a file")
        if not self.length_divisor > 0:
            raise ValueError(f"length_divisor={self.length_divisor} must be > 0")
        for name, value, allowed in (("predictor", self.predictor, PREDICTORS),
                                     ("confidence_mode", self.confidence_mode, CONFIDENCE_MODES)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}; choose one of {', '.join(allowed)}")
        if self.predictor == "learned" and self.trace != "alpaca":
            raise ValueError(f"the learned predictor reads prompt text, which the Azure {self.trace!r} trace does "
                             "not carry; use trace 'alpaca'")
        if self.replay not in ("test", "train"):
            raise ValueError(f"replay={self.replay!r} must be 'test' or 'train'")
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"train_fraction={self.train_fraction} must lie in (0, 1)")
        if self.cluster is not None and self.confidence_mode == "feedback":
            raise ValueError("the cluster simulator tunes p from the arrival rate (confidence_mode 'rate') or keeps it "
                             "fixed; 'feedback' is a single-replica controller")
        controller_for(self)  # bad tuner settings fail here, not in a worker process


@functools.lru_cache(maxsize=8)
def workload(spec: SweepSpec, seed: int) -> tuple[list[TraceRequest], OutputLengthPredictor]:
    """The replayed requests and the predictor, which never saw them."""
    if spec.trace == "alpaca":
        return _alpaca_workload(spec, seed)
    requests = load_trace(spec.trace, seed=seed, length_divisor=spec.length_divisor)
    train, test = split_train_test(requests, spec.train_fraction, seed=seed)
    predictor = LengthQuantilePredictor.fit((r.prompt_tokens, r.output_tokens) for r in train)
    replayed = test if spec.replay == "test" else train
    return (replayed[:spec.limit] if spec.limit else replayed), predictor


def _alpaca_workload(spec: SweepSpec, seed: int) -> tuple[list[TraceRequest], OutputLengthPredictor]:
    """AlpacaEval prompts split by prompt as the learned model's artifact was (seed 0
    split when no artifact is used), Llama-3-8B-Instruct's real response lengths, on the
    conv trace's arrival times. The seed permutes prompts over arrivals and SLO classes."""
    from bench.alpaca_workload import DEFAULT_GENERATOR, alpaca_trace
    from predictor.alpaca import load_alpaca, split_by_prompt
    from predictor.tokens import chat_prompt_tokens
    from predictor.training import DEFAULT_FRACTIONS, load_learned_predictor, split_of

    fractions, split_seed = split_of(spec.artifact) if spec.predictor == "learned" else (DEFAULT_FRACTIONS, 0)
    train, _, test = split_by_prompt(load_alpaca(), fractions, seed=split_seed)
    if spec.predictor == "learned":
        predictor = load_learned_predictor(spec.artifact)
    else:
        predictor = LengthQuantilePredictor.fit(
            (chat_prompt_tokens(r.instruction), r.output_tokens) for r in train if r.generator == DEFAULT_GENERATOR)
    requests = alpaca_trace(test if spec.replay == "test" else train, arrivals_from="conv", limit=spec.limit,
                            seed=seed)
    return requests, predictor


def controller_for(spec: SweepSpec) -> ConfidenceController | None:
    p_min, p_max = spec.p_range
    if spec.confidence_mode == "rate":
        low, high = spec.rate_band_rps
        return RateController(RateTunedConfidence(p_min=p_min, p_max=p_max, low_rps=low, high_rps=high))
    if spec.confidence_mode == "feedback":
        return FeedbackConfidence(spec.feedback_target, p_min=p_min, p_max=p_max,
                                  initial=spec.setup.cacheopt.confidence)
    return None


@dataclass
class RunOutput:
    row: dict
    ttft_s: list[float]  # per finished request, for CDFs
    max_gap_s: list[float]


def cluster_control_settings(spec: SweepSpec) -> dict | None:
    """The global scheduler's settings for the cluster simulator; None: p stays fixed."""
    assert spec.cluster is not None
    if spec.confidence_mode != "rate":
        return None
    return control_settings(replicas=spec.cluster.replicas, p_range=spec.p_range, rate_band_rps=spec.rate_band_rps,
                            reserve_fraction=spec.setup.cacheopt.reserve_fraction)


def run_one(spec: SweepSpec, policy: str, rate: float, seed: int) -> RunOutput:
    requests, predictor = workload(replace(spec, cluster=None), seed)  # one workload for every variant
    extra: dict = {}
    if spec.cluster is None:
        result = simulate(scale_to_rate(requests, rate), policy, spec.setup, predictor, controller_for(spec),
                          seed=seed)
    else:
        c = spec.cluster
        result = simulate_cluster(scale_to_rate(requests, rate * c.replicas), policy, spec.setup, c, predictor,
                                  cluster_control_settings(spec), seed=seed)
        extra = {"replicas": c.replicas, "router": c.router, "state_period_s": c.state_period_s,
                 "reserve": c.reserve, "p_scope": c.p_scope, "cluster_rate_rps": rate * c.replicas,
                 "routing_us_per_request": result.routing_us_per_request,
                 "replica_requests_max_over_mean": (max(result.replica_requests or [0]) * c.replicas
                                                    / max(1, sum(result.replica_requests or [0])))}
    row = {"policy": policy, "rate_rps": rate, "repeat": seed,
           **summarize(result.outcomes, result.stats),
           "num_dropped": result.num_dropped, "num_steps": result.num_steps, "sim_wall_s": result.wall_s, **extra}
    ttft = [o.first_token_s - o.arrival_s for o in result.outcomes if o.first_token_s is not None]
    max_gap = [max(o.token_gaps_s) for o in result.outcomes if o.token_gaps_s]
    return RunOutput(row, ttft, max_gap)


def run_sweep(spec: SweepSpec, *, jobs: int | None = None,
              on_done: Callable[[RunOutput], None] | None = None) -> list[RunOutput]:
    """All runs of the sweep, in (policy, rate, seed) order whatever order they finish in."""
    return _run_all([(spec, p, r, s) for p in spec.policies for r in spec.rates for s in spec.seeds], jobs, on_done)


def run_variants(spec: SweepSpec, variants: Mapping[str, ClusterSimSetup], *, jobs: int | None = None,
                 on_done: Callable[[RunOutput], None] | None = None) -> list[RunOutput]:
    """The cluster simulator's sweep: every (variant, rate, seed) with the one policy of
    `spec`; each row's "policy" is the variant's label (the series of the report) and
    "replica_policy" the policy the replicas run."""
    if len(spec.policies) != 1:
        raise ValueError(f"a cluster sweep runs one replica policy, got {', '.join(spec.policies)}")
    tasks = [(replace(spec, cluster=setup), spec.policies[0], r, s)
             for setup in variants.values() for r in spec.rates for s in spec.seeds]
    labels = [{"policy": label, "replica_policy": spec.policies[0]}
              for label in variants for _ in spec.rates for _ in spec.seeds]
    return _run_all(tasks, jobs, on_done, labels)


def _run_all(tasks: list[tuple[SweepSpec, str, float, int]], jobs: int | None,
             on_done: Callable[[RunOutput], None] | None, labels: list[dict] | None = None) -> list[RunOutput]:
    """Every task's output, in task order; `labels[i]` is written into task i's row."""
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(tasks)))
    results: dict[int, RunOutput] = {}

    def finish(index: int, output: RunOutput) -> None:
        if labels is not None:
            output.row.update(labels[index])
        results[index] = output
        if on_done:
            on_done(output)

    if jobs == 1:
        for index, task in enumerate(tasks):
            finish(index, run_one(*task))
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(run_one, *task): index for index, task in enumerate(tasks)}
            for future in as_completed(futures):
                finish(futures[future], future.result())
    return [results[i] for i in range(len(tasks))]


def knee_samples(outputs: Sequence[RunOutput], knee_rate: float, seed: int) -> dict[str, dict[str, list[float]]]:
    """TTFT and per-request max-gap samples of every policy at the knee rate."""
    return {o.row["policy"]: {"ttft": o.ttft_s, "tbt": o.max_gap_s}
            for o in outputs if o.row["rate_rps"] == knee_rate and o.row["repeat"] == seed}
