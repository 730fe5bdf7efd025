"""`cacheopt bench --target URL`: replay a real trace against any OpenAI-compatible server.

Each request is a streaming `/v1/completions` call whose prompt is the trace's number of
token ids and whose output is forced to the trace's length (`ignore_eos`, vLLM's
extension, which our server honours too), sent at its arrival time. It carries its SLO
class as `slo` to a CacheOPT cluster (whose /v1/models says `owned_by: cacheopt`; it
refuses client `cacheopt_*` arguments) and in `vllm_xargs` to any other server (our
adapter behind a plain vLLM server reads it there; other servers ignore it). Latencies are what a streaming client sees: TTFT
at the first content chunk, gaps between chunks (a chunk carrying k tokens contributes one
gap and k - 1 zero gaps, as vLLM's own benchmark counts them).

A client does not see preemptions: `scrape_preemptions` reads them from the server's
`/metrics` before and after each run (our cluster's `cacheopt_preemptions_total` by mode,
or `vllm serve`'s `vllm:num_preemptions_total`); a server that exports neither (Ray Serve
LLM keeps vLLM's metrics in Ray's) gets NaN, as do which requests were preempted and the
KV utilization, which no server tells a client.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from bench.engine import stream_outcome, trace_prompt_token_ids
from bench.metrics import RequestOutcome, RunStats
from bench.traces import TraceRequest
from replicas.engine_settings import XARG_SLO


@dataclass
class HttpStream:
    request: TraceRequest
    arrival_s: float
    token_times: list[float] = field(default_factory=list)
    finished: bool = False
    status: int = 0
    error: str | None = None
    replica: str | None = None

    @property
    def shed(self) -> bool:
        """Refused with 429 (the policy's bounded wait ran out, or the queues were full)."""
        return self.status == 429


@dataclass(frozen=True)
class Target:
    url: str
    model: str
    cacheopt: bool  # a CacheOPT cluster: the SLO class goes in `slo`, not in vllm_xargs
    headers: dict[str, str] = field(default_factory=dict)


def describe_target(url: str, api_key: str | None = None) -> Target:
    """The server at `url` as its /v1/models describes it (ValueError when it does not answer)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        model = httpx.get(f"{url}/v1/models", headers=headers, timeout=10).json()["data"][0]
        return Target(url, model["id"], model.get("owned_by") == "cacheopt", headers)
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as error:
        raise ValueError(f"{url} does not answer /v1/models: {error!r}") from None


async def replay_http(target: Target, trace: Sequence[TraceRequest], *, vocab_size: int,
                      timeout_s: float = 600.0, on_finish: Callable[[], None] | None = None) -> list[HttpStream]:
    import httpx

    start = time.time() + 0.1
    t0 = trace[0].arrival_s if trace else 0.0
    streams = [HttpStream(r, start + (r.arrival_s - t0)) for r in trace]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=target.url, timeout=timeout_s, limits=limits,
                                 headers=target.headers) as client:
        async def one(index: int, stream: HttpStream) -> None:
            await asyncio.sleep(max(0.0, stream.arrival_s - time.time()))
            r = stream.request
            body = {"model": target.model, "prompt": trace_prompt_token_ids(index, r, vocab_size),
                    "max_tokens": r.output_tokens, "ignore_eos": True, "stream": True, "temperature": 0,
                    "stream_options": {"include_usage": True},
                    **({"slo": r.slo.name} if target.cacheopt else {"vllm_xargs": {XARG_SLO: r.slo.name}})}
            try:
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    stream.status = response.status_code
                    stream.replica = response.headers.get("x-cacheopt-replica")
                    if response.status_code != 200:
                        stream.error = (await response.aread()).decode(errors="replace")[:300]
                        return
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        now = time.time()
                        data = json.loads(line[6:])
                        if "error" in data:
                            stream.error = data["error"].get("message", "error")
                            return
                        for choice in data.get("choices") or []:
                            if choice.get("text"):
                                stream.token_times.append(now)
                            if choice.get("finish_reason"):
                                stream.finished = True
                        usage = data.get("usage")
                        if usage and stream.token_times:
                            # Chunks can carry several tokens: pad with zero gaps to the true count.
                            missing = usage["completion_tokens"] - len(stream.token_times)
                            stream.token_times += [stream.token_times[-1]] * max(0, missing)
            except httpx.HTTPError as error:
                stream.error = f"{type(error).__name__}: {error}"
            finally:
                if on_finish:
                    on_finish()

        await asyncio.gather(*(one(i, s) for i, s in enumerate(streams)))
    return streams


def outcomes_of_http(streams: Sequence[HttpStream]) -> list[RequestOutcome]:
    return [stream_outcome(s) for s in streams]


def http_run_stats(streams: Sequence[HttpStream], preemptions: Mapping[str, int] | None = None) -> RunStats:
    """`preemptions`: the server's during the run, by mode (preemptions_between), or None."""
    start = min((s.arrival_s for s in streams), default=0.0)
    end = max((s.token_times[-1] for s in streams if s.token_times), default=start)
    errors = sum(1 for s in streams if s.error)
    return RunStats(duration_s=end - start, preemptions_by_mode=preemptions, kv_utilization_mean=float("nan"),
                    counters={"errors": errors, "http_429": sum(1 for s in streams if s.status == 429)},
                    per_request_preemptions=False)


# Preemption counters a server may export: (metric, the label naming the mode or None: all
# recompute, as vLLM V1 preempts only by recomputing).
PREEMPTION_COUNTERS = (("cacheopt_preemptions_total", "mode"), ("vllm:num_preemptions_total", None))
# Our cluster's /metrics sums what its replicas last reported, every 0.5 s
# (cluster/metrics.py): wait that long twice before reading it.
CLUSTER_METRICS_LAG_S = 1.0


def parse_preemptions(text: str) -> dict[str, int] | None:
    """Preemptions by mode from Prometheus text exposition, summed over label sets; None
    when no known counter is there."""
    found: dict[str, int] = {}
    for line in text.splitlines():
        for name, mode_label in PREEMPTION_COUNTERS:
            if not line.startswith(name) or line[len(name):len(name) + 1] not in ("{", " "):
                continue
            labels, _, value = line[len(name):].rpartition(" ")
            mode = "recompute"
            if mode_label is not None:
                for pair in labels.strip("{}").split(","):
                    key, _, quoted = pair.partition("=")
                    if key.strip() == mode_label:
                        mode = quoted.strip().strip('"')
            try:
                found[mode] = found.get(mode, 0) + int(float(value))
            except ValueError:
                continue
    return found or None


def scrape_preemptions(target: Target) -> dict[str, int] | None:
    """The server's preemptions so far, by mode, or None where its /metrics does not say."""
    import httpx

    if target.cacheopt:
        time.sleep(CLUSTER_METRICS_LAG_S)
    try:
        response = httpx.get(f"{target.url}/metrics", headers=target.headers, timeout=10)
    except httpx.HTTPError:
        return None
    return parse_preemptions(response.text) if response.status_code == 200 else None


def preemptions_between(before: Mapping[str, int] | None, after: Mapping[str, int] | None) -> dict[str, int] | None:
    if before is None or after is None:
        return None
    return {mode: after.get(mode, 0) - before.get(mode, 0) for mode in after.keys() | before.keys()}
