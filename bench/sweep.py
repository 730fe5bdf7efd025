"""A rate sweep: every (policy, rate, seed) simulated on its own, in parallel processes.

The predictor is fitted on a training split of the trace (by seed) and the runs replay the
rest, rate-scaled. Each run is deterministic for its seed.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

from bench.metrics import summarize
from bench.simulate import SimSetup, simulate
from bench.traces import TraceRequest, load_azure_trace, scale_to_rate, split_train_test
from predictor.length_quantile import LengthQuantilePredictor
from replicas.policies import ABLATION_NAMES, POLICY_NAMES


@dataclass(frozen=True)
class SweepSpec:
    trace: str = "conv"
    policies: tuple[str, ...] = POLICY_NAMES
    rates: tuple[float, ...] = (4.0, 6.0, 8.0)
    seeds: tuple[int, ...] = (0,)
    limit: int | None = None  # replay only the first `limit` test requests
    train_fraction: float = 0.2
    # "test" for results; "train" to choose parameters without looking at the test part.
    replay: str = "test"
    setup: SimSetup = field(default_factory=SimSetup)

    def __post_init__(self) -> None:
        known = set(POLICY_NAMES) | set(ABLATION_NAMES)
        unknown = [p for p in self.policies if p not in known]
        if unknown:
            raise ValueError(f"unknown policy {unknown[0]!r}; choose from: {', '.join(sorted(known))}")
        if not self.policies or not self.rates or not self.seeds:
            raise ValueError("a sweep needs at least one policy, one rate and one seed")
        if any(r <= 0 for r in self.rates):
            raise ValueError(f"rates must be > 0 req/s, got {list(self.rates)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit} must be >= 1")
        if self.replay not in ("test", "train"):
            raise ValueError(f"replay={self.replay!r} must be 'test' or 'train'")
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"train_fraction={self.train_fraction} must lie in (0, 1)")


@functools.lru_cache(maxsize=8)
def workload(trace: str, seed: int, train_fraction: float, limit: int | None,
             replay: str = "test") -> tuple[list[TraceRequest], LengthQuantilePredictor]:
    """The replayed requests and the length predictor fitted on the training part."""
    train, test = split_train_test(load_azure_trace(trace, seed=seed), train_fraction, seed=seed)
    predictor = LengthQuantilePredictor.fit((r.prompt_tokens, r.output_tokens) for r in train)
    replayed = test if replay == "test" else train
    return (replayed[:limit] if limit else replayed), predictor


@dataclass
class RunOutput:
    row: dict
    ttft_s: list[float]  # per finished request, for CDFs
    max_gap_s: list[float]


def run_one(spec: SweepSpec, policy: str, rate: float, seed: int) -> RunOutput:
    requests, predictor = workload(spec.trace, seed, spec.train_fraction, spec.limit, spec.replay)
    result = simulate(scale_to_rate(requests, rate), policy, spec.setup, predictor)
    row = {"policy": policy, "rate_rps": rate, "repeat": seed,
           **summarize(result.outcomes, result.stats),
           "num_dropped": result.num_dropped, "num_steps": result.num_steps, "sim_wall_s": result.wall_s}
    ttft = [o.first_token_s - o.arrival_s for o in result.outcomes if o.first_token_s is not None]
    max_gap = [max(o.token_gaps_s) for o in result.outcomes if o.token_gaps_s]
    return RunOutput(row, ttft, max_gap)


def run_sweep(spec: SweepSpec, *, jobs: int | None = None,
              on_done: Callable[[RunOutput], None] | None = None) -> list[RunOutput]:
    """All runs of the sweep, in (policy, rate, seed) order whatever order they finish in."""
    tasks = [(p, r, s) for p in spec.policies for r in spec.rates for s in spec.seeds]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(tasks)))
    results: dict[tuple, RunOutput] = {}
    if jobs == 1:
        for task in tasks:
            results[task] = run_one(spec, *task)
            if on_done:
                on_done(results[task])
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(run_one, spec, *task): task for task in tasks}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                if on_done:
                    on_done(results[futures[future]])
    return [results[t] for t in tasks]


def knee_samples(outputs: Sequence[RunOutput], knee_rate: float, seed: int) -> dict[str, dict[str, list[float]]]:
    """TTFT and per-request max-gap samples of every policy at the knee rate."""
    return {o.row["policy"]: {"ttft": o.ttft_s, "tbt": o.max_gap_s}
            for o in outputs if o.row["rate_rps"] == knee_rate and o.row["repeat"] == seed}
