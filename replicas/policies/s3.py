"""S3 (Jin et al., 2023): reserve the predicted output length, unpadded.

A request reserves prompt + point prediction up front. When it outgrows that (an
under-prediction) it asks for double its prediction from the free pool; if the pool cannot
give it, someone is preempted (vLLM's victim order), possibly the request itself.
"""

from __future__ import annotations

from predictor.base import OutputLengthPredictor
from replicas.policies.base import Policy
from replicas.request import Request


class S3Policy(Policy):
    name = "s3"

    def __init__(self, predictor: OutputLengthPredictor):
        self.predictor = predictor

    def on_arrival(self, request: Request) -> None:
        point = self.predictor.predict(request, 0.5).point_tokens
        request.predicted_output_tokens = request.bound_output_tokens = point
        request.bound_at_admission_tokens = point

    def try_admit(self, request: Request, num_new_tokens: int) -> bool:
        need = self._blocks_after(request, num_new_tokens)
        target = self._own_blocks(request, request.prompt_tokens + request.bound_output_tokens)
        return self._admit_reserving(request, held_blocks=need, reserved_blocks=max(need, target))

    def try_grow(self, request: Request, held_blocks: int) -> bool:
        share = self.ledger.shares[request.request_id]
        room = share.reserved - share.lent
        if held_blocks > room:
            doubled = min(request.max_tokens, 2 * max(request.bound_output_tokens, request.num_output_tokens + 1))
            want = max(held_blocks, self._own_blocks(request, request.prompt_tokens + doubled)) - room
            if self.ledger.try_top_up(request.request_id, want, use_reserve=False) is None:
                return False
            request.bound_output_tokens = doubled
            self.s.counters["underpredicted"] += 1
        return self.ledger.try_hold(request.request_id, held_blocks)
