"""The serving replica: one Ray Serve deployment of N replicas, each an OpenAI-compatible
HTTP server over its own engine with CacheOPT inside.

    client ──HTTP──> HAProxy (least connections) ──HTTP──> LLMServer replica ──> engine core
                                                           │ every 0.5 s: arrivals, snapshot, counters
                                                           └──> GlobalScheduler actor: p, reserve lease, readiness

Tokenizing, detokenizing (incrementally) and SSE happen in the replica, next to the
engine, one SSE event per engine step of a stream. With the default ingress (cluster.ingress)
each replica is itself the HTTP server behind HAProxy, so a token crosses no Ray hop; with
`ingress: serve-proxy` it crosses one (replica to Serve's proxy), and the proxy routes among
the replicas with Serve's default router. With `router: kv` ours (cluster.router) chooses
behind either ingress (behind HAProxy through cluster.route_service), reading each
replica's KV snapshot and request count from `record_routing_stats`. Serve manages the
replicas (health checks, restarts, autoscaling, rolling updates) either way.

A replica starts serving only after its engine has served a warm-up request; `/health`
is 503 until every replica of the cluster has (then 200 while at least one replica can
serve, "degraded" when not all can), and `check_health` fails when the engine is dead, so
Serve replaces the replica and routes around it meanwhile.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from collections import deque
from pathlib import Path

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from cluster import diagnostics
from cluster.config import ClusterConfig
from cluster.metrics import LoopLagMonitor, ReplicaMetrics, render
from cluster.openai_api import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    PromptRenderer,
    StopMatcher,
    completion_body,
    completion_chunk,
    new_id,
    parse_body,
    usage_chunk,
)
from global_scheduler.actor import global_scheduler_handle
from global_scheduler.control import REPORT_PERIOD_S, control_settings
from global_scheduler.reserve import Lease, freshest_lease
from global_scheduler.store import RedisStore, StoreUnavailable
from replicas.engine_settings import XARG_CONFIDENCE, XARG_MAX_TOKENS, XARG_RESERVE, XARG_SLO, XARG_TRACEPARENT
from replicas.engines import EngineDead, RequestShed, make_engine
from replicas.plan import blocks_for
from replicas.slo import SLO_CLASS_NAMES
from replicas.tracing import get_tracer, inject_context

log = logging.getLogger("cacheopt.server")
RANDOM_WEIGHTS_NOTE = "random weights (load_format=dummy): real compute and KV cache, meaningless text"
# Serve asks check_health this often; it replaces a replica after three failures in a row
# (REPLICA_HEALTH_CHECK_UNHEALTHY_THRESHOLD, fixed) or at once when the replica's process
# is gone, which is why a replica with a dead engine ends itself (_watch_engine).
HEALTH_CHECK_PERIOD_S = 2.0
# A dead engine ends its replica (see _watch_engine): checked this often, and the replica's
# streams get up to DEAD_ENGINE_GRACE_S to send their error events before it exits.
ENGINE_WATCH_PERIOD_S = 0.25
DEAD_ENGINE_GRACE_S = 1.0
DEAD_ENGINE_EXIT_CODE = 70  # EX_SOFTWARE: the replica's log says why
FAILURE_WINDOW_S = 10.0  # a replica that failed a request this recently ranks last in routing
MAX_ARRIVALS_BUFFERED = 100_000  # arrivals between two reports to the global scheduler, bounded
MAX_COMPLETIONS_BUFFERED = 2_000  # finished requests between two reports, for online calibration
REQUEST_BLOCKS_SMOOTHING = 0.1
WARM_UP_TIMEOUT_S = 600.0
# Bodies above this are parsed and tokenized in a worker thread, so that one large prompt
# does not stall every stream this replica serves; below it the thread hop costs more.
PARSE_INLINE_BYTES = 16 * 1024


def global_settings(config: ClusterConfig) -> dict:
    """What the global scheduler needs to know of the deployment."""
    p = config.policy
    calibration = (p.calibration_min_samples, p.calibration_window) if p.calibration_min_samples else None
    return control_settings(replicas=config.replicas, p_range=p.p_range, rate_band_rps=p.rate_band_rps,
                            reserve_fraction=p.reserve_fraction, redis_url=config.redis_url, calibration=calibration)


class _ClosingStream(StreamingResponse):
    """A streaming response that always runs `on_close`, also when the client left before
    the body generator started (Starlette then never runs the generator, nor its finally)."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


