"""`edf`: CacheOPT's SLO-aware queue, step budget and victim order with vLLM's KV handling.

Everything of CacheOPT that is not KV management (DESIGN section 4, mechanism 4, and the
step budget): waiting requests ordered by deadline with preempted ones first and late ones
behind on-time ones; a request that has not started after a bounded wait is shed (an error
the client can retry, never an unbounded wait); victims chosen lexicographically; each
step's token budget sized to the tightest running TBT SLO; and, when switched on
(`critical_admission`, off by default), a critical request (about to miss its TTFT) gets a
minimum allocation and may preempt a looser one. KV as vLLM does it: admit
when the whole sequence fits, allocate on demand, recompute. It isolates what the KV
mechanisms add: CacheOPT (policies/cacheopt.py, a subclass) must beat it.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections.abc import Iterable, Iterator

from replicas.config import CacheOptConfig
from replicas.latency import LatencyModel
from replicas.plan import blocks_for
from replicas.policies.base import Policy
from replicas.request import Request, Status


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


class EdfPolicy(Policy):
    name = "edf"
    head_of_line_blocking = False
    admission_scan_limit = 32

    def __init__(self, config: CacheOptConfig = CacheOptConfig(), costs: LatencyModel | None = None, *,
                 name: str | None = None):
        self.config = config
        self.costs = costs
        self.recent_iters_window = config.recent_iters_window
        self.queue_key = queue_key if config.slo_preemption else None
        self._shed_heap: list[tuple[float, int, Request]] = []
        self._shed_seq = itertools.count()
        if name:
            self.name = name

    def on_arrival(self, request: Request) -> None:
        # No prediction: the victim order's "predicted remaining" is up to max_tokens.
        request.bound_output_tokens = request.bound_at_admission_tokens = request.max_tokens

    # --- the queue ---------------------------------------------------------------------------

    def begin_admission(self) -> None:
        self._preempted_for_critical = False  # at most one such preemption per step

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

    def on_enqueue(self, request: Request) -> None:
        if self.config.shedding and request.first_token_s is None:
            give_up_s = request.arrival_s + self.config.shed_wait_ttft_multiple * request.slo.ttft_s
            heapq.heappush(self._shed_heap, (give_up_s, next(self._shed_seq), request))

    def requests_to_shed(self, now_s: float) -> list[Request]:
        """Requests that have waited `shed_wait_ttft_multiple` times their TTFT SLO without
        starting. Demoting late requests keeps overload from making everyone late; this
        bound keeps the demoted from waiting forever. A request admitted in time drops
        out of the heap when its turn comes; preempted before its first token, it is
        pushed again with the same give-up time."""
        heap, shed = self._shed_heap, []
        requests = self.s.requests
        while heap and heap[0][0] <= now_s:
            request = heapq.heappop(heap)[2]
            if (request.status in (Status.WAITING, Status.PREEMPTED) and request.first_token_s is None
                    and requests.get(request.request_id) is request and request not in shed):
                shed.append(request)
        return shed

    def step_token_budget(self) -> int:
        """The largest budget whose step fits `step_tbt_fraction` of the tightest running
        TBT SLO (Sarathi-Serve's budget, following the SLOs), never below one token per
        running request so that every decode still advances."""
        ceiling = self.s.config.max_num_batched_tokens
        running = self.s.running
        if not (self.config.slo_token_budget and self.costs and running):
            return ceiling
        target_s = self.config.step_tbt_fraction * min(r.slo.tbt_s for r in running)
        num_requests = len(running)
        context = self.ledger.held_total * self.block_size
        time_s = self.costs.iteration_time_s
        low, high = min(num_requests, ceiling), ceiling
        if low >= high or time_s(high, num_requests, context + high) <= target_s:
            return high
        while high - low > 16:
            mid = (low + high) // 2
            if time_s(mid, num_requests, context + mid) <= target_s:
                low = mid
            else:
                high = mid
        return low

    # --- admission -----------------------------------------------------------------------------

    def try_admit(self, request: Request, num_new_tokens: int) -> bool:
        """vLLM's gate (the whole sequence fits the free blocks), or a critical admission."""
        if super().try_admit(request, num_new_tokens):
            return True
        need = max(self._blocks_after(request, num_new_tokens), request.swapped_blocks)
        if self._is_critical(request) and self._admit_critical(request, need):
            self.s.counters["critical_admit"] += 1
            self.ledger.try_hold(request.request_id, need)
            return True
        return False

    def admission_hopeless(self, request: Request, max_shared_blocks: int) -> bool:
        """vLLM's gate refuses even the largest possible hit, and no critical admission."""
        best = max(blocks_for(request.num_tokens, self.block_size) - max_shared_blocks, 0)
        return best > self.ledger.free and not self._is_critical(request)

    def _is_critical(self, request: Request) -> bool:
        """Slack below the largest recent iteration time, but not yet negative: a deadline
        that has already passed cannot be saved, and spending others' progress on it
        only spreads the miss (the domino effect of earliest-deadline-first in overload)."""
        if not (self.config.slo_preemption and self.config.critical_admission):
            return False
        slack = deadline_s(request) - self.s.now_s
        return 0.0 <= slack < self.s.max_recent_iteration_s

    def _admit_critical(self, request: Request, need: int) -> bool:
        """Minimum allocation: what it must hold now plus B blocks, from free blocks, the
        reserve, and then by preempting one request per step with a strictly looser TBT
        SLO that has not been preempted before (bounded churn). Never a guest (its blocks
        would return to its host, not to the free pool), a request admitted this step, nor
        one holding blocks of the newcomer's prefix hit (they would not come free)."""
        minimum = max(need, self._own_blocks(request, request.num_tokens) + self.config.critical_extra_blocks)
        rid = request.request_id
        shares = self.ledger.shares
        while True:
            drawn = self.ledger.try_reserve(rid, minimum, use_reserve=self.config.reserve)
            if drawn is not None:
                self.s.counters["reserve_draw_blocks"] += drawn
                return True
            if self._preempted_for_critical:
                return False
            plan = self.s._plan
            admitted = plan.admitted if plan is not None else ()
            looser = [r for r in self.s.running if r.slo.tbt_s > request.slo.tbt_s
                      and r.num_preemptions == 0 and not self._protected(r)
                      and shares[r.request_id].host is None and r not in admitted
                      and not self.s.holds_admission_hits(r)]
            if not looser:
                return False
            victim = min(looser, key=self._victim_key)
            self.s.preempt(victim, self.preemption_mode(victim))
            self.s.counters["critical_preempt"] += 1
            self._preempted_for_critical = True
            self._on_blocks_freed()

    def _on_blocks_freed(self) -> None:
        """A critical preemption gave blocks back in the middle of an admission scan."""

    # --- victims -------------------------------------------------------------------------------

    def _protected(self, request: Request) -> bool:
        return self.s.step_index - request.resumed_step < self.config.protect_steps

    def _victim_key(self, r: Request) -> tuple[float, int, int]:
        """Loosest TBT SLO first, then longest predicted remaining time, then the cheapest
        to preempt (fewest blocks held)."""
        held = self.ledger.shares[r.request_id].held
        remaining = r.bound_output_tokens - r.num_output_tokens + r.num_tokens - r.num_computed_tokens
        return (-r.slo.tbt_s, -remaining, held)

    def choose_victim(self, requester: Request) -> Request:
        """By the victim key among unprotected running requests (the requester always
        qualifies). A guest qualifies only when its host is the requester: anyone else's
        guest frees nothing the requester can use."""
        if not self.config.slo_preemption:
            return super().choose_victim(requester)
        shares = self.ledger.shares
        rid = requester.request_id
        candidates = [r for r in self.s.running
                      if r is requester or (not self._protected(r) and shares[r.request_id].host in (None, rid))]
        return min(candidates, key=self._victim_key)
