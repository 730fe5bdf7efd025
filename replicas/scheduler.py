"""The replica scheduler: one engine step at a time, decisions delegated to a policy.

The scheduler owns the mechanics every policy shares (the token budget, chunked prefill,
growing allocations as tokens are computed, preempting, finishing); the policy owns the
decisions (whom to admit with how much, how a running request gets more blocks, whom to
preempt, swap or recompute). The same objects run inside the simulator and, through the
vLLM adapter, inside a real engine.

With a physical block pool (`pool`, replicas/kv_blocks.py) the scheduler also places the
blocks as it plans, in the order it plans: a waiting request without computed tokens
looks its prefix up first (a hit counts as computed, and blocks somebody holds are not
charged to it), and every allocation and release goes to the pool at once, so that a
later admission in the same step sees the blocks an earlier one cached or freed. The
ledger then counts charged blocks, and `check_blocks` holds it to the pool's tables.
Without a pool (the simulator with prefix caching off) blocks are counted only.

With `async_steps` the engine plans step N+1 while step N runs, as vLLM's AsyncScheduler
does: a step's tokens count as computed when it is planned, a token being sampled is a
placeholder (`Request.num_output_placeholders`) until its step is done, a request whose
last token is in flight is not scheduled again, and a step's verdicts arrive for requests
that may have finished, been aborted or been preempted since (a preempted one still gets
its token, as vLLM delivers it).
"""

from __future__ import annotations

import bisect
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from replicas.config import SchedulerConfig
from replicas.kv_blocks import BlockPool, BlockTables
from replicas.ledger import KVLedger
from replicas.plan import SWAP, StepPlan, blocks_for
from replicas.request import Request, Status

if TYPE_CHECKING:
    from replicas.policies.base import Policy