class _Progress:
    __slots__ = ("arrival", "span", "rid", "prompt", "max_tokens", "slo", "tokens", "first_s", "closed")

    def __init__(self, arrival: float, span, rid: str, prompt: int, max_tokens: int, slo: str):
        self.arrival, self.span, self.rid, self.prompt, self.max_tokens = arrival, span, rid, prompt, max_tokens
        self.slo = slo
        self.tokens, self.first_s, self.closed = 0, None, False


class _Text:
    """A request's output text as it streams: incremental detokenization, then its stop
    sequences (vLLM's semantics: the text ends before the first one, which is not sent).
    Defined above the deployment class: defined below it, the replicas did not find it."""

    def __init__(self, renderer: PromptRenderer, stops: list[str] | None):
        self._decoder = renderer.stream_decoder()
        self._stops = StopMatcher(stops)

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    def step(self, ids: list[int]) -> str:
        return self._stops.feed(self._decoder.step(ids))

    def flush(self) -> str:
        return self._stops.feed(self._decoder.flush()) + self._stops.flush()

    def finish(self, tokens: int, max_tokens: int) -> str:
        return "stop" if self.stopped or tokens < max_tokens else "length"


# No /docs, /redoc or /openapi.json: they describe nothing a client needs and answer anyone.
api = FastAPI(title="CacheOPT", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(StarletteHTTPException)
async def _openai_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Starlette's own 404 and 405 (unknown path, wrong method) with OpenAI's error body."""
    return ApiError(error.status_code, str(error.detail), headers=getattr(error, "headers", None)).response()


@serve.deployment(health_check_period_s=HEALTH_CHECK_PERIOD_S, health_check_timeout_s=10)
@serve.ingress(api)
class LLMServer:
    async def __init__(self, config: dict):
        self.config = ClusterConfig.model_validate(config)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.tracer = get_tracer("cacheopt.server")  # first: the engine process inherits the OTLP settings
        self.engine = make_engine(self.config.engine, self.config.engine_settings())
        self.renderer = PromptRenderer(Path(self.config.engine.model))
        self.metrics = ReplicaMetrics()
        self.in_flight = 0  # requests in the engine (the queue limit counts these)
        self.preparing = 0  # requests whose body is being read, parsed or tokenized
        self.arrivals: deque[float] = deque(maxlen=MAX_ARRIVALS_BUFFERED)
        self.completions: deque[tuple[int, int, str]] = deque(maxlen=MAX_COMPLETIONS_BUFFERED)  # (prompt, output, slo)
        self.confidence = self.config.policy.confidence
        self.lease: Lease | None = None
        self.had_lease = False  # once it had one, an expired lease means a reserve of 0, not the engine's default
        self._api_keys = [k.encode() for k in self.config.api_keys]
        self._trusted_keys = [k.encode() for k in self.config.trusted_api_keys]
        self.loop_lag = LoopLagMonitor()
        self.arrival_rate = 0.0
        self.cluster_ready = False  # every replica has been warm at once (since then: 200 while any can serve)
        self.ready_replicas = 0
        self._scheduler_started_s: float | None = None  # of the scheduler we configured; None: configure it
        self.failures: deque[float] = deque(maxlen=64)
        # What a finished request held in the KV cache here, prompt and output, smoothed (from
        # half a context until requests finish): the router charges it for each request it
        # sends before a snapshot shows that request.
        self.request_blocks = float(blocks_for(self.config.engine.max_model_len // 2, self.config.engine.block_size))
        self.store = RedisStore(self.config.redis_url) if self.config.redis_url else None
        self._global = None
        self._control: asyncio.Task | None = None
        try:
            await asyncio.wait_for(self._warm_up(), WARM_UP_TIMEOUT_S)
        except BaseException:
            await self.engine.shutdown()  # Serve retries the replica: leave no engine process behind
            raise
        self._control = asyncio.get_running_loop().create_task(self._control_loop())
        self._lag_task = asyncio.get_running_loop().create_task(self.loop_lag.run())
        self._watch_task = asyncio.get_running_loop().create_task(self._watch_engine())

    async def _warm_up(self) -> None:
        """One request through the engine before Serve sends traffic: the first real
        request must not pay for compilation and allocation."""
        started = time.time()
        async for _ in self.engine.generate(f"warmup-{self.replica_id}", [5, 6, 7, 8], 2, {XARG_SLO: "batch"}):
            pass
        log.info("replica %s: engine warm after %.1f s", self.replica_id, time.time() - started)

    # -- the control loop: global scheduler and Redis --------------------------------------------

    async def _control_loop(self) -> None:
        while True:
            try:
                await self._report()
            except Exception:  # noqa: BLE001 (the control loop must never stop; say why)
                log.exception("replica %s: control exchange failed", self.replica_id)
            await asyncio.sleep(REPORT_PERIOD_S)

    async def _report(self) -> None:
        snap_dict = self._snapshot_dict()
        if self.store is not None:
            try:
                if snap_dict is not None:
                    await asyncio.to_thread(self.store.publish_snapshot, self.replica_id, snap_dict)
                self._take_lease(await asyncio.to_thread(self.store.lease, self.replica_id))
            except StoreUnavailable:
                pass  # publish again when Redis is back; meanwhile the scheduler's reply carries the lease
            self.metrics.store_errors = sum(self.store.errors.values())
        arrivals, completions = list(self.arrivals), list(self.completions)
        self.arrivals.clear()  # sent once: a report that times out may still arrive, so no resend
        self.completions.clear()
        try:
            scheduler = await self._scheduler()
            if self._scheduler_started_s is None:  # a redeploy's settings reach a scheduler that outlived the old deployment
                await asyncio.wait_for(scheduler.configure.remote(global_settings(self.config)), 5.0)
            reply = await asyncio.wait_for(scheduler.report.remote(
                self.replica_id, arrivals, snap_dict, self._metrics_dict(), self._engine_healthy(),
                completions=completions, length_table_version=self.engine.length_table_version), 5.0)
        except Exception as error:  # noqa: BLE001 (serving goes on with the last p and lease)
            log.warning("global scheduler unavailable (%s); keeping p=%.2f", error, self.confidence)
            self._global, self._scheduler_started_s = None, None
            return
        # A scheduler restarted since we configured it: configure it again next round.
        restarted = self._scheduler_started_s not in (None, reply["started_s"])
        self._scheduler_started_s = None if restarted else reply["started_s"]
        self.confidence, self.arrival_rate = reply["confidence"], reply["arrival_rate_rps"]
        if (lease := reply["lease"]) is not None:
            self._take_lease(Lease(lease["blocks"], lease["epoch"], time.time() + lease["ttl_s"]))
        self._set_readiness(reply["ready_replicas"], reply["expected_replicas"])
        if (table := reply.get("length_table")) is not None:  # online calibration's latest, new to us
            # On the event loop, between steps: the simulated engine's policy runs on this loop and
            # must not change under it (a ~20 KB file write for vLLM's engine).
            self.engine.use_length_table(table["version"], table["table"])

    def _take_lease(self, offered: Lease | None) -> None:
        self.lease = freshest_lease(self.lease, [offered], time.time())
        self.had_lease = self.had_lease or self.lease is not None

    def _reserve_blocks(self) -> int | None:
        """The reserve this replica may hold now: its lease while valid, 0 once a lease
        expired unrenewed (the share may have gone to another replica), None before the
        first lease (the engine keeps its configured reserve)."""
        self.lease = freshest_lease(self.lease, [], time.time())
        if self.lease is not None:
            return self.lease.blocks
        return 0 if self.had_lease else None

    async def _scheduler(self):
        """The global scheduler's handle (looked up off the event loop: it asks Ray's GCS)."""
        if self._global is None:
            self._global = await asyncio.to_thread(global_scheduler_handle, global_settings(self.config))
        return self._global

    def _set_readiness(self, ready: int, expected: int) -> None:
        self.ready_replicas = ready
        self.cluster_ready = self.cluster_ready or ready >= expected

    # -- Serve's hooks ----------------------------------------------------------------------------

    def record_routing_stats(self) -> dict:
        """The KV snapshot for the request router (cluster.router), whether this replica can
        serve (its engine is alive and no request failed here lately), and the requests it
        holds now (cluster.routing: the snapshot does not show those still being prepared)."""
        return {"kv": self._snapshot_dict(), "healthy": self._healthy() and self._engine_healthy(),
                "request_blocks": self.request_blocks, "accepted": self.in_flight + self.preparing,
                "preparing": self.preparing, "read_s": time.time()}

    def _snapshot_dict(self) -> dict | None:
        snap = self.engine.snapshot()
        return None if snap is None else snap.to_dict()

    def check_health(self) -> None:
        self.engine.check_health()  # raises EngineDead (the watch below acts on it sooner)

    async def _watch_engine(self) -> None:
        """A replica whose engine died ends its own process. Serve marks a replica unhealthy
        after three failed `check_health` calls in a row (a fixed threshold: two to three
        health periods) but a crashed replica at its next check, and its router retries a
        dead replica's requests on another one instead of sending them here to fail. The
        streams on the dead engine first send their error events (they end within ms); the
        process ends through `ray.kill` (os._exit if that fails)."""
        while (failure := self._engine_failure()) is None:
            await asyncio.sleep(ENGINE_WATCH_PERIOD_S)
        log.error("replica %s: %s; ending the replica so that Serve replaces it", self.replica_id, failure)
        deadline = time.monotonic() + DEAD_ENGINE_GRACE_S
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        try:  # what is left of the engine goes with us (os._exit runs no atexit hooks)
            await asyncio.wait_for(self.engine.shutdown(), 5.0)
        except Exception as error:  # noqa: BLE001 (exit regardless)
            log.warning("replica %s: engine shutdown failed: %r", self.replica_id, error)
        logging.shutdown()  # flush the replica's log: ray.kill ends the process without clean-up
        try:  # through Ray, which then says the actor was killed, not that its worker crashed unexpectedly
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
            await asyncio.sleep(DEAD_ENGINE_GRACE_S)
        except Exception as error:  # noqa: BLE001 (exit regardless)
            log.warning("replica %s: ray.kill of itself failed: %r", self.replica_id, error)
        os._exit(DEAD_ENGINE_EXIT_CODE)

    def _healthy(self) -> bool:
        return not (self.failures and time.time() - self.failures[-1] < FAILURE_WINDOW_S)

    def _engine_healthy(self) -> bool:
        return self._engine_failure() is None

    def _engine_failure(self) -> str | None:
        """Why the engine cannot serve, or None while it can."""
        try:
            self.engine.check_health()
            return None
        except EngineDead as error:
            return str(error)

    async def __del__(self):
        # Serve calls this also when __init__ failed or was interrupted.
        for task in (getattr(self, "_control", None), getattr(self, "_lag_task", None),
                     getattr(self, "_watch_task", None)):
            if task is not None:
                task.cancel()
        if getattr(self, "engine", None) is not None:
            await self.engine.shutdown()

    # -- a direct path for benchmarks and tests: token ids in, token ids out ----------------------

    async def generate(self, request_id: str, prompt_token_ids: list[int], max_tokens: int, extra_args: dict):
        """The engine call the HTTP path makes, without HTTP and the front's bookkeeping
        (validation, queue limit, lease, metrics): the baseline of `cacheopt overhead`."""
        extra = {XARG_CONFIDENCE: self.confidence, XARG_MAX_TOKENS: max_tokens, **extra_args}
        async for ids in self.engine.generate(request_id, prompt_token_ids, max_tokens, extra):
            yield ids

    def memory_report(self, top: int = 30, holders_of: str | None = None) -> dict:
        """For operators chasing memory (a deployment handle call, not HTTP): see
        cluster.diagnostics.memory_report."""
        return diagnostics.memory_report(top, holders_of)

    # -- HTTP -------------------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> JSONResponse:
        try:
            self.engine.check_health()
        except EngineDead as error:
            return JSONResponse({"status": "unhealthy", "reason": str(error)}, status_code=503)
        if not self.cluster_ready:  # the last report may predate the other replicas' first: ask now
            state = await self._scheduler_state()
            if state is not None:
                self._set_readiness(sum(r["ready"] for r in state["replicas"].values()), state["expected_replicas"])
        if not self.cluster_ready:
            return JSONResponse({"status": "starting", "reason": "not every replica's engine is warm yet"},
                                status_code=503)
        expected = self.config.replicas
        status = "ok" if self.ready_replicas >= expected else "degraded"  # e.g. a replica being replaced
        return JSONResponse({"status": status, "ready_replicas": self.ready_replicas, "replicas": expected,
                             "replica": self.replica_id})

    async def _scheduler_state(self) -> dict | None:
        try:
            return await asyncio.wait_for((await self._scheduler()).state.remote(), 5.0)
        except Exception:  # noqa: BLE001 (the global scheduler is away)
            return None

    def _authorize(self, http: Request) -> bool:
        """vLLM's --api-key convention with OpenAI's error body: 401 unless the request
        carries `Authorization: Bearer <key>` with one of the configured keys, API or
        trusted (none configured: open). Returns whether the key is a trusted one."""
        if not (self._api_keys or self._trusted_keys):
            return False
        scheme, _, token = http.headers.get("authorization", "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        # Every key compared in constant time: the answer's timing says nothing about them.
        if given and sum(hmac.compare_digest(given, key) for key in self._trusted_keys):
            return True
        if not given:
            raise ApiError(401, "You didn't provide an API key. Send it as `Authorization: Bearer KEY`.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not sum(hmac.compare_digest(given, key) for key in self._api_keys):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        return False

    async def _read_body(self, http: Request) -> bytes:
        """The JSON body, refused with 415 for another content type and with 413 as soon
        as it is known to exceed the limit: by its Content-Length before reading any of
        it, or while reading a body of unannounced length."""
        media_type = http.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise ApiError(415, f"Content-Type must be application/json, not {media_type or 'missing'!r}")
        limit = self.config.max_request_body_bytes
        length = http.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise ApiError(400, f"Content-Length {length!r} is not a number")
            if int(length) > limit:
                raise ApiError(413, f"request body of {int(length)} bytes exceeds the limit of {limit} bytes",
                               code="request_too_large")
        chunks, size = [], 0
        async for chunk in http.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes",
                               code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def _key_refused(self, http: Request) -> JSONResponse | None:
        """For the GET endpoints: the 401 to answer, or None."""
        try:
            self._authorize(http)
        except ApiError as error:
            return error.response()
        return None

    @api.get("/v1/models")
    async def models(self, http: Request):
        if (refused := self._key_refused(http)) is not None:
            return refused
        e = self.config.engine
        return {"object": "list", "data": [{
            "id": e.served_model_name, "object": "model", "created": 0, "owned_by": "cacheopt",
            "max_model_len": e.max_model_len,
            "description": RANDOM_WEIGHTS_NOTE if e.random_weights else f"model at {e.model}"}]}

    @api.get("/metrics")
    async def metrics(self, http: Request):
        if self.config.metrics_require_key and (refused := self._key_refused(http)) is not None:
            return refused
        mine = {"metrics": self._metrics_dict(), "snapshot": self._snapshot_dict()}
        state = await self._scheduler_state()
        if state is not None:
            replicas = {**state["replicas"], self.replica_id: mine}  # this replica's own counters are fresher
            confidence, rate = state["confidence"], state["arrival_rate_rps"]
        else:  # without the global scheduler: this replica alone
            replicas, confidence, rate = {self.replica_id: mine}, self.confidence, self.arrival_rate
        return PlainTextResponse(render(replicas, confidence, rate), media_type="text/plain; version=0.0.4")

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, "text")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve(request, "chat")

    def _metrics_dict(self) -> dict:
        # The pid tells operators (and the fault tests) which process serves as this replica.
        return {**self.metrics.as_dict(), **self.loop_lag.as_dict(), "in_flight": self.in_flight + self.preparing,
                "pid": os.getpid(), "length_table_version": self.engine.length_table_version}

    def _refused(self, error: ApiError) -> JSONResponse:
        """A completion request refused before it reached the engine (4xx): counted."""
        if error.status == 429:
            self.metrics.rejected += 1
        else:
            self.metrics.invalid += 1
        return error.response()

    def _prepare(self, raw: bytes, kind: str, trusted: bool) -> tuple:
        """Parse, validate and tokenize: CPU work, run off the event loop for large bodies."""
        body = parse_body(raw, ChatRequest if kind == "chat" else CompletionRequest, trusted=trusted)
        e = self.config.engine
        if body.model != e.served_model_name:
            raise ApiError(404, f"model {body.model!r} does not exist; this server serves "
                                f"{e.served_model_name!r}", param="model", code="model_not_found")
        ids = self.renderer.chat_ids(body) if kind == "chat" else self.renderer.completion_ids(body)
        return body, ids

    async def _serve(self, http: Request, kind: str):
        arrival = time.time()
        self.metrics.requests += 1
        self.preparing += 1
        try:
            trusted = self._authorize(http)
            raw = await self._read_body(http)
            if len(raw) > PARSE_INLINE_BYTES:
                body, ids = await asyncio.to_thread(self._prepare, raw, kind, trusted)
            else:
                body, ids = self._prepare(raw, kind, trusted)
            e = self.config.engine
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
            if self.in_flight >= self.config.max_queued_requests:
                raise ApiError(429, "the server is overloaded; retry later", type_="server_overloaded",
                               headers={"Retry-After": "1"})
        except ApiError as error:
            return self._refused(error)
        except ClientDisconnect:  # left while its body was being read: nobody to answer
            self.metrics.left_early += 1
            return Response(status_code=499)
        except asyncio.CancelledError:  # left while the body was read or parsed (Serve cancels the handler)
            self.metrics.left_early += 1
            raise
        except Exception as error:  # noqa: BLE001 (a bug of ours, never a stack trace to the client, never uncounted)
            log.exception("replica %s: reading a request failed", self.replica_id)
            self.metrics.failed += 1
            return ApiError(500, f"the server failed to read the request ({type(error).__name__})",
                            type_="server_error").response()
        finally:
            self.preparing -= 1
        self.arrivals.append(arrival)  # what the engines are asked to serve: refused requests tune nothing

        rid = new_id("chatcmpl" if kind == "chat" else "cmpl")
        span = self.tracer.start_span("cacheopt.request", attributes={
            "gen_ai.request.id": rid, "gen_ai.request.model": body.model, "gen_ai.request.max_tokens": max_tokens,
            "gen_ai.usage.input_tokens": len(ids), "cacheopt.slo": slo, "cacheopt.replica": self.replica_id})
        # Clients cannot send cacheopt_* keys (parse_body refuses them): these are ours alone.
        extra = {**(body.vllm_xargs or {}), XARG_SLO: slo, XARG_CONFIDENCE: self.confidence,
                 XARG_MAX_TOKENS: max_tokens}
        if (reserve := self._reserve_blocks()) is not None:
            extra[XARG_RESERVE] = reserve
        traceparent = inject_context(span).get("traceparent")
        if traceparent:
            extra[XARG_TRACEPARENT] = traceparent  # the engine's span joins this trace
        sampling = body.sampling()
        self.in_flight += 1
        self.metrics.on_request(len(ids))
        state = _Progress(arrival, span, rid, len(ids), max_tokens, slo)
        stream = self.engine.generate(rid, ids, max_tokens, extra, sampling)
        headers = {"x-cacheopt-replica": self.replica_id}
        # The first tokens decide the status: a request the policy sheds gets 429, not a 200
        # stream that ends in an error.
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            first = []
        except RequestShed:
            return self._shed(state)
        except asyncio.CancelledError:
            await self._close_stream(stream, state, cancelled=True)  # the client left while it waited
            raise
        except (ValueError, TypeError, OverflowError) as error:  # the engine refused what the client sent
            await stream.aclose()
            self.metrics.invalid += 1
            self._close(state)
            return ApiError(400, f"the engine refused the request: {error}").response()
        except Exception as error:  # noqa: BLE001 (an engine failure is a 503, not a stack trace)
            await stream.aclose()
            return self._failed(state, error)
        self._on_tokens(state, first)
        text = _Text(self.renderer, body.stop)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _ClosingStream(self._sse(first, stream, kind, body.model, state, max_tokens, include_usage, text),
                                  lambda: self._close_stream(stream, state, cancelled=True),
                                  media_type="text/event-stream", headers=headers)
        out = [text.step(first)]
        completed = False
        try:
            if not text.stopped:
                async for chunk in stream:
                    self._on_tokens(state, chunk)
                    out.append(text.step(chunk))
                    if text.stopped:
                        break  # closing the stream below aborts the request in the engine
            out.append(text.flush())
            completed = True
        except Exception as error:  # noqa: BLE001 (an engine failure is a 503, not a stack trace)
            return self._failed(state, error)
        finally:  # also on cancellation (the client left): the engine aborts the request
            await self._close_stream(stream, state, cancelled=not completed)
        return JSONResponse(completion_body(kind, rid, body.model, "".join(out), text.finish(state.tokens, max_tokens),
                                            len(ids), state.tokens), headers=headers)

    def _on_tokens(self, state: _Progress, ids: list[int]) -> None:
        if state.first_s is None and ids:
            state.first_s = time.time()
            state.span.add_event("first_token")
            self.metrics.on_first_token(state.first_s - state.arrival)
        state.tokens += len(ids)

    async def _sse(self, first: list[int], stream, kind: str, model: str, state: _Progress, max_tokens: int,
                   include_usage: bool, text: _Text):
        created = int(time.time())
        completed = False

        def event(delta: str, finish: str | None = None) -> str:
            return f"data: {json.dumps(completion_chunk(kind, state.rid, model, created, delta, finish))}\n\n"
        try:
            if delta := text.step(first):
                yield event(delta)
            if not text.stopped:
                async for chunk in stream:  # one list per engine step: one event per step, not per token
                    self._on_tokens(state, chunk)
                    if delta := text.step(chunk):  # empty while a character or a possible stop is incomplete
                        yield event(delta)
                    if text.stopped:
                        break  # the finally below aborts the request in the engine
            yield event(text.flush(), text.finish(state.tokens, max_tokens))
            if include_usage:
                yield f"data: {json.dumps(usage_chunk(kind, state.rid, model, created, state.prompt, state.tokens))}\n\n"
            yield "data: [DONE]\n\n"
            completed = True
        except Exception as error:  # noqa: BLE001 (the stream ends with an OpenAI error event, never [DONE])
            self._record_failure(state, error)
            failure = ApiError(503, f"the engine failed: {type(error).__name__}", type_="server_error")
            yield f"data: {json.dumps(failure.body())}\n\n"
        finally:  # also when the client left (cancelled, or the generator closed): the engine aborts it
            await self._close_stream(stream, state, cancelled=not completed)

    async def _close_stream(self, stream, state: _Progress, *, cancelled: bool) -> None:
        # A client that leaves once every token was generated cost the engine nothing more:
        # nothing is aborted there, and the request counts as finished. (One that leaves
        # after the engine finished at EOS, or before it read outputs the engine had already
        # queued, still counts as cancelled though the engine's abort finds nothing.)
        cancelled = cancelled and state.tokens < state.max_tokens
        try:
            await stream.aclose()  # a no-op when it ended; aborts the request in the engine when it did not
        finally:
            if cancelled and not state.closed:
                state.span.add_event("client_disconnected")
            self._done(state, cancelled=cancelled)

    def _shed(self, state: _Progress) -> JSONResponse:
        """The policy refused the request after a bounded wait: nothing of it is left in
        the engine, and the client may retry (elsewhere, or when the load has passed)."""
        state.span.add_event("shed")
        self.metrics.rejected += 1
        self.metrics.shed += 1
        self._close(state)
        return ApiError(429, "the server could not start this request in time; retry later",
                        type_="server_overloaded", headers={"Retry-After": "1"}).response()

    def _record_failure(self, state: _Progress, error: Exception) -> None:
        log.warning("replica %s: request %s failed after %d tokens: %r", self.replica_id, state.rid, state.tokens, error)
        self.failures.append(time.time())
        self.metrics.failed += 1
        state.span.record_exception(error)
        self._close(state)

    def _failed(self, state: _Progress, error: Exception) -> JSONResponse:
        self._record_failure(state, error)
        return ApiError(503, f"the engine failed: {type(error).__name__}; retry", type_="server_error",
                        headers={"Retry-After": "1"}).response()

    def _done(self, state: _Progress, cancelled: bool = False) -> None:
        if state.closed:
            return
        state.span.set_attribute("gen_ai.usage.output_tokens", state.tokens)
        if cancelled:
            self.metrics.cancelled += 1
        else:
            state.span.add_event("finished")
            self.metrics.on_finish(state.tokens)
            if state.tokens:
                self.completions.append((state.prompt, state.tokens, state.slo))
                # What a request held at its end: the router's charge for each one it sends
                # (max_tokens would be the worst case, several times what most requests hold).
                held = blocks_for(state.prompt + state.tokens, self.config.engine.block_size)
                self.request_blocks += REQUEST_BLOCKS_SMOOTHING * (held - self.request_blocks)
        self._close(state)

    def _close(self, state: _Progress) -> None:
        if not state.closed:
            state.closed = True
            self.in_flight -= 1
            state.span.end()

