"""The policy protocol, with vLLM V1's behaviour as the default of every hook.

vLLM V1 (v0.32 `Scheduler.schedule`): running requests first, in admission order; a running
request that cannot get its next block preempts the most recently admitted one (possibly
itself) and recomputes it; waiting requests are admitted first-come first-served while
their whole sequence fits (only the next chunk is allocated), stopping at the first that
does not; nothing is admitted in a step that preempted. Subclasses override only the
decisions they change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from replicas.plan import RECOMPUTE, StepPlan, blocks_for
from replicas.request import Request

if TYPE_CHECKING:
    from replicas.scheduler import ReplicaScheduler


class Policy:
    name = "vllm"
    head_of_line_blocking = True  # stop admitting at the first waiting request that does not fit
    admits_after_preemption = False
    lookahead_tokens = 0  # > 0: the scheduler calls top_up_ahead this many tokens early
    recent_iters_window = 64
    reserve_fraction = 0.0  # share of the replica's blocks held back as the global reserve
    # True: the scheduler calls on_no_token for every running request that got no token in a step.
    wants_progress_events = False

    def bind(self, scheduler: ReplicaScheduler) -> None:
        self.s = scheduler
        self.ledger = scheduler.ledger
        self.block_size = scheduler.config.block_size

    # --- arrival and admission -------------------------------------------------------------

    def on_arrival(self, request: Request) -> None:
        """Called once when a request arrives (predictions are made here)."""

    def on_enqueue(self, request: Request) -> None:
        """Called whenever a request enters the waiting queue (arrival or preemption)."""

    # Waiting-queue order: None is FCFS with preempted requests in front; otherwise a
    # key function of the request whose value must not change while it waits.
    queue_key: Callable[[Request], Any] | None = None  # any sortable value, e.g. a tuple
    admission_scan_limit = 1

    def requests_to_shed(self, now_s: float) -> list[Request]:
        """Waiting requests to refuse now (vLLM: none; a request may wait forever)."""
        return []

    def step_token_budget(self) -> int:
        """Tokens this step may compute (vLLM: max_num_batched_tokens, whatever the SLOs)."""
        return self.s.config.max_num_batched_tokens

    def begin_admission(self) -> None:
        """Called before a step offers admission to waiting requests."""

    def admission_order(self, waiting: list[Request]) -> Iterable[Request]:
        """The order in which this step offers admission: the queue's own order. Must not
        copy the queue (it can be long); the scheduler dequeues admitted requests after."""
        return iter(waiting)

    def admission_hopeless(self, request: Request, max_shared_blocks: int) -> bool:
        """True only if `try_admit` would refuse `request` even if its prefix hit were as
        large as it can be (`max_shared_blocks` of its blocks held by others), and would
        change nothing on the way: the scheduler then skips its prefix lookup, which costs
        more than the refusal on a long queue. Must never refuse what try_admit would
        admit. vLLM's gate (the default) always looks up, as vLLM does."""
        return False

    def try_admit(self, request: Request, num_new_tokens: int) -> bool:
        """Give `request` a share covering its next `num_new_tokens`, or change nothing.

        Like vLLM 0.32 with its default `scheduler_reserve_full_isl=True`: admit only if the
        whole sequence so far fits in the free blocks, though only the next chunk is
        allocated (`allocate_slots(..., full_sequence_must_fit=True)`); a prefix hit on
        blocks somebody holds costs nothing, as in vLLM's count."""
        if self._own_blocks(request, request.num_tokens) > self.ledger.free:
            return False
        blocks = self._blocks_after(request, num_new_tokens)
        return self._admit_reserving(request, held_blocks=blocks, reserved_blocks=blocks)

    # --- running requests ----------------------------------------------------------------

    def try_grow(self, request: Request, held_blocks: int) -> bool:
        """Let a running request hold `held_blocks`; on-demand from the free pool."""
        missing = held_blocks - self.ledger.shares[request.request_id].room
        if missing > 0 and self.ledger.try_top_up(request.request_id, missing, use_reserve=False) is None:
            return False
        return self.ledger.try_hold(request.request_id, held_blocks)

    def top_up_ahead(self, request: Request, tokens_after_step: int) -> None:
        """Proactive allocation; only called when lookahead_tokens > 0."""

    def choose_victim(self, requester: Request) -> Request:
        """Whom to preempt so that `requester` can grow (may be the requester itself)."""
        return self.s.running[-1]

    def preemption_mode(self, victim: Request) -> str:
        return RECOMPUTE

    def on_leave(self, request: Request) -> None:
        """A running request gave its blocks back: finished, preempted or aborted."""

    def on_charge_inherited(self, request: Request) -> None:
        """Blocks of a shared prefix that another holder was charged for are now this
        running request's (that holder left; replicas/kv_blocks.py)."""

    def on_no_token(self, request: Request) -> None:
        """A running request got no token this step (a prefill chunk, or no budget left);
        only called when `wants_progress_events`."""

    def after_step(self, plan: StepPlan) -> None:
        """Called after every step's progress is applied."""

    # --- helpers --------------------------------------------------------------------------

    def _admit_reserving(self, request: Request, *, held_blocks: int, reserved_blocks: int) -> bool:
        """Promise `reserved_blocks` from the free pool and hold `held_blocks` of them."""
        if self.ledger.try_reserve(request.request_id, reserved_blocks) is None:
            return False
        self.ledger.try_hold(request.request_id, held_blocks)
        self.s.counters["admit"] += 1
        return True

    def _blocks_after(self, request: Request, num_new_tokens: int) -> int:
        return self._own_blocks(request, request.num_computed_tokens + num_new_tokens)

    def _own_blocks(self, request: Request, num_tokens: int) -> int:
        """Blocks charged to `request` when it holds `num_tokens` tokens: under prefix
        caching, blocks of its table charged to another holder cost it nothing
        (replicas/kv_blocks.py)."""
        return max(blocks_for(num_tokens, self.block_size) - request.num_shared_blocks, 0)
