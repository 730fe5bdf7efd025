"""CacheOPT (arXiv 2503.13773) with admission against the projected peak (DESIGN section 4).

On top of `edf` (the SLO-aware queue, critical admission, shedding, victim order and step
budget it shares), the KV mechanisms:

1. Predict each request's output with a bound U_p at confidence p (p retuned from outside);
   a request that outlives its bound gets a conditional bound (mechanism 1), re-derived
   from the residual distribution of requests that got that far.
2. Allocate on demand; admit a request only if the projected peak of everyone's usage
   (each running request growing to its bound and releasing at its predicted finish, plus
   the newcomer) stays below the replica's blocks less the global reserve
   (replicas/projection.py). Idle promises are anyone's while the peak fits, which is
   what reusing them amounts to; preemption happens only where a projection was wrong.
3. The global reserve: blocks admission leaves unclaimed, which running requests that
   outgrow their projection and critical requests may draw.
5. Preempt by swapping or recomputing, whichever the cost model says is faster.

`LockedCacheOptPolicy` (policies/cacheopt_locked.py) is the paper's literal mechanism 2
and 3 instead: reservations locked at admission, embedding, proactive top-up.
"""

from __future__ import annotations

from predictor.base import OutputLengthPredictor, check_confidence
from replicas.config import CacheOptConfig
from replicas.latency import LatencyModel
from replicas.plan import RECOMPUTE, SWAP, blocks_for
from replicas.policies.edf import EdfPolicy
from replicas.projection import PeakProjection
from replicas.request import Request


class CacheOptPolicy(EdfPolicy):
    name = "cacheopt"
    wants_progress_events = True

    def __init__(self, predictor: OutputLengthPredictor, config: CacheOptConfig = CacheOptConfig(),
                 costs: LatencyModel | None = None, *, name: str | None = None):
        super().__init__(config, costs, name=name)
        self.predictor = predictor
        self.confidence = config.confidence
        self.reserve_fraction = config.reserve_fraction if config.reserve else 0.0

    def bind(self, scheduler) -> None:
        super().bind(scheduler)
        self.projection = PeakProjection(slack_tokens=self.block_size - 1)

    def set_confidence(self, confidence: float) -> None:
        """The global scheduler's knob: new arrivals are bounded at this confidence."""
        check_confidence(confidence)
        self.confidence = confidence

    # --- 1. prediction ---------------------------------------------------------------------

    def on_arrival(self, request: Request) -> None:
        prediction = self.predictor.predict(request, self.confidence)
        request.predicted_output_tokens = prediction.point_tokens
        padded = self.config.padding
        request.bound_output_tokens = prediction.bound_tokens if padded else prediction.point_tokens
        request.bound_at_admission_tokens = request.bound_output_tokens

    def _extend_bound(self, request: Request) -> None:
        request.bound_output_tokens = self.predictor.conditional_bound(
            request, request.num_output_tokens, self.confidence)
        self.s.counters["bound_extended"] += 1

    # --- 2. admission against the projected peak ---------------------------------------------

    def _entry(self, request: Request) -> tuple[int, int]:
        """(last step, offset) in the projection's terms: after the step being planned it
        holds its tokens so far, one more per step until its bound (projection.py). Blocks
        charged to another holder of a shared prefix are that holder's (kv_blocks.py)."""
        now = self.s.step_index
        remaining = max(request.bound_output_tokens - request.num_output_tokens, 1)
        return now + remaining - 1, request.num_tokens - request.num_shared_blocks * self.block_size - now

    def _fits_projection(self, entry: tuple[int, int]) -> bool:
        """The projected peak, in blocks, stays below the replica's blocks less the reserve.
        With nobody running the newcomer is admitted whatever its bound: refusing it would
        leave it waiting on an idle replica until it is shed."""
        if not self.projection:
            return True
        peak_blocks = self.projection.peak_with(*entry) // self.block_size
        return peak_blocks <= self.ledger.total_blocks - self.ledger.reserve_target

    def begin_admission(self) -> None:
        super().begin_admission()
        # Requests still running past their predicted last step outlived their bound.
        requests = self.s.requests
        for rid in self.projection.expired(self.s.step_index):
            request = requests[rid]
            self._extend_bound(request)
            self.projection.set(rid, *self._entry(request))

    def admission_hopeless(self, request: Request, max_shared_blocks: int) -> bool:
        """The projected peak does not fit even with the largest possible hit, and neither a
        critical admission nor a bound extension (try_admit's side effect) is due."""
        if request.num_output_tokens >= request.bound_output_tokens or self._is_critical(request):
            return False
        finish, offset = self._entry(request)
        return not self._fits_projection((finish, offset - (max_shared_blocks - request.num_shared_blocks) * self.block_size))

    def try_admit(self, request: Request, num_new_tokens: int) -> bool:
        rid = request.request_id
        need = max(self._blocks_after(request, num_new_tokens), request.swapped_blocks)
        if request.num_output_tokens >= request.bound_output_tokens:
            self._extend_bound(request)
        entry = self._entry(request)
        if self._fits_projection(entry) and self.ledger.try_reserve(rid, need) is not None:
            self.s.counters["admit"] += 1
        elif self._is_critical(request) and self._admit_critical(request, need):
            self.s.counters["critical_admit"] += 1
        else:
            return False
        self.ledger.try_hold(rid, need)
        self.projection.set(rid, *entry)
        return True

    def try_grow(self, request: Request, held_blocks: int) -> bool:
        """On demand: from free blocks, then the reserve; failing that, the projection
        was wrong and someone is preempted (the scheduler asks choose_victim)."""
        missing = held_blocks - self.ledger.shares[request.request_id].room
        if missing > 0:
            drawn = self.ledger.try_top_up(request.request_id, missing, use_reserve=self.config.reserve)
            if drawn is None:
                return False
            self.s.counters["reserve_draw_blocks"] += drawn
        return self.ledger.try_hold(request.request_id, held_blocks)

    def on_leave(self, request: Request) -> None:
        self.projection.discard(request.request_id)

    def on_charge_inherited(self, request: Request) -> None:
        if request.request_id in self.projection:
            self.projection.set(request.request_id, *self._entry(request))

    def on_no_token(self, request: Request) -> None:
        # Its last step moves one step later (the scheduler has already counted this step).
        if request.request_id in self.projection:
            self.projection.set(request.request_id, *self._entry(request))

    # --- 5. swap or recompute ---------------------------------------------------------------

    def preemption_mode(self, victim: Request) -> str:
        if not (self.config.swap_or_recompute and self.s.can_swap and self.costs):
            return RECOMPUTE
        tokens = victim.num_computed_tokens
        swap_s = self.costs.swap_time_s(tokens, self.block_size)
        recompute_s = self.costs.prefill_time_s(tokens)
        room = self.ledger.host_swap_total - self.ledger.host_swap_used
        if swap_s < recompute_s and blocks_for(tokens, self.block_size) <= room:
            return SWAP
        return RECOMPUTE