class ReplicaScheduler:
    def __init__(self, config: SchedulerConfig, policy: Policy, ledger: KVLedger, *, can_swap: bool = False,
                 pool: BlockPool | None = None, async_steps: bool = False):
        self.config = config
        self.policy = policy
        self.ledger = ledger
        self.can_swap = can_swap
        self.pool = pool
        self.tables = BlockTables() if pool is not None else None
        self.async_steps = async_steps
        self._admission_hits: Sequence[int] = ()  # the prefix hits of the request offered admission
        self.waiting: list[Request] = []  # new and preempted requests, in the policy's queue order
        self.running: list[Request] = []  # in admission order
        self.requests: dict[str, Request] = {}
        self.counters: Counter[str] = Counter()
        self.step_index = 0
        self.now_s = 0.0
        self.recent_iteration_s: deque[float] = deque(maxlen=policy.recent_iters_window)
        self.max_recent_iteration_s = 0.0
        self._plan: StepPlan | None = None
        policy.bind(self)

    # --- requests in and out ---------------------------------------------------------

    def add_request(self, request: Request, now_s: float) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.requests[request.request_id] = request
        self.now_s = max(self.now_s, now_s)
        self.policy.on_arrival(request)
        self._enqueue(request)

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is and free its blocks and reservation."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        if request.status is Status.RUNNING:
            self._release(request)
            self.running.remove(request)
        else:
            self._dequeue(request)
            if request.swapped_blocks:
                self.ledger.unpark(request.swapped_blocks)
                request.swapped_blocks = 0
        request.status = Status.FINISHED
        self.counters["abort"] += 1
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # --- one step ------------------------------------------------------------------------

    def schedule(self, now_s: float) -> StepPlan:
        self.now_s = now_s
        plan = StepPlan(self.step_index)
        self._plan = plan
        policy = self.policy
        if self.waiting:
            self._shed(plan, policy.requests_to_shed(now_s))
        budget = policy.step_token_budget()
        block_size = self.config.block_size
        shares = self.ledger.shares
        lookahead = policy.lookahead_tokens
        running = self.running

        i = 0
        while i < len(running) and budget > 0:
            request = running[i]
            if request.num_output_placeholders and self._last_token_in_flight(request):
                i += 1
                continue
            n = request.num_tokens + request.num_output_placeholders - request.num_computed_tokens
            if n > budget:
                n = budget
            end = request.num_computed_tokens + n
            share = shares[request.request_id]
            if lookahead and share.room * block_size < end + lookahead:
                policy.top_up_ahead(request, end)
            need = -(-end // block_size) - request.num_shared_blocks
            if need > share.held and not self.ledger.try_hold(request.request_id, need):
                num_preempted = len(plan.preempted)
                while not policy.try_grow(request, need):
                    victim = policy.choose_victim(request)
                    self.preempt(victim, policy.preemption_mode(victim))
                    if victim is request:
                        break
                    # The victim may have left it blocks of a shared prefix (charged to it now).
                    need = -(-end // block_size) - request.num_shared_blocks
                budget += plan.refunded_tokens  # victims scheduled earlier in this step give theirs back
                plan.refunded_tokens = 0
                if request.status is not Status.RUNNING:
                    continue  # it preempted itself; running[i] is already the next one
                if len(plan.preempted) > num_preempted:
                    i = running.index(request)  # victims before it shifted it left
            if self.pool is not None:
                self._place(request, n)
            plan.scheduled[request] = n
            budget -= n
            i += 1

        if self.waiting and (policy.admits_after_preemption or not plan.preempted):
            self._admit_waiting(plan, budget)
        self._plan = None
        if self.async_steps:
            for request, n in plan.scheduled.items():
                request.num_computed_tokens += n
                if request.num_computed_tokens >= request.num_tokens + request.num_output_placeholders:
                    request.num_output_placeholders += 1
                    plan.sampling.add(request)
        return plan

    @staticmethod
    def _last_token_in_flight(request: Request) -> bool:
        """A token in flight is its last: another step would be wasted (vLLM's rule)."""
        limit = request.stop_after_tokens or request.max_tokens
        return request.num_computed_tokens + 2 - request.num_output_placeholders >= request.prompt_tokens + limit

    def _shed(self, plan: StepPlan, requests: list[Request]) -> None:
        """Drop waiting requests the policy gave up on: they leave no share and no queue
        entry behind, and the engine answers them with an error."""
        for request in requests:
            self._dequeue(request)
            if request.swapped_blocks:
                self.ledger.unpark(request.swapped_blocks)
                request.swapped_blocks = 0
            request.status = Status.FINISHED
            request.shed_s = self.now_s
            del self.requests[request.request_id]
            plan.shed.append(request)
        self.counters["shed"] += len(requests)

    def _admit_waiting(self, plan: StepPlan, budget: int) -> None:
        """Offer admission in the policy's order. A blocking policy stops at the first
        refusal; the others skip ahead, but look at most `admission_scan_limit` refusals
        deep so that a long queue costs a bounded amount per step."""
        policy = self.policy
        policy.begin_admission()
        num_refused = 0
        admitted = plan.admitted
        for request in policy.admission_order(self.waiting):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if request.status is Status.RUNNING:
                continue  # seen twice: a critical admission queued its victims mid-scan
            if request.status is Status.PREEMPTED and any(v is request for v, _ in plan.preempted):
                continue  # preempted in this very step (vLLM resumes nobody in the step that preempted them)
            # A request the policy refuses whatever its prefix hit is refused without a lookup.
            hopeless = self._looks_up_prefix(request) and policy.admission_hopeless(
                request, (request.num_tokens - 1) // self.config.block_size)
            hits = None if hopeless else self._look_up_prefix(request)
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            accepted = False
            if not hopeless:
                self._admission_hits = hits or ()
                accepted = policy.try_admit(request, n)
                self._admission_hits = ()
            if plan.refunded_tokens:  # a critical admission preempted someone scheduled this step
                budget += plan.refunded_tokens
                plan.refunded_tokens = 0
            if not accepted:
                if hits:
                    request.num_computed_tokens = request.num_shared_blocks = 0
                num_refused += 1
                if policy.head_of_line_blocking or num_refused >= policy.admission_scan_limit:
                    break
                continue
            if request.swapped_blocks:
                plan.swap_in_blocks += request.swapped_blocks
                self.ledger.unpark(request.swapped_blocks)
                request.swapped_blocks = 0
            if request.status is Status.PREEMPTED:
                request.resumed_step = self.step_index
                self.counters["resume"] += 1
            if self.pool is not None:
                self._place(request, n, hits)
                if hits is not None:
                    self.counters["prefix_query_tokens"] += request.num_tokens
                    self.counters["prefix_hit_tokens"] += len(hits) * self.config.block_size
            request.status = Status.RUNNING
            self.running.append(request)
            plan.scheduled[request] = n
            budget -= n
            admitted.append(request)
        for request in admitted:
            self._dequeue(request)

    def _looks_up_prefix(self, request: Request) -> bool:
        """A request without computed tokens (new, or preempted to recompute) starts from
        its longest cached prefix, as in vLLM."""
        return self.pool is not None and not request.num_computed_tokens and not request.swapped_blocks

    def _look_up_prefix(self, request: Request) -> list[int] | None:
        """The hit counts as computed, and the hit blocks somebody holds are not charged to
        the request. None when there was no lookup."""
        if not self._looks_up_prefix(request):
            return None
        assert self.pool is not None and self.tables is not None
        hits = self.pool.lookup(request)
        request.num_computed_tokens = len(hits) * self.config.block_size
        request.num_shared_blocks = self.tables.num_held_by_others(hits)
        return hits

    def holds_admission_hits(self, request: Request) -> bool:
        """Whether running `request` holds a block that the request now offered admission
        hit in the prefix cache: preempting it for the newcomer frees nothing the newcomer
        can use (policies exclude such victims)."""
        if not self._admission_hits or self.tables is None:
            return False
        return not set(self._admission_hits).isdisjoint(self.tables.tables.get(request.request_id, ()))

    def _place(self, request: Request, n: int, hits: list[int] | None = None) -> None:
        """Allocate in the pool what the ledger granted: slots for `n` more tokens."""
        assert self.tables is not None and self.pool is not None
        assert not hits or self.tables.num_held_by_others(hits) == request.num_shared_blocks, (
            f"{request.request_id}: its hit blocks changed holders during its admission")
        self.tables.extend(request.request_id, self.pool.allocate(request, hits or [], n))

    def check_blocks(self) -> None:
        """The ledger's charges are the tables' (raises AssertionError): every running
        request holds the blocks of its tokens, and is charged for those nobody else was."""
        if self.tables is None:
            return
        block_size = self.config.block_size
        for request in self.running:
            rid = request.request_id
            table = self.tables.tables.get(rid, ())
            charged = self.tables.charged.get(rid, 0)
            assert len(table) >= blocks_for(request.num_computed_tokens, block_size), (rid, len(table))
            assert charged == self.ledger.shares[rid].held, (rid, charged, self.ledger.shares[rid].held)
            assert charged == len(table) - request.num_shared_blocks, (rid, charged, len(table), request.num_shared_blocks)
        assert set(self.tables.tables) == {r.request_id for r in self.running}, "tables of requests not running"
        assert self.tables.num_in_use == self.ledger.held_total, (self.tables.num_in_use, self.ledger.held_total)

    def _dequeue(self, request: Request) -> None:
        key = self.policy.queue_key
        if key is None:
            self.waiting.remove(request)  # FCFS admits from the front: a short scan
            return
        i = bisect.bisect_left(self.waiting, key(request), key=key)
        while self.waiting[i] is not request:
            i += 1
        del self.waiting[i]

    def _enqueue(self, request: Request) -> None:
        """Queue order: FCFS with preempted requests in front (vLLM), or by the policy's
        key, which must not change while the request waits."""
        key = self.policy.queue_key
        if key is None:
            if request.status is Status.PREEMPTED:
                self.waiting.insert(0, request)
            else:
                self.waiting.append(request)
        else:
            bisect.insort(self.waiting, request, key=key)
        self.policy.on_enqueue(request)

    def preempt(self, victim: Request, mode: str) -> None:
        """Evict a running request. Tokens it was scheduled for this step go back to the
        step's budget (`plan.refunded_tokens`), whoever asked for the preemption."""
        plan = self._plan
        if plan is not None:
            if victim in plan.admitted:
                raise AssertionError(f"{victim.request_id} was admitted this step; the policy must not evict it")
            plan.refunded_tokens += plan.scheduled.pop(victim, 0)
        self._release(victim, preempted=True)
        self.running.remove(victim)
        if mode == SWAP:
            victim.swapped_blocks = blocks_for(victim.num_computed_tokens, self.config.block_size)
            if not self.ledger.try_park(victim.swapped_blocks):
                raise AssertionError(f"no host swap space for {victim.request_id}: the policy must check")
            victim.num_swaps += 1
            if plan is not None:
                plan.swap_out_blocks += victim.swapped_blocks
        else:
            victim.num_recomputed_tokens += victim.num_computed_tokens - victim.num_output_placeholders
            victim.num_computed_tokens = 0
        victim.num_output_placeholders = 0  # a token in flight is delivered, but not as computed
        victim.status = Status.PREEMPTED
        victim.num_preemptions += 1
        self._enqueue(victim)
        self.counters[f"preempt_{mode}"] += 1
        if plan is not None:
            plan.preempted.append((victim, mode))

    def _release(self, request: Request, *, preempted: bool = False) -> None:
        inherited = None
        if self.pool is not None:
            assert self.tables is not None
            self.pool.free(request, preempted=preempted)
            inherited = self.tables.drop(request.request_id)
            request.num_shared_blocks = 0
        # A host's guests keep their blocks, which become their own (ledger.release).
        self.counters["guest_rehomed"] += len(self.ledger.release(request.request_id, inherited))
        self.policy.on_leave(request)
        if inherited:
            for heir_id, n in inherited.items():
                heir = self.requests[heir_id]
                heir.num_shared_blocks -= n
                self.policy.on_charge_inherited(heir)

    def on_step_done(self, plan: StepPlan, end_s: float, duration_s: float,
                     is_finished: Callable[[Request], bool]) -> list[Request]:
        """Advance progress counters; a request whose step covered all its known tokens
        samples one more. Returns the requests that finished. With async steps, `plan` is
        the oldest step in flight, and its tokens were counted as computed when planned."""
        self.now_s = end_s
        self.step_index += 1
        self.recent_iteration_s.append(duration_s)
        self.max_recent_iteration_s = max(self.recent_iteration_s)
        finished = []
        policy = self.policy
        progress_events = policy.wants_progress_events
        async_steps = self.async_steps
        for request, n in plan.scheduled.items():
            if async_steps:
                if request.status is Status.FINISHED:
                    continue  # finished or aborted while the step ran: vLLM drops its output
                sampled = request in plan.sampling
                if sampled and request.status is Status.RUNNING:
                    request.num_output_placeholders -= 1
            else:
                request.num_computed_tokens += n
                sampled = request.num_computed_tokens >= request.num_tokens
            if not sampled:
                if progress_events and request.status is Status.RUNNING:
                    policy.on_no_token(request)
                continue  # a prefill chunk: no token sampled yet
            request.num_output_tokens += 1
            if request.last_token_s is None:
                request.first_token_s = end_s
            else:
                request.token_gaps_s.append(end_s - request.last_token_s)
            request.last_token_s = end_s
            if is_finished(request):
                was_running = request.status is Status.RUNNING
                request.status = Status.FINISHED
                request.finish_s = end_s
                if was_running:
                    self._release(request)
                else:  # preempted while its last token was in flight (async steps): it holds nothing
                    self._dequeue(request)
                del self.requests[request.request_id]
                finished.append(request)
        if finished:
            self.running = [r for r in self.running if r.status is Status.RUNNING]
        if progress_events and len(plan.scheduled) < len(self.running) + len(finished):
            for request in self.running:
                if request not in plan.scheduled:
                    policy.on_no_token(request)  # the step's budget ran out before it
        policy.after_step(plan)
        return finished


def build_scheduler(policy: Policy, *, total_blocks: int, config: SchedulerConfig = SchedulerConfig(),
                    can_swap: bool = False, host_swap_blocks: int = 0,
                    pool: BlockPool | None = None, async_steps: bool = False) -> ReplicaScheduler:
    """A scheduler over a fresh ledger whose global reserve is sized for the policy."""
    ledger = KVLedger(total_blocks, reserve_blocks=int(total_blocks * policy.reserve_fraction),
                      host_swap_blocks=host_swap_blocks if can_swap else 0)
    return ReplicaScheduler(config, policy, ledger, can_swap=can_swap, pool=pool, async_steps=async_steps)
