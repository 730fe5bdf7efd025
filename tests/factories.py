"""Factories for requests, predictors and schedulers used across the policy tests."""

from __future__ import annotations

import itertools

from predictor.base import LengthPrediction
from replicas.config import CacheOptConfig, SchedulerConfig
from replicas.kv_blocks import SimBlockPool
from replicas.plan import RECOMPUTE, StepPlan
from replicas.policies import make_policy
from replicas.request import Request, Slo
from replicas.scheduler import ReplicaScheduler, build_scheduler

TIGHT = Slo("realtime", ttft_s=1.0, tbt_s=0.05)
CHAT = Slo("chat", ttft_s=3.0, tbt_s=0.2)
LOOSE = Slo("batch", ttft_s=15.0, tbt_s=1.0)

_ids = itertools.count()


def make_request(prompt: int = 8, output: int = 8, *, slo: Slo = CHAT, arrival_s: float = 0.0,
                 max_tokens: int = 64, rid: str | None = None, prefix_keys: tuple | None = None) -> Request:
    return Request(request_id=rid or f"r{next(_ids)}", arrival_s=arrival_s, prompt_tokens=prompt,
                   max_tokens=max_tokens, slo=slo, true_output_tokens=output, prefix_keys=prefix_keys)


class FixedPredictor:
    """Predicts `point` tokens with bound `bound`, and extends by `step` when outlived."""

    name = "fixed"

    def __init__(self, point: int = 8, bound: int = 12, step: int = 8):
        self.point, self.bound, self.step = point, bound, step

    def predict(self, request, confidence):
        bound = min(request.max_tokens, self.bound)
        return LengthPrediction(point_tokens=min(self.point, bound), bound_tokens=bound)

    def conditional_bound(self, request, generated_tokens, confidence):
        return min(request.max_tokens, generated_tokens + self.step)


class VariedPredictor(FixedPredictor):
    """Odd prompts get the long bound, even prompts a short one: long-lived hosts with
    idle reservations next to short would-be guests."""

    def predict(self, request, confidence):
        if request.prompt_tokens % 2:
            return super().predict(request, confidence)
        short = max(1, self.point // 4)
        return LengthPrediction(point_tokens=short, bound_tokens=short)


class FakeCosts:
    """Swap costs `swap_per_token_s`, recompute `recompute_per_token_s`, per token."""

    def __init__(self, swap_per_token_s: float = 1.0, recompute_per_token_s: float = 2.0):
        self.swap, self.recompute = swap_per_token_s, recompute_per_token_s

    def prefill_time_s(self, num_tokens):
        return self.recompute * num_tokens

    def iteration_time_s(self, num_new_tokens, num_requests, num_context_tokens):
        """2 ms per step plus 1 ms per new token."""
        return 0.002 + 0.001 * num_new_tokens

    def swap_time_s(self, num_tokens, block_size):
        return self.swap * num_tokens


def make_scheduler(policy: str = "cacheopt", *, total_blocks: int = 64, block_size: int = 4,
                   predictor=None, costs=None, can_swap: bool = False, host_swap_blocks: int = 0,
                   budget: int = 64, max_num_seqs: int = 64, prefix_caching: bool = False,
                   **cacheopt) -> ReplicaScheduler:
    """`prefix_caching`: blocks are placed in a SimBlockPool (request.prefix_keys hit)."""
    config = SchedulerConfig(block_size=block_size, max_num_seqs=min(max_num_seqs, budget), max_num_batched_tokens=budget)
    policy_obj = make_policy(policy, predictor=predictor or FixedPredictor(), costs=costs,
                             cacheopt_config=CacheOptConfig(**cacheopt))
    pool = SimBlockPool(total_blocks, block_size) if prefix_caching else None
    return build_scheduler(policy_obj, total_blocks=total_blocks, config=config, can_swap=can_swap,
                           host_swap_blocks=host_swap_blocks, pool=pool)


def finished_at_true_length(request: Request) -> bool:
    return request.num_output_tokens >= request.true_output_tokens


def run_step(scheduler: ReplicaScheduler, now_s: float = 0.0, duration_s: float = 0.01) -> StepPlan:
    plan = scheduler.schedule(now_s)
    scheduler.on_step_done(plan, now_s + duration_s, duration_s, finished_at_true_length)
    scheduler.ledger.check_invariants()
    return plan


def held(scheduler: ReplicaScheduler, request: Request) -> int:
    return scheduler.ledger.shares[request.request_id].held


__all__ = ["CHAT", "LOOSE", "RECOMPUTE", "TIGHT", "FakeCosts", "FixedPredictor", "VariedPredictor", "finished_at_true_length",
           "held", "make_request", "make_scheduler", "run_step"]
