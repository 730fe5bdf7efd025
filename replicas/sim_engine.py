"""The simulated engine: a step takes as long as the latency model says.

It declares it can swap: KV blocks move over the host link, and the transfers of a step's
swap-outs and swap-ins are added to its duration (vLLM V0 swapped synchronously too).
A fitted model of a machine that stalls (LinearLatencyModel.stall_probability) has its
stalls drawn from `rng`, one step at a time, instead of spread over every step: a queue
sees a few long steps, not uniformly slow ones. Deterministic for the rng's seed.
"""

from __future__ import annotations

import random

from replicas.latency import LatencyModel, LinearLatencyModel
from replicas.plan import StepPlan


class SimEngine:
    can_swap = True

    def __init__(self, latency: LatencyModel, block_size: int, rng: random.Random | None = None):
        self.latency = latency
        self.block_size = block_size
        self._stalling: LinearLatencyModel | None = None
        if isinstance(latency, LinearLatencyModel) and latency.stall_probability > 0 and rng is not None:
            self._stalling = latency
        self.rng = rng

    def step_duration_s(self, plan: StepPlan) -> float:
        num_new = 0
        num_context = 0
        for request, n in plan.scheduled.items():
            num_new += n
            num_context += request.num_computed_tokens + n
        stalling = self._stalling
        if stalling is None:
            duration = self.latency.iteration_time_s(num_new, len(plan.scheduled), num_context)
        else:
            duration = stalling.stall_free_time_s(num_new, len(plan.scheduled), num_context)
            if self.rng is not None and self.rng.random() < stalling.stall_probability:
                duration += stalling.stall_s
        swapped_blocks = plan.swap_in_blocks + plan.swap_out_blocks
        if swapped_blocks:
            # swap_time_s is the round trip; each block here crosses the link once.
            duration += self.latency.swap_time_s(swapped_blocks * self.block_size, self.block_size) / 2
        return duration
