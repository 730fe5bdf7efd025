"""CacheOPT (arXiv 2503.13773): the five mechanisms of DESIGN section 4.

1. Predict each request's output with a bound U_p at confidence p (p retuned from outside).
2. Reserve prompt + U_p at admission; if the free pool cannot, embed the request in a
   running host whose idle reservation covers it for its whole predicted life.
3. Top a reservation up k iterations before it runs out, from free blocks, then from the
   global reserve; the reserve serves only top-ups and critical requests.
4. Queue by SLO slack; a critical request (slack below the largest recent iteration time)
   gets a minimum allocation and may preempt requests with looser TBT SLOs. Victims are
   chosen lexicographically, and a just-resumed request is protected from re-preemption.
5. Preempt by swapping or recomputing, whichever the cost model says is faster.

Chunked prefill runs under a token budget sized so that a step stays within a share of the
tightest TBT SLO among running requests (as Sarathi-Serve does), instead of vLLM's fixed
budget, whose large prefill chunks stall every decode in the batch.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Iterator
from typing import Protocol

from predictor.base import OutputLengthPredictor, check_confidence
from replicas.config import CacheOptConfig
from replicas.policies.base import Policy
from replicas.request import Request
from replicas.scheduler import RECOMPUTE, SWAP, blocks_for


class CostModel(Protocol):
    """The engine's latency model, as far as the policy needs it."""

    def iteration_time_s(self, num_new_tokens: int, num_requests: int, num_context_tokens: int) -> float: ...

    def prefill_time_s(self, num_tokens: int) -> float: ...

    def swap_time_s(self, num_tokens: int, block_size: int) -> float: ...


def deadline_s(request: Request) -> float:
    """When the request's slack runs out: TTFT deadline before its first token, TBT after."""
    if request.last_token_s is None:
        return request.arrival_s + request.slo.ttft_s
    return request.last_token_s + request.slo.tbt_s


STARTED, NEW = 0, 1


def queue_key(request: Request) -> tuple[int, float]:
    """Preempted requests (their users are already reading a stalled stream) before new
    ones; each group by deadline. Both parts are fixed while the request waits."""
    return (STARTED if request.last_token_s is not None else NEW, deadline_s(request))


def _slices(items: list, *bounds: tuple[int, int | None]) -> Iterator:
    """items[a:b] for each (a, b) in turn (b None: to the end), lazily and without copying.
    The list only grows while this runs (preempted victims are queued), so an index may
    shift by a few places but stays in range; the scheduler skips repeats."""
    for start, stop in bounds:
        for i in range(start, len(items) if stop is None else min(stop, len(items))):
            yield items[i]


