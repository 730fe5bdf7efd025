"""The vLLM adapter: vLLM 0.32's V1 scheduler with its decisions taken by our pure policy.

The only module that imports vllm. `CacheOptScheduler` plugs in as `scheduler_cls`
(dotted path `replicas.vllm_adapter.CacheOptScheduler`); settings arrive as
`additional_config={"cacheopt": {...}}` (replicas.engine_settings). Each step:

1. the pure core (`ReplicaScheduler` + policy, the same objects the simulator runs)
   plans the step on its mirror of the requests and its KV ledger, and every placement it
   makes goes to vLLM's KV cache manager at once, in planning order (`_VllmBlockPool`):
   prefix lookups, allocations, preemptions; so an admission sees exactly the cached and
   free blocks vLLM's own `schedule()` would see at that point;
2. the adapter assembles vLLM's SchedulerOutput from the plan (queues, statuses, the
   tail of `Scheduler.schedule`);
3. after the model ran, vLLM appends tokens and finishes requests, and the pure core
   advances its mirror with vLLM's verdict on who finished.

Reservations live in the ledger only: vLLM holds exactly the blocks a request has
computed into, and idle promises stay physically free in vLLM's pool. That is what makes
embedding possible (vLLM cannot move blocks between block tables) and keeps the two books
equal: `vLLM free == ledger.total - ledger.held_total`, where a block several requests
share through the prefix cache is charged to one of them (replicas/kv_blocks.py) and a
cached block nobody holds counts as free, as vLLM counts it.

Prefix caching and async scheduling, vLLM's defaults, stay on: where vLLM schedules
asynchronously the class becomes `AsyncCacheOptScheduler` (vLLM's AsyncScheduler
semantics; the core plans with `async_steps`). V1 cannot swap a chosen victim (its KV
offload connectors are a CUDA-only second cache tier, not a per-victim choice), so the
core is built with `can_swap=False` and every preemption recomputes, with free hits on
whatever of the victim's blocks the prefix cache still holds. docs/vllm-adapter-notes.md
maps the vLLM code this reproduces (the tail of `Scheduler.schedule` is vLLM's,
Apache-2.0, reduced to the features asserted off).

`StepLogScheduler` is vLLM's own scheduler (or AsyncScheduler), untouched except that it
times `schedule()` and logs each step like the adapter does, for side-by-side benchmarks.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from vllm.logger import init_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreEventType, EngineCoreOutput, EngineCoreOutputs, FinishReason
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.request import Request as VllmRequest
from vllm.v1.request import RequestStatus

from replicas.config import SchedulerConfig
from replicas.engine_settings import SHED_STOP_REASON, EngineSettings, RequestHints, apply_control
from replicas.plan import RECOMPUTE, StepPlan
from replicas.request import Request
from replicas.scheduler import build_scheduler
from replicas.snapshot import take_snapshot

logger = init_logger(__name__)
SNAPSHOT_PERIOD_S = 0.02


class AdapterError(RuntimeError):
    """The pure core's books and vLLM's disagree, or vLLM is configured beyond what the adapter supports."""


def _settings_of(vllm_config) -> EngineSettings:
    return EngineSettings.from_mapping((vllm_config.additional_config or {}).get("cacheopt"))


class StepLog:
    """One JSON line per engine step, buffered; flushed when the engine goes idle."""

    def __init__(self, path: str | None):
        self._file = open(path, "a", buffering=1 << 16) if path else None  # noqa: SIM115 (lives with the engine)

    @property
    def enabled(self) -> bool:
        return self._file is not None

    def write(self, row: dict, *, flush: bool) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(row, separators=(",", ":")) + "\n")
        if flush:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _Timed:
    """The step-logging half shared by both schedulers: schedule() time and step shape."""

    def _init_step_log(self, settings: EngineSettings) -> None:
        self._step_log = StepLog(settings.step_log)
        self._step_rows: dict[int, dict] = {}  # by id(SchedulerOutput): with async scheduling two are in flight

    def _open_step_row(self, out: SchedulerOutput, started: float, schedule_s: float) -> None:
        if not self._step_log.enabled:
            return
        num_context = 0
        for rid in out.num_scheduled_tokens:
            num_context += self.requests[rid].num_computed_tokens  # already advanced by this step's tokens
        self._step_rows[id(out)] = {
            "t": started, "schedule_s": schedule_s, "new": out.total_num_scheduled_tokens,
            "reqs": len(out.num_scheduled_tokens), "ctx": num_context,
            "running": len(self.running), "waiting": len(self.waiting),
            "free_blocks": self.kv_cache_manager.block_pool.get_num_free_blocks(),
            "scheduled": out.num_scheduled_tokens,
            "preempted": sorted(out.preempted_req_ids),
            "hits": self._admitted_hits(out),
        }

    def _admitted_hits(self, out: SchedulerOutput) -> dict[str, list[int]]:
        """Per request admitted this step (new or resumed): [tokens it started from (its
        prefix hit), tokens it had], the numbers vLLM's prefix-cache hit rate counts."""
        hits = {r.req_id: [r.num_computed_tokens, self.requests[r.req_id].num_tokens] for r in out.scheduled_new_reqs}
        cached = out.scheduled_cached_reqs
        if cached.resumed_req_ids:
            for rid, computed in zip(cached.req_ids, cached.num_computed_tokens):
                if rid in cached.resumed_req_ids:
                    hits[rid] = [computed, self.requests[rid].num_tokens]
        return hits

    def _close_step_row(self, out: SchedulerOutput) -> None:
        row = self._step_rows.pop(id(out), None)
        if row is not None:
            row["done"] = time.time()
            self._step_log.write(row, flush=not self.running)


