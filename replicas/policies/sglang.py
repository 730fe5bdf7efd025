"""SGLang's scheduler: admission against a decaying estimate of future decode demand.

Each running request is assumed to still need `ratio * remaining max_tokens` tokens; a new
request is admitted when its prompt plus `ratio * max_tokens` fits in what is left. The
ratio starts at 0.7 and decays every step to 0.098 over 600 steps (SGLang's defaults:
SGLANG_INIT_NEW_TOKEN_RATIO, ..._MIN_NEW_TOKEN_RATIO_FACTOR, ..._NEW_TOKEN_RATIO_DECAY_STEPS),
and resets when memory runs out. Retraction takes the request with the fewest output
tokens, longest prompt first. Blocks are allocated on demand.
"""

from __future__ import annotations

from replicas.plan import StepPlan
from replicas.policies.base import Policy
from replicas.request import Request

INIT_RATIO = 0.7
MIN_RATIO = INIT_RATIO * 0.14
DECAY_PER_STEP = (INIT_RATIO - MIN_RATIO) / 600


class SglangPolicy(Policy):
    name = "sglang"

    def __init__(self) -> None:
        self.ratio = INIT_RATIO
        self._budget_tokens = 0.0

    def begin_admission(self) -> None:
        future = sum(self.ratio * (r.max_tokens - r.num_output_tokens) for r in self.s.running)
        self._budget_tokens = self.ledger.free * self.block_size - future

    def try_admit(self, request: Request, num_new_tokens: int) -> bool:
        want = (request.num_tokens - request.num_computed_tokens
                + self.ratio * (request.max_tokens - request.num_output_tokens))
        if want > self._budget_tokens or not super().try_admit(request, num_new_tokens):
            return False
        self._budget_tokens -= want
        return True

    def choose_victim(self, requester: Request) -> Request:
        self.ratio = INIT_RATIO
        return min(self.s.running, key=lambda r: (r.num_output_tokens, -r.prompt_tokens))

    def after_step(self, plan: StepPlan) -> None:
        self.ratio = max(MIN_RATIO, self.ratio - DECAY_PER_STEP)
