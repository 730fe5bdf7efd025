"""The simulated engine behind a serving replica: the pure scheduler core and the
simulated step times, stepping in real time inside the replica's event loop. For tests and
for trying the cluster without a model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from predictor.length_quantile import LengthQuantilePredictor
from replicas.engine_settings import EngineSettings, RequestHints, apply_control, switch_length_table
from replicas.engines import EngineDead, RequestShed
from replicas.engines.config import EngineConfig
from replicas.latency import get_latency_model
from replicas.plan import StepPlan
from replicas.request import Request
from replicas.scheduler import build_scheduler
from replicas.sim_engine import SimEngine
from replicas.snapshot import KVSnapshot, take_snapshot

_SHED = object()  # the queue item for a request the policy shed


class SimServingEngine:
    """The simulated engine stepping in real time inside the event loop, with the same
    policy objects as the vLLM adapter. It has no model: it writes exactly `max_tokens`
    arbitrary tokens, and `sampling` is ignored."""

    def __init__(self, config: EngineConfig, settings: EngineSettings):
        e = config
        self.settings = settings
        self.latency = get_latency_model(e.latency_model)
        self.core = build_scheduler(self.settings.build_policy(), total_blocks=(e.kv_blocks or 4096) - 1,  # None means "sized from memory": a GPU-sized pool
                                    config=e.scheduler_config(),
                                    can_swap=False)
        self.engine = SimEngine(self.latency, e.block_size)
        self.max_model_len = e.max_model_len
        self._queues: dict[str, asyncio.Queue] = {}
        self._in_flight: StepPlan | None = None  # the step being "computed" (awaited) now
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._failure: BaseException | None = None  # why the step loop died: the engine serves no more
        self.length_table_version = 0

    def use_length_table(self, version: int, table: dict) -> None:
        """In this process: the policy's predictor switches at once."""
        switch_length_table(self.core, LengthQuantilePredictor.from_dict(table), version)
        self.length_table_version = version

    async def generate(self, request_id: str, prompt_token_ids: list[int], max_tokens: int,
                       extra_args: dict, sampling: dict | None = None) -> AsyncIterator[list[int]]:
        self.check_health()
        hints, _ = RequestHints.parse(extra_args, self.settings, max_tokens=max_tokens)
        apply_control(self.core, hints, self.settings)
        prompt = len(prompt_token_ids)
        mirror = Request(request_id, time.time(), prompt, max(1, min(hints.max_tokens, self.max_model_len - prompt)),
                         hints.slo, true_output_tokens=max_tokens, forwarded_prediction=hints.forwarded_prediction)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self.core.add_request(mirror, time.time())
        self._ensure_loop()
        self._wake.set()
        try:
            produced = 0
            while produced < max_tokens:
                count = await queue.get()
                if count is _SHED:
                    raise RequestShed(request_id)
                if isinstance(count, EngineDead):
                    raise count
                while not queue.empty() and type(queue._queue[0]) is int:  # type: ignore[attr-defined]
                    count += queue.get_nowait()  # steps the consumer missed go out as one list, as vLLM's DELTA does
                # Arbitrary ids (the simulated engine has no model): position-dependent, clear of 0-2.
                yield [3 + (produced + i) % 997 for i in range(count)]
                produced += count
        finally:
            self._queues.pop(request_id, None)
            known = self.core.requests.get(request_id)
            if known is not None and self._in_flight is not None:
                # Left during a step: that step must not advance (or release) it after the abort.
                self._in_flight.scheduled.pop(known, None)
            self.core.abort(request_id)  # a no-op when it finished; frees it when the client left

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            await self._step_forever()
        except Exception as error:  # every waiting stream ends with it, and the replica's health check fails
            self._failure = error
            dead = EngineDead(f"the simulated engine's step loop failed: {error!r}")
            for queue in self._queues.values():
                queue.put_nowait(dead)
            raise

    async def _step_forever(self) -> None:
        core = self.core
        while True:
            if not core.has_work:
                self._wake.clear()
                await self._wake.wait()
            start = time.time()
            plan = core.schedule(start)
            for request in plan.shed:
                queue = self._queues.get(request.request_id)
                if queue is not None:
                    queue.put_nowait(_SHED)
            if not plan.scheduled:
                await asyncio.sleep(max(core.max_recent_iteration_s, 1e-3))  # nothing fits until time passes
                continue
            before = {r: r.num_output_tokens for r in plan.scheduled}
            duration = self.engine.step_duration_s(plan)
            self._in_flight = plan
            try:
                await asyncio.sleep(duration)
            finally:
                self._in_flight = None
            core.on_step_done(plan, time.time(), duration,
                              is_finished=lambda r: r.num_output_tokens >= (r.true_output_tokens or 0))
            for request, outputs in before.items():
                queue = self._queues.get(request.request_id)
                if queue is not None and request.num_output_tokens > outputs:
                    queue.put_nowait(request.num_output_tokens - outputs)

    def snapshot(self) -> KVSnapshot:
        return take_snapshot(self.core, time.time())

    def check_health(self) -> None:
        if self._failure is not None:
            raise EngineDead(f"the simulated engine's step loop failed: {self._failure!r}")

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
