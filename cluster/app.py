"""The Ray Serve application: an OpenAI-compatible ingress that routes by KV headroom to
replica deployments, and the global scheduler actor.

    client ──HTTP──> Ingress (FastAPI) ──handle──> replica-0 … replica-N (engine + CacheOPT)
                        │   polls snapshots every 50 ms, routes, streams SSE
                        └── GlobalScheduler actor: arrivals -> rate -> p; snapshots -> reserve leases

Each replica is its own deployment so that the ingress, not Ray Serve's balancer, picks
the replica. p and the reserve lease travel to the engine with each request
(`cacheopt_confidence`, `cacheopt_reserve_blocks`). `serve run cluster.app:build_app`
(args: a config mapping) or `cacheopt serve` builds it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import deque

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve

from cluster.config import ClusterConfig
from cluster.metrics import ClusterMetrics
from cluster.openai_api import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    PromptRenderer,
    completion_body,
    completion_chunk,
    new_id,
    parse_body,
    usage_chunk,
)
from cluster.router import choose_replica
from cluster.runtime import RequestShed
from cluster.store import RedisStore, StoreUnavailable
from global_scheduler.confidence import ArrivalRateEstimator, RateTunedConfidence
from global_scheduler.reserve import rebalance_reserve
from replicas.engine_settings import XARG_CONFIDENCE, XARG_MAX_TOKENS, XARG_RESERVE, XARG_SLO, XARG_TRACEPARENT
from replicas.plan import blocks_for
from replicas.slo import SLO_CLASS_NAMES
from replicas.snapshot import KVSnapshot
from replicas.tracing import get_tracer, inject_context, span_from_context

log = logging.getLogger("cacheopt.cluster")
GLOBAL_SCHEDULER = "cacheopt-global-scheduler"
NAMESPACE = "cacheopt"
SNAPSHOT_POLL_S = 0.05
REPLICA_PUBLISH_S = 0.1
CONTROL_POLL_S = 0.5
RANDOM_WEIGHTS_NOTE = ("random weights (load_format=dummy): real compute and KV cache, meaningless text")


# --- the global scheduler ------------------------------------------------------------------

@ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=0)
class GlobalScheduler:
    """Arrival rate -> confidence p; replica snapshots -> reserve leases. Its state is
    soft: after a restart it relearns the rate within one estimator window."""

    def __init__(self, reserve_fraction: float, p_min: float = 0.3, p_max: float = 0.9,
                 low_rps: float = 8.0, high_rps: float = 16.5, redis_url: str | None = None):
        self.rate = ArrivalRateEstimator()
        self.tuner = RateTunedConfidence(p_min=p_min, p_max=p_max, low_rps=low_rps, high_rps=high_rps)
        self.reserve_fraction = reserve_fraction
        self.leases: dict[str, int] = {}
        self.started_s = time.time()
        self.store = RedisStore(redis_url) if redis_url else None
        self.epoch = 0

    def observe(self, arrivals: list[float], snapshots: dict[str, dict]) -> dict:
        for t in arrivals:
            self.rate.observe(t)
        now = time.time()
        parsed = {name: KVSnapshot.from_dict(s) for name, s in snapshots.items()}
        if parsed:
            budget = int(self.reserve_fraction * sum(s.total_blocks for s in parsed.values()))
            self.leases = rebalance_reserve(budget, parsed)
            self._write_leases()
        rate = self.rate.rate_rps(now)
        return {"confidence": self.tuner.confidence(rate), "arrival_rate_rps": rate, "leases": self.leases,
                "started_s": self.started_s}

    def _write_leases(self) -> None:
        """To Redis when configured; while it is away the leases live here and in the
        requests the ingress sends, and the next write after it returns reconciles."""
        if self.store is None:
            return
        try:
            self.epoch += 1
            stored = self.store.set_leases(self.epoch, self.leases)
            if stored > self.epoch:  # a newer split exists (we restarted): continue after it
                self.epoch = self.store.set_leases(stored + 1, self.leases)
        except StoreUnavailable:
            pass  # the leases stay here; the next write after Redis returns reconciles


def global_scheduler_handle(config: ClusterConfig):
    p = config.policy
    low, high = (r * config.replicas for r in p.rate_band_rps)
    return GlobalScheduler.options(name=GLOBAL_SCHEDULER, namespace=NAMESPACE, lifetime="detached",
                                   get_if_exists=True).remote(p.reserve_fraction, p.p_range[0], p.p_range[1], low, high,
                                                              config.redis_url)


# --- replicas ------------------------------------------------------------------------------

@serve.deployment(max_ongoing_requests=1024, health_check_period_s=5)
class Replica:
    def __init__(self, config: dict, index: int):
        from cluster.runtime import make_runtime

        self.config = ClusterConfig.model_validate(config)
        self.index = index
        self.tracer = get_tracer("cacheopt.replica")  # first: the engine process inherits the OTLP settings
        self.runtime = make_runtime(self.config)
        self.store = RedisStore(self.config.redis_url) if self.config.redis_url else None
        self.lease: int | None = None  # the last lease read from Redis, kept while it is away
        self._publisher: asyncio.Task | None = None

    def _ensure_publisher(self) -> None:
        if self.store is not None and (self._publisher is None or self._publisher.done()):
            self._publisher = asyncio.get_running_loop().create_task(self._publish())

    async def _publish(self) -> None:
        while True:
            snap = self.runtime.snapshot()
            try:
                if snap is not None:
                    await asyncio.to_thread(self.store.publish_snapshot, str(self.index), snap.to_dict())
                lease = await asyncio.to_thread(self.store.lease, str(self.index))
                if lease is not None:
                    self.lease = lease
            except StoreUnavailable:
                pass  # keep serving with the last lease; publish again when Redis is back
            except Exception:  # noqa: BLE001 (publishing must never stop; say why it failed)
                log.exception("replica %d: publishing the KV snapshot failed", self.index)
            await asyncio.sleep(REPLICA_PUBLISH_S)

    async def generate(self, request_id: str, prompt_token_ids: list[int], max_tokens: int, extra_args: dict,
                       trace_context: dict, sampling: dict | None = None):
        with span_from_context(self.tracer, "cacheopt.replica.generate", trace_context,
                               {"cacheopt.replica": self.index, "gen_ai.request.id": request_id,
                                "gen_ai.usage.input_tokens": len(prompt_token_ids),
                                "gen_ai.request.max_tokens": max_tokens}) as span:
            self._ensure_publisher()
            if self.lease is not None:
                extra_args = {**extra_args, XARG_RESERVE: self.lease}  # Redis is fresher than the ingress
            traceparent = inject_context(span).get("traceparent")
            if traceparent:
                extra_args = {**extra_args, XARG_TRACEPARENT: traceparent}  # the engine's span joins this trace
            count = 0
            async for ids in self.runtime.generate(request_id, prompt_token_ids, max_tokens, extra_args,
                                                   sampling or {}):
                if count == 0:
                    span.add_event("first_token")
                count += len(ids)
                yield ids
            span.set_attribute("gen_ai.usage.output_tokens", count)

    async def snapshot(self) -> dict | None:
        self._ensure_publisher()
        snap = self.runtime.snapshot()
        return None if snap is None else snap.to_dict()

    async def __del__(self):
        await self.runtime.shutdown()


class _Progress:
    __slots__ = ("arrival", "index", "span", "rid", "prompt", "tokens", "first_s", "closed")

    def __init__(self, arrival: float, index: int, span, rid: str, prompt: int):
        self.arrival, self.index, self.span, self.rid, self.prompt = arrival, index, span, rid, prompt
        self.tokens, self.first_s, self.closed = 0, None, False

    def on_tokens(self, count: int, metrics: ClusterMetrics) -> None:
        if self.first_s is None:
            self.first_s = time.time()
            self.span.add_event("first_token")
            metrics.on_first_token(self.first_s - self.arrival)
        self.tokens += count


# --- the ingress ---------------------------------------------------------------------------

api = FastAPI(title="CacheOPT", docs_url=None, redoc_url=None)


@serve.deployment(max_ongoing_requests=4096)
@serve.ingress(api)
class Ingress:
    def __init__(self, config: dict, *replicas):
        from pathlib import Path

        self.config = ClusterConfig.model_validate(config)
        self.replicas = list(replicas)
        n = len(self.replicas)
        self.renderer = PromptRenderer(Path(self.config.engine.model))
        self.in_flight = [0] * n
        self.snapshots: list[KVSnapshot | None] = [None] * n
        self.unseen: list[deque[tuple[float, int]]] = [deque() for _ in range(n)]
        self.confidence = self.config.policy.confidence
        self.arrival_rate = 0.0
        self.leases: dict[str, int] = {}
        self.arrivals: list[float] = []
        self.rng = random.Random(0)
        self.metrics = ClusterMetrics(n)
        self.tracer = get_tracer("cacheopt.ingress")
        self._poller: asyncio.Task | None = None
        self._global = None
        self.store = RedisStore(self.config.redis_url) if self.config.redis_url else None

    # -- background: snapshots and control -----------------------------------------------

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        last_control = 0.0
        while True:
            await self._poll_snapshots()
            if time.time() - last_control >= CONTROL_POLL_S:
                last_control = time.time()
                await self._exchange_control()
            await asyncio.sleep(SNAPSHOT_POLL_S)

    async def _poll_snapshots(self) -> None:
        if self.store is not None:
            try:
                names = [str(i) for i in range(len(self.replicas))]
                found = await asyncio.to_thread(self.store.snapshots, names)
                self._set_snapshots([found.get(name) for name in names])
                return
            except StoreUnavailable:
                pass  # Redis is away: ask the replicas themselves

        async def one(i: int):
            try:
                data = await asyncio.wait_for(self.replicas[i].snapshot.remote(), SNAPSHOT_POLL_S * 20)
            except Exception:  # noqa: BLE001 (a dead or slow replica: route without its snapshot)
                data = None
            return data
        self._set_snapshots(await asyncio.gather(*(one(i) for i in range(len(self.replicas)))))

    def _set_snapshots(self, data: list[dict | None]) -> None:
        for i, d in enumerate(data):
            self.snapshots[i] = None if d is None else KVSnapshot.from_dict(d)
            if self.snapshots[i] is not None:
                taken = self.snapshots[i].taken_s
                while self.unseen[i] and self.unseen[i][0][0] <= taken:
                    self.unseen[i].popleft()
        self.metrics.set_snapshots(self.snapshots)

    async def _exchange_control(self) -> None:
        arrivals, self.arrivals = self.arrivals, []
        snaps = {str(i): s.to_dict() for i, s in enumerate(self.snapshots) if s is not None}
        try:
            if self._global is None:
                self._global = global_scheduler_handle(self.config)
            reply = await asyncio.wait_for(self._global.observe.remote(arrivals, snaps), 5.0)
        except Exception as error:  # noqa: BLE001 (serving goes on with the last p and leases)
            log.warning("global scheduler unavailable (%s); keeping p=%.2f", error, self.confidence)
            self._global = None
            self.arrivals = arrivals + self.arrivals  # not lost: sent with the next exchange
            return
        self.confidence, self.arrival_rate = reply["confidence"], reply["arrival_rate_rps"]
        self.leases = reply["leases"]
        self.metrics.set_control(self.confidence, self.arrival_rate)

    # -- endpoints ----------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "replicas": len(self.replicas)}

    @api.get("/v1/models")
    async def models(self) -> dict:
        e = self.config.engine
        return {"object": "list", "data": [{
            "id": e.served_model_name, "object": "model", "created": 0, "owned_by": "cacheopt",
            "max_model_len": e.max_model_len,
            "description": RANDOM_WEIGHTS_NOTE if e.random_weights else f"model at {e.model}"}]}

    @api.get("/metrics")
    async def metrics(self) -> PlainTextResponse:
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, "text")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve(request, "chat")

    async def _serve(self, http: Request, kind: str):
        self._ensure_poller()
        arrival = time.time()
        try:
            body = parse_body(await http.body(), ChatRequest if kind == "chat" else CompletionRequest)
            e = self.config.engine
            if body.model != e.served_model_name:
                raise ApiError(404, f"model {body.model!r} does not exist; this server serves "
                                    f"{e.served_model_name!r}", param="model", code="model_not_found")
            ids = self.renderer.chat_ids(body) if kind == "chat" else self.renderer.completion_ids(body)
            max_tokens = (getattr(body, "max_completion_tokens", None) or body.max_tokens
                          or max(1, e.max_model_len - len(ids)))
            if len(ids) + max_tokens > e.max_model_len:
                raise ApiError(400, f"This model's maximum context length is {e.max_model_len} tokens. However, you "
                                    f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the messages, "
                                    f"{max_tokens} in the completion).", param="max_tokens",
                               code="context_length_exceeded")
            slo = body.slo or (body.vllm_xargs or {}).get(XARG_SLO) or self.config.policy.default_slo
            if slo not in SLO_CLASS_NAMES:
                raise ApiError(400, f"unknown slo class {slo!r}; choose {', '.join(SLO_CLASS_NAMES)}", param="slo")
            if sum(self.in_flight) >= self.config.max_queued_requests * len(self.replicas):
                self.metrics.rejected += 1
                raise ApiError(429, "the server is overloaded; retry later", type_="server_overloaded",
                               headers={"Retry-After": "1"})
        except ApiError as error:
            return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

        need = blocks_for(len(ids) + max_tokens, e.block_size)
        unseen = [sum(n for _, n in q) for q in self.unseen]
        snapshots = self.snapshots if self.config.router == "kv" else [None] * len(self.replicas)
        index, how = choose_replica(snapshots, self.in_flight, unseen, arrival, self.rng)
        self.unseen[index].append((arrival, need))
        self.arrivals.append(arrival)
        extra = dict(body.vllm_xargs or {})
        extra.update({XARG_SLO: slo, XARG_CONFIDENCE: self.confidence, XARG_MAX_TOKENS: max_tokens})
        lease = self.leases.get(str(index))
        if lease is not None:
            extra[XARG_RESERVE] = lease
        rid = new_id("chatcmpl" if kind == "chat" else "cmpl")
        span = self.tracer.start_span("cacheopt.request", attributes={
            "gen_ai.request.id": rid, "gen_ai.request.model": body.model, "gen_ai.request.max_tokens": max_tokens,
            "gen_ai.usage.input_tokens": len(ids), "cacheopt.slo": slo, "cacheopt.replica": index,
            "cacheopt.routing": how})
        sampling = {k: v for k, v in (("temperature", body.temperature), ("top_p", body.top_p), ("seed", body.seed),
                                       ("ignore_eos", body.ignore_eos)) if v is not None}
        stream = self.replicas[index].options(stream=True).generate.remote(
            rid, ids, max_tokens, extra, inject_context(span), sampling)
        self.in_flight[index] += 1
        self.metrics.on_request(len(ids))
        state = _Progress(arrival, index, span, rid, len(ids))
        headers = {"x-cacheopt-replica": str(index), "x-cacheopt-routing": how}
        # The first chunk decides the status: a request the replica sheds gets 429, not a
        # 200 stream that ends in an error.
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            first = None
        except RequestShed:
            return self._shed(state)
        except asyncio.CancelledError:
            stream.cancel()  # the client left while it waited: the engine aborts the request
            state.span.add_event("client_disconnected")
            self._done(state)
            raise
        except Exception as error:  # noqa: BLE001 (a replica failure is a 503, not a stack trace)
            response = self._failed(state, error)
            self._done(state)
            return response
        if first is not None:
            state.on_tokens(len(first), self.metrics)  # TTFT is when it arrived, not when the response starts
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(self._sse(first, stream, kind, body.model, state, max_tokens, include_usage),
                                     media_type="text/event-stream", headers=headers)
        try:
            out: list[int] = list(first or ())
            async for chunk in stream:
                state.on_tokens(len(chunk), self.metrics)
                out += chunk
        except Exception as error:  # noqa: BLE001 (a replica failure is a 503, not a stack trace)
            return self._failed(state, error)
        finally:
            self._done(state)
        finish = "length" if len(out) >= max_tokens else "stop"
        return JSONResponse(completion_body(kind, rid, body.model, self.renderer.decode(out), finish, len(ids),
                                            len(out)), headers=headers)

    async def _sse(self, first: list[int] | None, stream, kind: str, model: str, state: _Progress, max_tokens: int,
                   include_usage: bool):
        created = int(time.time())
        produced = 0

        async def chunks():
            if first is not None:
                yield first  # counted in state when it arrived
            async for chunk in stream:
                state.on_tokens(len(chunk), self.metrics)
                yield chunk
        try:
            async for chunk in chunks():
                produced += len(chunk)
                finish = "length" if produced >= max_tokens else None
                data = completion_chunk(kind, state.rid, model, created, self.renderer.decode(chunk), finish)
                yield f"data: {json.dumps(data)}\n\n"
            if include_usage:
                yield f"data: {json.dumps(usage_chunk(kind, state.rid, model, created, state.prompt, produced))}\n\n"
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            stream.cancel()  # the client left: the replica's generator is cancelled and the engine aborts
            state.span.add_event("client_disconnected")
            raise
        except Exception as error:  # noqa: BLE001
            body = ApiError(503, f"the replica failed: {type(error).__name__}", type_="server_error").body()
            state.span.record_exception(error)
            yield f"data: {json.dumps(body)}\n\n"
        finally:
            self._done(state)

    def _shed(self, state: _Progress) -> JSONResponse:
        """The replica's policy refused the request after a bounded wait: nothing of it is
        left there, and the client may retry (elsewhere, or when the load has passed)."""
        state.span.add_event("shed")
        self.metrics.rejected += 1
        self.metrics.shed += 1
        state.closed = True
        self.in_flight[state.index] -= 1
        state.span.end()
        body = ApiError(429, "the server could not start this request in time; retry later",
                        type_="server_overloaded").body()
        return JSONResponse(body, status_code=429, headers={"Retry-After": "1"})

    def _failed(self, state: _Progress, error: Exception) -> JSONResponse:
        state.span.record_exception(error)
        self.metrics.failed += 1
        body = ApiError(503, f"the replica failed: {type(error).__name__}; retry", type_="server_error").body()
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    def _done(self, state: _Progress) -> None:
        if state.closed:
            return
        state.closed = True
        self.in_flight[state.index] -= 1
        state.span.set_attribute("gen_ai.usage.output_tokens", state.tokens)
        state.span.add_event("finished")
        state.span.end()
        self.metrics.on_finish(state)


def build_app(args: dict | None = None):
    """`serve run cluster.app:build_app [config=path.yaml]`; `cacheopt serve` passes the
    validated config as a mapping."""
    from cluster.config import load_config

    args = dict(args or {})
    config = (ClusterConfig.model_validate(args["config_dict"]) if "config_dict" in args
              else load_config(args.get("config")))
    data = config.model_dump()
    # The engine's own processes are outside Ray's accounting; a replica asks Ray only for
    # its GPU (none on CPU machines), so that two replicas fit a 2-core machine.
    replicas = [Replica.options(name=f"replica-{i}",
                                ray_actor_options={"num_cpus": 0, "num_gpus": config.engine.num_gpus}).bind(data, i)
                for i in range(config.replicas)]
    return Ingress.options(ray_actor_options={"num_cpus": 0}).bind(data, *replicas)