def _schedules_asynchronously(args: tuple, kwargs: dict) -> bool:
    """Whether the engine building a scheduler with these arguments runs it asynchronously."""
    vllm_config = kwargs.get("vllm_config", args[0] if args else None)
    return vllm_config is not None and bool(vllm_config.scheduler_config.async_scheduling)


class StepLogScheduler(_Timed, Scheduler):
    """vLLM's own scheduler, timed and logged (the `vllm` side of side-by-side runs);
    `AsyncStepLogScheduler` (vLLM's AsyncScheduler) where vLLM schedules asynchronously."""

    def __new__(cls, *args, **kwargs):
        if cls is StepLogScheduler and _schedules_asynchronously(args, kwargs):
            cls = AsyncStepLogScheduler
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_step_log(_settings_of(self.vllm_config))

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        started, t0 = time.time(), time.perf_counter()
        out = super().schedule(throttle_prefills)
        self._open_step_row(out, started, time.perf_counter() - t0)
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        self._close_step_row(scheduler_output)
        return outputs

    def shutdown(self) -> None:
        self._step_log.close()
        super().shutdown()


class _EngineTrace:
    """One span per traced request inside the engine, child of the replica's span, with an
    event for each decision the policy made about it. Free when no request is traced."""

    def __init__(self):
        self.spans: dict[str, Any] = {}
        self._tracer = None

    def start(self, mirror: Request, traceparent: str) -> None:
        from replicas.tracing import get_tracer, start_span_from_traceparent

        self._tracer = self._tracer or get_tracer("cacheopt.engine")
        self.spans[mirror.request_id] = start_span_from_traceparent(
            self._tracer, "cacheopt.engine", traceparent,
            {"gen_ai.request.id": mirror.request_id, "gen_ai.usage.input_tokens": mirror.prompt_tokens,
             "cacheopt.slo": mirror.slo.name, "cacheopt.bound_tokens": mirror.bound_output_tokens,
             "cacheopt.predicted_tokens": mirror.predicted_output_tokens})
        self.spans[mirror.request_id].add_event("queued")

    def on_plan(self, plan: StepPlan, admitted: list[str], ledger) -> None:
        for rid in admitted:
            span = self.spans.get(rid)
            if span is not None:
                share = ledger.shares[rid]
                span.add_event("admitted", {"cacheopt.reserved_blocks": share.reserved,
                                            "cacheopt.embedded_in": share.host or ""})
        for victim, mode in plan.preempted:
            span = self.spans.get(victim.request_id)
            if span is not None:
                span.add_event("preempted", {"cacheopt.mode": mode})

    def on_step_done(self, plan: StepPlan, finished: list[Request]) -> None:
        for mirror in plan.scheduled:
            span = self.spans.get(mirror.request_id)
            if span is not None and mirror.num_output_tokens == 1 and mirror.last_token_s == mirror.first_token_s:
                span.add_event("first_token")
        for mirror in finished:
            self.end(mirror.request_id, "finished", mirror.num_output_tokens)

    def end(self, rid: str, how: str, output_tokens: int | None = None) -> None:
        span = self.spans.pop(rid, None)
        if span is not None:
            if output_tokens is not None:
                span.set_attribute("gen_ai.usage.output_tokens", output_tokens)
            span.add_event(how)
            span.end()


