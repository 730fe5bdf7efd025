"""`past-future`: LightLLM's Past-Future admission (ASPLOS'25), vLLM's order otherwise.

No per-request prediction: each running request is expected to reach
`max(1.1 x its output so far, an EMA of finished requests' output lengths)`, capped at its
max_tokens, and a waiting request is admitted only if the projected peak of everyone's
usage (replicas/projection.py) still fits. As in LightLLM (`RouterStatics`): the EMA starts
at 2,048 tokens, its weight starts at 0.5 and decays by 0.8 per finished request to 0.04,
and lengths under 64 tokens count as 64. LightLLM's "busy" switch (estimate max_tokens
above a KV-usage ratio) is left out: it turns the estimate into reserve-everything.
FCFS with head-of-line blocking, vLLM's victims and recompute.
"""

from __future__ import annotations

from replicas.policies.base import Policy
from replicas.projection import PeakProjection
from replicas.request import Request

EMA_START_TOKENS = 2048
EMA_WEIGHT_START, EMA_WEIGHT_MIN, EMA_WEIGHT_DECAY = 0.5, 0.04, 0.8
MIN_COUNTED_TOKENS = 64
GROWTH = 1.1


class PastFuturePolicy(Policy):
    name = "past-future"

    def __init__(self) -> None:
        self.ema_tokens = float(EMA_START_TOKENS)
        self._weight = EMA_WEIGHT_START

    def bind(self, scheduler) -> None:
        super().bind(scheduler)
        self.projection = PeakProjection(slack_tokens=self.block_size - 1)

    def _entry(self, request: Request) -> tuple[int, int]:
        now = self.s.step_index
        g = request.num_output_tokens
        expected = min(request.max_tokens, max(int(GROWTH * g), int(self.ema_tokens)))
        return now + max(expected - g, 1) - 1, request.num_tokens - request.num_shared_blocks * self.block_size - now

    def begin_admission(self) -> None:
        # The estimate moves with the EMA and with each request's output: project afresh.
        self.projection = PeakProjection(slack_tokens=self.block_size - 1)
        for request in self.s.running:
            self.projection.set(request.request_id, *self._entry(request))
        self._capacity_blocks = self.ledger.total_blocks - self.ledger.reserve_target

    def try_admit(self, request: Request, num_new_tokens: int) -> bool:
        entry = self._entry(request)
        # With nobody running, whatever fits now is admitted (an idle replica never refuses).
        too_big = self.projection and self.projection.peak_with(*entry) // self.block_size > self._capacity_blocks
        if too_big or not super().try_admit(request, num_new_tokens):
            return False
        self.projection.set(request.request_id, *entry)
        return True

    def on_leave(self, request: Request) -> None:
        if request.finish_s is None:
            return  # preempted or aborted: its length says nothing
        length = max(request.num_output_tokens, MIN_COUNTED_TOKENS)
        self.ema_tokens = max(MIN_COUNTED_TOKENS, self.ema_tokens * (1 - self._weight) + length * self._weight)
        self._weight = max(EMA_WEIGHT_MIN, self._weight * EMA_WEIGHT_DECAY)
