"""The engine behind one replica, as the serving layer sees it: submit a tokenized request,
stream its new token ids, abort it, read a KV snapshot.

- `VllmRuntime`: a real vLLM engine (`AsyncLLM`, its engine core in a child process) with
  the CacheOPT adapter as its scheduler; the adapter publishes KV snapshots to a file.
- `SimRuntime`: the simulated engine stepping in real time inside the event loop, with
  the same policy objects; for tests and for trying the cluster without an engine. It
  generates exactly `max_tokens` tokens (it has no model to stop it).

Both take per-request hints as the adapter's `extra_args` (replicas.engine_settings).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from cluster.config import ClusterConfig
from replicas.config import SchedulerConfig
from replicas.engine_settings import SHED_STOP_REASON, EngineSettings, RequestHints, apply_control
from replicas.latency import get_latency_model
from replicas.plan import StepPlan
from replicas.request import Request
from replicas.scheduler import build_scheduler
from replicas.sim_engine import SimEngine
from replicas.snapshot import KVSnapshot, take_snapshot

DEFAULT_PREDICTOR = Path(__file__).resolve().parents[1] / "predictor" / "data" / "length-conv.json"
_SHED = object()  # SimRuntime's queue item for a request the policy shed


class RequestShed(Exception):
    """The replica's policy refused the request after a bounded wait, before its first
    token (it could no longer start in time). The ingress answers 429 with Retry-After."""

    def __init__(self, request_id: str):
        super().__init__(request_id)  # the only argument, so that it pickles back as it was
        self.request_id = request_id

    def __str__(self) -> str:
        return f"request {self.request_id} was shed: it waited past its bound without starting"


def engine_settings(config: ClusterConfig, *, snapshot_path: str | None = None) -> EngineSettings:
    predictor = config.policy.predictor_path or (str(DEFAULT_PREDICTOR) if DEFAULT_PREDICTOR.is_file() else None)
    return EngineSettings(policy=config.policy.name, predictor_path=predictor,
                          latency_model=config.engine.latency_model, default_slo=config.policy.default_slo,
                          cacheopt={"confidence": config.policy.confidence}, snapshot_path=snapshot_path)


class SimRuntime:
    def __init__(self, config: ClusterConfig):
        e = config.engine
        self.settings = engine_settings(config)
        self.latency = get_latency_model(e.latency_model)
        self.core = build_scheduler(self.settings.build_policy(), total_blocks=(e.kv_blocks or 4096) - 1,  # None means "sized from memory": a GPU-sized pool
                                    config=SchedulerConfig(block_size=e.block_size, max_num_seqs=e.max_num_seqs,
                                                           max_num_batched_tokens=e.max_num_batched_tokens),
                                    can_swap=False)
        self.engine = SimEngine(self.latency, e.block_size)
        self.max_model_len = e.max_model_len
        self._queues: dict[str, asyncio.Queue] = {}
        self._in_flight: StepPlan | None = None  # the step being "computed" (awaited) now
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None

    async def generate(self, request_id: str, prompt_token_ids: list[int], max_tokens: int,
                       extra_args: dict, sampling: dict | None = None) -> AsyncIterator[list[int]]:
        """`sampling` is ignored: the simulated engine always writes `max_tokens` tokens."""
        hints, _ = RequestHints.parse(extra_args, self.settings, max_tokens=max_tokens)
        apply_control(self.core, hints)
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
                if count is None:
                    return
                # Arbitrary ids (the simulated engine has no model): position-dependent, clear of 0-2.
                yield [3 + (produced + i) % 997 for i in range(count)]
                produced += count
        finally:
            self._queues.pop(request_id, None)
            mirror = self.core.requests.get(request_id)
            if mirror is not None and self._in_flight is not None:
                # Left during a step: that step must not advance (or release) it after the abort.
                self._in_flight.scheduled.pop(mirror, None)
            self.core.abort(request_id)  # a no-op when it finished; frees it when the client left

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
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
                              is_finished=lambda r: r.num_output_tokens >= r.true_output_tokens)
            for request, outputs in before.items():
                queue = self._queues.get(request.request_id)
                if queue is not None and request.num_output_tokens > outputs:
                    queue.put_nowait(request.num_output_tokens - outputs)

    def snapshot(self) -> KVSnapshot:
        return take_snapshot(self.core, time.time())

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()


class VllmRuntime:
    def __init__(self, config: ClusterConfig):
        from bench.engine import ADAPTER_CLS, EngineSetup, set_engine_environment, start_async_engine

        e = config.engine
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{e.kv_cache_space_gib:g}")
        set_engine_environment()
        self._snapshot_path = Path(tempfile.mkdtemp(prefix="cacheopt-replica-")) / "kv-snapshot.json"
        self.settings = engine_settings(config, snapshot_path=str(self._snapshot_path))
        setup = EngineSetup(model=Path(e.model), block_size=e.block_size, kv_blocks=e.kv_blocks,
                            max_model_len=e.max_model_len, max_num_seqs=e.max_num_seqs,
                            max_num_batched_tokens=e.max_num_batched_tokens, random_weights=e.random_weights)
        self.engine = start_async_engine(setup, ADAPTER_CLS, self.settings)
        self.max_model_len = e.max_model_len
        # The engine core runs in a child process; make sure it goes when this process does.
        self._engine_pids = _child_pids()
        atexit.register(self._kill_engine_processes)

    async def generate(self, request_id: str, prompt_token_ids: list[int], max_tokens: int,
                       extra_args: dict, sampling: dict | None = None) -> AsyncIterator[list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(max_tokens=max_tokens, detokenize=False, output_kind=RequestOutputKind.DELTA,
                                extra_args=extra_args, **(sampling or {}))
        # Cancelling this generator (a client that left) makes vLLM abort the request.
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=prompt_token_ids), params,
                                              request_id=request_id):
            completion = out.outputs[0]
            if out.finished and completion.stop_reason == SHED_STOP_REASON:
                raise RequestShed(request_id)
            ids = list(completion.token_ids)
            if ids:
                yield ids

    def snapshot(self) -> KVSnapshot | None:
        try:
            return KVSnapshot.from_dict(json.loads(self._snapshot_path.read_text()))
        except (OSError, ValueError, TypeError):
            return None  # not published yet

    async def shutdown(self) -> None:
        from bench.engine import stop_engine

        stop_engine(self.engine)
        self._kill_engine_processes()

    def _kill_engine_processes(self) -> None:
        import psutil

        for pid in self._engine_pids:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass  # already gone


def _child_pids() -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True)]


def make_runtime(config: ClusterConfig):
    return SimRuntime(config) if config.engine.kind == "sim" else VllmRuntime(config)