class _VllmBlockPool:
    """The core's block pool (replicas/kv_blocks.BlockPool) over vLLM's KV cache manager:
    each lookup, allocation and preemption the core makes while it plans goes to vLLM at
    once and in the same order, so a later admission in the step sees what an earlier one
    cached or freed, exactly as in vLLM's own schedule(). What the step's output needs is
    kept for the adapter to assemble it."""

    def __init__(self, scheduler: CacheOptScheduler):
        self.s = scheduler
        self._hits: dict[str, Any] = {}  # request id -> (vLLM's hit blocks, hit tokens)
        self.new_blocks: dict[str, Any] = {}  # request id -> blocks allocated this step (running requests)
        self.hit_tokens: dict[str, int] = {}  # request id -> its prefix hit (requests admitted this step)
        self.timestamp = 0.0

    def begin_step(self, timestamp: float) -> None:
        self._hits.clear()
        self.new_blocks.clear()
        self.hit_tokens.clear()
        self.timestamp = timestamp

    def lookup(self, mirror: Request) -> list[int]:
        request = self.s.requests[mirror.request_id]
        blocks, num_tokens, boundary = self.s.kv_cache_manager.get_computed_blocks(request)
        if num_tokens % self.s.block_size:
            raise AdapterError(f"{request.request_id}: a prefix hit of {num_tokens} tokens is not block-aligned")
        request.shared_prefix_boundary = boundary
        self._hits[request.request_id] = (blocks, num_tokens)
        return blocks.get_block_ids()[0] if num_tokens else []

    def allocate(self, mirror: Request, hits: list[int], num_new_tokens: int) -> list[int]:
        s = self.s
        rid = mirror.request_id
        request = s.requests[rid]
        if request.status == RequestStatus.RUNNING:
            blocks = s.kv_cache_manager.allocate_slots(request, num_new_tokens, num_lookahead_tokens=s.num_lookahead_tokens)
            self.new_blocks[rid] = blocks
        else:
            hit_blocks, hit_tokens = self._hits.pop(rid, (None, 0)) if hits else (None, 0)
            self.hit_tokens[rid] = hit_tokens
            # The ledger already decided admission: vLLM's own full-sequence gate is off.
            blocks = s.kv_cache_manager.allocate_slots(request, num_new_tokens, num_new_computed_tokens=hit_tokens,
                                                       new_computed_blocks=hit_blocks,
                                                       num_lookahead_tokens=s.num_lookahead_tokens,
                                                       full_sequence_must_fit=False)
        if blocks is None:
            raise s._desync(f"no blocks for {num_new_tokens} more tokens of {rid} ({request.status.name})")
        new = blocks.get_block_ids()[0] if blocks.blocks[0] else []
        return hits + new if hits else new

    def free(self, mirror: Request, *, preempted: bool) -> None:
        """A preemption happens in vLLM now; a finished or aborted request vLLM has freed."""
        if preempted:
            request = self.s.requests[mirror.request_id]
            self.s.running.remove(request)
            self.s._preempt_request(request, self.timestamp)


