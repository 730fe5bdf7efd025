"""CacheOPT's literal mechanisms 2 and 3 (the paper's design), kept for the ablation.

2. Reserve prompt + U_p at admission; if the free pool cannot, embed the request in a
   running host whose idle reservation covers it for its whole predicted life.
3. Top a reservation up k iterations before it runs out, from free blocks, then from the
   global reserve; the reserve serves only top-ups and critical requests.

Everything else (prediction, the SLO queue, critical admission, shedding, victims, swap or
recompute) is CacheOptPolicy's. Measured against the projected-peak design in
docs/RESULTS.md: a reservation locks blocks that a request fills only much later.
"""

from __future__ import annotations

from replicas.policies.cacheopt import CacheOptPolicy
from replicas.request import Request


class LockedCacheOptPolicy(CacheOptPolicy):
    name = "cacheopt-locked"
    wants_progress_events = False  # nothing is ever projected (the inherited projection stays empty)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lookahead_tokens = self.config.topup_lookahead_iters if self.config.topup else 0

    def admission_hopeless(self, request: Request, max_shared_blocks: int) -> bool:
        return False  # reservations, embedding and a refusal memo of its own: always the full path

    def _target_blocks(self, request: Request) -> int:
        return self._own_blocks(request, request.prompt_tokens + request.bound_output_tokens)

    def begin_admission(self) -> None:
        super().begin_admission()
        # Admissions only shrink what is free or idle, so within one step a reservation
        # that was refused once makes every larger one refused too (bounded scan cost),
        # until a critical preemption gives blocks back (_on_blocks_freed).
        self._refused_target: int | None = None
        self._max_idle = max((s.idle for s in self.ledger.shares.values() if s.host is None), default=0)

    def _on_blocks_freed(self) -> None:
        self._refused_target = None
        self._max_idle = max((s.idle for s in self.ledger.shares.values() if s.host is None), default=0)

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
            future_held = max(share.held, self._own_blocks(host, host_end))
            spare = share.room - future_held
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
        room = self.ledger.shares[request.request_id].room
        soon = self._own_blocks(request, tokens_after_step + self.lookahead_tokens)
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
        missing = held_blocks - self.ledger.shares[request.request_id].room
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
        the guest moving to free blocks): preempt the guest that can best afford it. The
        guest's scheduled tokens go back to the step's budget (scheduler.preempt)."""
        guests = self.ledger.shares[host.request_id].guests
        if not guests:
            return False
        guest = min((self.s.requests[g] for g in guests), key=self._victim_key)
        self.s.preempt(guest, self.preemption_mode(guest))
        self.s.counters["guest_evict"] += 1
        return True