class CacheOptPolicy(Policy):
    name = "cacheopt"
    head_of_line_blocking = False
    admission_scan_limit = 32

    def __init__(self, predictor: OutputLengthPredictor, config: CacheOptConfig = CacheOptConfig(),
                 costs: CostModel | None = None, *, name: str | None = None):
        self.predictor = predictor
        self.config = config
        self.costs = costs
        self.confidence = config.confidence
        self.lookahead_tokens = config.topup_lookahead_iters if config.topup else 0
        self.recent_iters_window = config.recent_iters_window
        self.queue_key = queue_key if config.slo_preemption else None
        self.reserve_fraction = config.reserve_fraction if config.reserve else 0.0
        if name:
            self.name = name

    def begin_admission(self) -> None:
        self._preempted_for_critical = False  # at most one such preemption per step
        # Admissions only shrink what is free or idle, so within one step a reservation
        # that was refused once makes every larger one refused too (bounded scan cost).
        self._refused_target = None
        self._max_idle = max((s.idle for s in self.ledger.shares.values() if s.host is None), default=0)

    def admission_order(self, waiting: list[Request]) -> Iterable[Request]:
        """Preempted requests first, then new requests that can still make their TTFT
        deadline (earliest first), then the late ones: plain EDF serves the already-late
        first in overload and makes everyone late (the domino effect). The queue is
        sorted by (group, deadline), so this is a reordering of three slices."""
        if self.queue_key is None:
            return iter(waiting)
        first_new = bisect.bisect_left(waiting, (NEW, -math.inf), key=self.queue_key)
        first_on_time = bisect.bisect_right(waiting, (NEW, self.s.now_s), key=self.queue_key)
        return _slices(waiting, (0, first_new), (first_on_time, None), (first_new, first_on_time))

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

    def _target_blocks(self, request: Request) -> int:
        return blocks_for(request.prompt_tokens + request.bound_output_tokens, self.block_size)

    # --- chunked prefill under an SLO-derived token budget ------------------------------------

    def step_token_budget(self) -> int:
        ceiling = self.s.config.max_num_batched_tokens
        running = self.s.running
        if not (self.config.slo_token_budget and self.costs and running):
            return ceiling
        target_s = self.config.step_tbt_fraction * min(r.slo.tbt_s for r in running)
        num_requests = len(running)
        context = self.ledger.held_total * self.block_size
        time_s = self.costs.iteration_time_s
        # Largest budget whose step fits the target, by bisection; never below one token
        # per running request, so every decode still advances.
        low, high = num_requests, ceiling
        if low >= high or time_s(high, num_requests, context + high) <= target_s:
            return max(low, high)
        while high - low > 16:
            mid = (low + high) // 2
            if time_s(mid, num_requests, context + mid) <= target_s:
                low = mid
            else:
                high = mid
        return low

    # --- 2. reservation and reuse ----------------------------------------------------------

    def try_admit(self, request: Request, num_new_tokens: int) -> bool:
        rid = request.request_id
        need = max(self._blocks_after(request, num_new_tokens), request.swapped_blocks)
        if request.num_output_tokens >= request.bound_output_tokens:
            self._extend_bound(request)
        target = max(need, self._target_blocks(request))
        counters = self.s.counters
        hopeless = self._refused_target is not None and target >= self._refused_target
        if not hopeless and self.ledger.try_reserve(rid, target) is not None:
            counters["admit"] += 1
        elif not hopeless and self.config.reuse and self._try_embed(request, target):
            counters["embed"] += 1
        elif self._is_critical(request) and self._admit_critical(request, need):
            counters["critical_admit"] += 1
        else:
            if not hopeless:
                self._refused_target = target
            return False
        self.ledger.try_hold(rid, need)
        return True

    def _try_embed(self, request: Request, target: int) -> bool:
        """Best fit among hosts whose idle reservation covers the guest's whole predicted
        life: after the host grows for as long as the guest runs (capped at the host's own
        bound), at least `embed_margin_blocks` must remain."""
        margin = self.config.embed_margin_blocks
        if target + margin > self._max_idle:
            return False  # spare <= idle for every host
        guest_life = request.bound_output_tokens - request.num_output_tokens
        shares = self.ledger.shares
        best_host, best_spare = None, None
        for host in self.s.running:
            share = shares[host.request_id]
            if share.host is not None:
                continue
            host_end = min(host.num_tokens + guest_life, host.prompt_tokens + host.bound_output_tokens)
            future_held = max(share.held, blocks_for(host_end, self.block_size))
            spare = share.reserved - share.lent - future_held
            if spare - target >= margin and (best_spare is None or spare < best_spare):
                best_host, best_spare = host, spare
        if best_host is None:
            return False
        self.ledger.try_embed(request.request_id, best_host.request_id, target)
        return True

    # --- 3. proactive top-up from free blocks, then the reserve -----------------------------

    def top_up_ahead(self, request: Request, tokens_after_step: int) -> None:
        if request.bound_output_tokens - request.num_output_tokens < self.lookahead_tokens:
            self._extend_bound(request)
        share = self.ledger.shares[request.request_id]
        room = share.reserved - share.lent
        soon = blocks_for(tokens_after_step + self.lookahead_tokens, self.block_size)
        for want in (max(soon, self._target_blocks(request)) - room, soon - room):
            if want <= 0:
                return
            drawn = self.ledger.try_top_up(request.request_id, want, use_reserve=self.config.reserve)
            if drawn is not None:
                self.s.counters["topup"] += 1
                self.s.counters["reserve_draw_blocks"] += drawn
                return

    def try_grow(self, request: Request, held_blocks: int) -> bool:
        """The reactive path: the reservation ran out (top-up off, or it failed)."""
        share = self.ledger.shares[request.request_id]
        missing = held_blocks - (share.reserved - share.lent)
        if missing > 0:
            if request.num_output_tokens >= request.bound_output_tokens:
                self._extend_bound(request)
            use_reserve = self.config.reserve and self.config.topup
            drawn = self.ledger.try_top_up(request.request_id, missing, use_reserve=use_reserve)
            if drawn is None:
                return self._evict_guest(request) and self.try_grow(request, held_blocks)
            self.s.counters["reserve_draw_blocks"] += drawn
        return self.ledger.try_hold(request.request_id, held_blocks)

    def _evict_guest(self, host: Request) -> bool:
        """The host needs its blocks back and the free pool could not cover it (which is
        the guest moving to free blocks): preempt the guest that can best afford it."""
        guests = self.ledger.shares[host.request_id].guests
        if not guests:
            return False
        guest = min((self.s.requests[g] for g in guests), key=self._victim_key)
        self.s.preempt(guest, self.preemption_mode(guest))
        self.s.counters["guest_evict"] += 1
        return True

    # --- 4. SLO-aware admission and preemption ----------------------------------------------

    def _is_critical(self, request: Request) -> bool:
        """Slack below the largest recent iteration time, but not yet negative: a deadline
        that has already passed cannot be saved, and spending others' progress on it
        only spreads the miss (the domino effect of earliest-deadline-first in overload)."""
        if not self.config.slo_preemption:
            return False
        slack = deadline_s(request) - self.s.now_s
        return 0.0 <= slack < self.s.max_recent_iteration_s

    def _admit_critical(self, request: Request, need: int) -> bool:
        """Minimum allocation: what it must hold now plus B blocks, from free blocks, the
        reserve, and then by preempting one request per step with a strictly looser TBT
        SLO that has not been preempted before (bounded churn)."""
        minimum = max(need, blocks_for(request.num_tokens, self.block_size) + self.config.critical_extra_blocks)
        rid = request.request_id
        while True:
            drawn = self.ledger.try_reserve(rid, minimum, use_reserve=self.config.reserve)
            if drawn is not None:
                self.s.counters["reserve_draw_blocks"] += drawn
                return True
            if self._preempted_for_critical:
                return False
            looser = [r for r in self.s.running if r.slo.tbt_s > request.slo.tbt_s
                      and r.num_preemptions == 0 and not self._protected(r)]
            if not looser:
                return False
            victim = min(looser, key=self._victim_key)
            self.s.preempt(victim, self.preemption_mode(victim))
            self.s.counters["critical_preempt"] += 1
            self._preempted_for_critical = True

    def _protected(self, request: Request) -> bool:
        return self.s.step_index - request.resumed_step < self.config.protect_steps

    def _victim_key(self, r: Request) -> tuple[float, int, int]:
        """Loosest TBT SLO first, then longest predicted remaining time, then the cheapest
        to preempt (fewest blocks held)."""
        held = self.ledger.shares[r.request_id].held
        remaining = r.bound_output_tokens - r.num_output_tokens + r.num_tokens - r.num_computed_tokens
        return (-r.slo.tbt_s, -remaining, held)

    def choose_victim(self, requester: Request) -> Request:
        if not self.config.slo_preemption:
            return super().choose_victim(requester)
        candidates = [r for r in self.s.running if r is requester or not self._protected(r)]
        return min(candidates, key=self._victim_key)

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