class CacheOptScheduler(_Timed, Scheduler):
    """vLLM's scheduler whose admission, allocation and preemption the pure core decides.
    Where vLLM runs with async scheduling (its default on GPU), constructing it gives the
    `AsyncCacheOptScheduler` (vLLM takes a custom class whatever that setting says)."""

    def __new__(cls, *args, **kwargs):
        if cls is CacheOptScheduler and _schedules_asynchronously(args, kwargs):
            cls = AsyncCacheOptScheduler
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_supported()
        self._plans: dict[int, tuple[StepPlan, float]] = {}  # by id(SchedulerOutput): (plan, its start)
        self._shed: list[VllmRequest] = []  # finished by the policy this step, answered in update_from_output
        self._snapshot_s = 0.0
        self._trace = _EngineTrace()
        self._configure(_settings_of(self.vllm_config))

    def _configure(self, settings: EngineSettings) -> None:
        self.settings = settings
        self._pool = _VllmBlockPool(self)
        self.core = build_scheduler(
            settings.build_policy(),
            total_blocks=self.kv_cache_manager.block_pool.num_gpu_blocks - 1,  # block 0 is vLLM's null block
            config=self.core_config(), can_swap=False, pool=self._pool,
            async_steps=isinstance(self, AsyncScheduler))
        self.num_invariant_checks = 0
        self._init_step_log(settings)

    def core_config(self) -> SchedulerConfig:
        return SchedulerConfig(block_size=self.block_size, max_num_seqs=self.max_num_active_reqs,
                               max_num_batched_tokens=self.max_num_scheduled_tokens)

    def reconfigure(self, settings: EngineSettings) -> None:
        """Another policy or settings, on an idle engine (tests reuse one engine)."""
        if self.requests:
            raise AdapterError(f"reconfigure needs an idle engine; {len(self.requests)} requests are in flight")
        self._step_log.close()
        self._configure(settings)

    def _check_supported(self) -> None:
        """Refuse configurations whose code paths the override dropped (they would run
        silently wrong otherwise)."""
        sched = self.scheduler_config
        unsupported = {
            "a KV connector": self.connector is not None,
            "an EC connector": self.ec_connector is not None,
            "an aux output connector": self.aux_output_connector is not None,
            "speculative decoding": self.num_spec_tokens > 0,
            "LoRA": self.lora_config is not None,
            "Mamba layers": self.has_mamba_layers,
            "encoder-decoder models": self.is_encoder_decoder,
            "multimodal encoder inputs": self.max_num_encoder_input_tokens > 0,
            "pipeline parallelism": self.use_pp,
            "priority scheduling": self.policy != SchedulingPolicy.FCFS,
            "more than one KV cache group": len(self.kv_cache_config.kv_cache_groups) != 1,
            "attention other than full attention (sliding window, chunked local)": not all(
                type(g.kv_cache_spec) is FullAttentionSpec for g in self.kv_cache_config.kv_cache_groups),
            "a scheduler watermark": self.kv_cache_manager.watermark_blocks > 0,
            "chunked prefill off": not sched.enable_chunked_prefill,
            "long_prefill_token_threshold": sched.long_prefill_token_threshold > 0,
            "async scheduling through the synchronous class": sched.async_scheduling and not isinstance(
                self, AsyncScheduler),
        }
        found = [name for name, present in unsupported.items() if present]
        if found:
            raise AdapterError(f"CacheOptScheduler does not support: {', '.join(found)}")

    # --- requests in and out ----------------------------------------------------------------

    def add_request(self, request: VllmRequest) -> None:
        if request.request_id in self.requests:
            raise AdapterError(f"streaming input sessions are not supported (request {request.request_id})")
        if request.use_structured_output:
            raise AdapterError(f"structured output is not supported (request {request.request_id})")
        hints, problems = RequestHints.parse(request.sampling_params.extra_args, self.settings,
                                             max_tokens=request.max_tokens)
        if problems:
            logger.warning("request %s: ignoring bad CacheOPT hints: %s", request.request_id, "; ".join(problems))
        super().add_request(request)
        apply_control(self.core, hints, self.settings)
        mirror = Request(request_id=request.request_id, arrival_s=request.arrival_time,
                         prompt_tokens=request.num_prompt_tokens,
                         max_tokens=max(1, min(hints.max_tokens, self.max_model_len - request.num_prompt_tokens)),
                         slo=hints.slo, forwarded_prediction=hints.forwarded_prediction,
                         stop_after_tokens=request.max_tokens)
        self.core.add_request(mirror, time.time())
        if hints.traceparent:
            self._trace.start(mirror, hints.traceparent)

    def finish_requests(self, request_ids, finished_status: RequestStatus) -> list[VllmRequest]:
        finished = super().finish_requests(request_ids, finished_status)
        for request in finished:
            mirror = self.core.requests.get(request.request_id)
            if mirror is not None:
                # Aborted between schedule() and update_from_output(): vLLM skips its
                # output, so the pure step must not advance (or release) it either.
                for plan, _ in self._plans.values():
                    plan.scheduled.pop(mirror, None)
            self.core.abort(request.request_id)
            self._trace.end(request.request_id, "aborted")
        return finished

    # --- one step ---------------------------------------------------------------------------

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        started, t0 = time.time(), time.perf_counter()
        self.current_step += 1
        scheduled_timestamp = time.monotonic()
        self.kv_cache_manager.new_step_starts()
        self._pool.begin_step(scheduled_timestamp)
        plan = self.core.schedule(started)  # lookups, allocations and preemptions reach vLLM as planned

        if plan.shed:
            self._shed_requests(plan)
        assert all(mode == RECOMPUTE for _, mode in plan.preempted), "the core was built with can_swap=False"

        new_reqs: list[VllmRequest] = []
        resumed_reqs: list[VllmRequest] = []
        running_reqs: list[VllmRequest] = []
        req_to_new_blocks = {}
        num_scheduled_tokens: dict[str, int] = {}
        for mirror, n in plan.scheduled.items():
            request = self.requests[mirror.request_id]
            rid = request.request_id
            running = request.status == RequestStatus.RUNNING
            start = request.num_computed_tokens if running else self._pool.hit_tokens[rid]
            if n > self.max_model_len - start - self.num_sampled_tokens_per_step:
                raise AdapterError(f"{rid}: {n} tokens would pass max_model_len={self.max_model_len}")
            if running:
                running_reqs.append(request)
                req_to_new_blocks[rid] = self._pool.new_blocks[rid]
            else:
                hit_tokens = start
                if request.prefill_stats and request.num_preemptions <= 0:
                    request.prefill_stats.set(num_prompt_tokens=request.num_prompt_tokens,
                                              num_local_cached_tokens=hit_tokens, num_external_cached_tokens=0)
                if request.num_computed_tokens == 0:
                    self.kv_cache_manager.record_prefix_cache_stats(request, hit_tokens)
                request.num_computed_tokens = hit_tokens
                self.waiting.remove_request(request)
                self.deferred_waiting.discard(request)
                self.running.append(request)
                if self.log_stats:
                    request.record_event(EngineCoreEventType.SCHEDULED, scheduled_timestamp)
                if request.status == RequestStatus.WAITING:
                    new_reqs.append(request)
                elif request.status == RequestStatus.PREEMPTED:
                    resumed_reqs.append(request)
                else:
                    raise AdapterError(f"{rid}: cannot admit a request in status {request.status.name}")
                req_to_new_blocks[rid] = self.kv_cache_manager.get_blocks(rid)
                request.status = RequestStatus.RUNNING
                if request.num_computed_tokens + n < request.num_tokens:
                    self._inflight_prefills.add(request)
            num_scheduled_tokens[rid] = n

        if self._trace.spans:
            self._trace.on_plan(plan, admitted=[r.request_id for r in new_reqs + resumed_reqs], ledger=self.core.ledger)
        out = self._scheduler_output(new_reqs, resumed_reqs, running_reqs, num_scheduled_tokens, req_to_new_blocks)
        self._plans[id(out)] = (plan, started)
        if self.settings.check_invariants:
            self.check_books(after_schedule=True)
        self._open_step_row(out, started, time.perf_counter() - t0)
        return out

    def _scheduler_output(self, new_reqs, resumed_reqs, running_reqs, num_scheduled_tokens,
                          req_to_new_blocks) -> SchedulerOutput:
        """vLLM 0.32's `Scheduler.schedule` tail (S:1403-1556) without the connector,
        encoder and speculative-decoding branches, which `_check_supported` rules out."""
        total = sum(num_scheduled_tokens.values())
        assert total <= self.max_num_scheduled_tokens
        assert len(self.running) <= self.max_num_running_reqs
        if self.use_v2_model_runner:
            new_reqs = new_reqs + resumed_reqs
            resumed_reqs = []
            new_reqs_data = [NewRequestData.from_request(r, req_to_new_blocks[r.request_id].get_block_ids(),
                                                         r._all_token_ids, uses_mrope=self.model_uses_mrope)
                             for r in new_reqs]
        else:
            new_reqs_data = [NewRequestData.from_request(r, req_to_new_blocks[r.request_id].get_block_ids(),
                                                         uses_mrope=self.model_uses_mrope)
                             for r in new_reqs]
        cached_reqs_data = self._make_cached_request_data(running_reqs, resumed_reqs, num_scheduled_tokens, {},
                                                          req_to_new_blocks)
        if not self.use_v2_model_runner:
            self.prev_step_scheduled_req_ids.clear()
            self.prev_step_scheduled_req_ids.update(num_scheduled_tokens.keys())
        self.kv_cache_manager.take_boundary_state_offloads()  # drained every step, as vLLM does
        copies, cow_retained_blocks = self.kv_cache_manager.take_kv_cache_block_copies()
        if copies:
            self._free_cow_retained_blocks(cow_retained_blocks, self.sched_step_seq + 1)
        out = SchedulerOutput(
            scheduled_new_reqs=new_reqs_data,
            scheduled_cached_reqs=cached_reqs_data,
            num_scheduled_tokens=num_scheduled_tokens,
            total_num_scheduled_tokens=total,
            scheduled_spec_decode_tokens={},
            scheduled_encoder_inputs={},
            scheduled_encoder_input_stats=None,
            preempted_req_ids=self.reset_preempted_req_ids,
            finished_req_ids=self.finished_req_ids,
            free_encoder_mm_hashes=self.encoder_cache_manager.get_freed_mm_hashes(),
            new_block_ids_to_zero=self._get_new_block_ids_to_zero(),
            has_sync_kv_loads=False,
            kv_cache_block_copies=copies or None,
            kv_connector_block_state=None,
            num_spec_tokens_to_schedule=self.num_spec_tokens,
            ec_manager_metadata=self.encoder_cache_manager.get_manager_metadata(),
        )
        if self.defer_block_free and total > 0:
            self.sched_step_seq += 1
        self._update_after_schedule(out)
        return out

    def _shed_requests(self, plan: StepPlan) -> None:
        """The policy gave up on these waiting requests (a bounded wait ran out): finish
        them in vLLM, freeing nothing (they hold no blocks), and answer each client with
        finish_reason `abort` and stop_reason SHED_STOP_REASON, which the serving layer
        turns into 429 with Retry-After."""
        shed = Scheduler.finish_requests(self, [m.request_id for m in plan.shed], RequestStatus.FINISHED_ABORTED)
        self._shed.extend(shed)
        for request in shed:
            self._trace.end(request.request_id, "shed")

    def _answer_shed(self, outputs: dict[int, EngineCoreOutputs]) -> None:
        shed, self._shed = self._shed, []
        for request in shed:
            eco = outputs.get(request.client_index)
            if eco is None:
                eco = outputs[request.client_index] = EngineCoreOutputs()
            eco.outputs.append(EngineCoreOutput(request_id=request.request_id, new_token_ids=[],
                                                finish_reason=FinishReason.ABORT, stop_reason=SHED_STOP_REASON,
                                                events=request.take_events(), trace_headers=request.trace_headers))

    def update_from_output(self, scheduler_output, model_runner_output):
        plan, started = self._plans.pop(id(scheduler_output), (None, 0.0))
        # vLLM deletes finished requests from self.requests: keep them for the verdict.
        by_mirror = {m: self.requests[m.request_id] for m in plan.scheduled if m.request_id in self.requests} if plan else {}
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if self._shed:
            self._answer_shed(outputs)
        if plan is not None:
            end = time.time()
            finished = self.core.on_step_done(plan, end, end - started,
                                              is_finished=lambda m: by_mirror[m].is_finished())
            if self._trace.spans:
                self._trace.on_step_done(plan, finished)
        if self.settings.check_invariants:
            self.check_books(after_schedule=False)
        self._close_step_row(scheduler_output)
        self._publish_snapshot()
        return outputs

    def _publish_snapshot(self) -> None:
        """Atomically replace the snapshot file, at most every SNAPSHOT_PERIOD_S, and at
        once when the engine goes idle (so the router never sees a stale busy state)."""
        path = self.settings.snapshot_path
        now = time.time()
        if path is None or (now - self._snapshot_s < SNAPSHOT_PERIOD_S and self.requests):
            return
        self._snapshot_s = now
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(take_snapshot(self.core, now).to_dict(), f)
        os.replace(tmp, path)

    # --- the two books ----------------------------------------------------------------------

    def check_books(self, *, after_schedule: bool) -> None:
        """The ledger agrees with vLLM's block pool and queues (tests; `check_invariants`):
        vLLM's free blocks (cached ones included) are the ledger's total less its charged
        blocks, every block a request holds has as many references in vLLM as it has
        holders in the core, and each request's block table is the one the core recorded."""
        ledger = self.core.ledger
        ledger.check_invariants()
        try:
            self.core.check_blocks()
        except AssertionError as e:
            raise self._desync(f"the ledger's charges are not the block tables': {e}") from None
        vllm_free = self.kv_cache_manager.block_pool.get_num_free_blocks()
        if vllm_free != ledger.total_blocks - ledger.held_total:
            raise self._desync(f"vLLM has {vllm_free} free blocks, ledger {ledger.total_blocks - ledger.held_total}")
        running = {r.request_id for r in self.running}
        if running != {m.request_id for m in self.core.running}:
            raise self._desync(f"running sets differ: vLLM {sorted(running)}, core {sorted(m.request_id for m in self.core.running)}")
        waiting = {r.request_id for r in self.waiting}
        if waiting != {m.request_id for m in self.core.waiting}:
            raise self._desync("waiting sets differ")
        tables = self.core.tables
        assert tables is not None, "the adapter's core always has a block pool"
        holders: dict[int, int] = {}
        for table in tables.tables.values():
            for block in table:
                holders[block] = holders.get(block, 0) + 1
        blocks = self.kv_cache_manager.block_pool.blocks
        for block, n in holders.items():
            if blocks[block].ref_cnt != n:
                raise self._desync(f"block {block} has {blocks[block].ref_cnt} references in vLLM, {n} holders in the core")
        for mirror in self.core.running:
            table = self.kv_cache_manager.get_block_ids(mirror.request_id)[0]
            if list(table) != tables.tables[mirror.request_id]:
                raise self._desync(f"{mirror.request_id} holds blocks {list(table)} in vLLM, {tables.tables[mirror.request_id]} in the core")
            if not after_schedule:  # vLLM advances num_computed_tokens at schedule time
                request = self.requests[mirror.request_id]
                vllm_progress = (request.num_computed_tokens, request.num_output_tokens, request.num_output_placeholders)
                if vllm_progress != (mirror.num_computed_tokens, mirror.num_output_tokens, mirror.num_output_placeholders):
                    raise self._desync(f"{mirror.request_id} progress differs: vLLM {vllm_progress}, core "
                                       f"{(mirror.num_computed_tokens, mirror.num_output_tokens, mirror.num_output_placeholders)}")
        self.num_invariant_checks += 1

    def _desync(self, what: str) -> AdapterError:
        return AdapterError(f"CacheOPT ledger and vLLM disagree at step {self.current_step}: {what}")

    def stats(self) -> dict[str, Any]:
        return {"counters": dict(self.core.counters), "invariant_checks": self.num_invariant_checks,
                "ledger_free": self.core.ledger.free, "reserve_free": self.core.ledger.reserve_free}

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        if reset_running_requests and self.running:
            raise AdapterError("reset_prefix_cache(reset_running_requests=True) would preempt behind the policy's back")
        return super().reset_prefix_cache(reset_running_requests, reset_connector)

    def shutdown(self) -> None:
        self._step_log.close()
        super().shutdown()


class AsyncCacheOptScheduler(CacheOptScheduler, AsyncScheduler):
    """The adapter under async scheduling: vLLM's AsyncScheduler semantics (output
    placeholders, the next step planned while one is in flight: `_update_after_schedule`
    and `_update_request_with_output` are AsyncScheduler's), the core planning with
    `async_steps` so that its mirror counts the same placeholders."""


class AsyncStepLogScheduler(StepLogScheduler, AsyncScheduler):
    """vLLM's own AsyncScheduler, timed and logged."""
