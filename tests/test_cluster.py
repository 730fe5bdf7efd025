"""The serving cluster on a real local Ray, through the real `openai` client.

One cluster for the module: two replicas on the simulated engine (the real-engine path,
without Redis, is tests/test_cluster_vllm.py), HTTP on a free port, a redis-server of its
own on a free port (killed and restarted by the fault tests), and an OTLP/HTTP receiver in
this process that the replicas' span exporters send to.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
import ray
from cluster_support import RedisServer, free_port, replica_snapshots, scheduler_state, wait_for, wait_until_idle  # noqa: E402
from otlp_sink import SpanSink  # noqa: E402

from cluster.config import load_config  # noqa: E402

pytestmark = pytest.mark.integration
MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def cluster():
    from cluster.ingress import ray_environment
    from cluster.serve import deploy, environment, shutdown

    sink = SpanSink()
    redis_server = RedisServer()
    port = free_port()
    # router: kv behind HAProxy: HAProxy asks the route service, which runs our router.
    config = load_config(port=port, max_queued_requests=6, redis_url=redis_server.url, router="kv",
                         engine={"kind": "sim", "kv_blocks": 96, "max_model_len": 1024},
                         policy={"calibration_min_samples": 20})
    with environment(ray_environment(config)):
        ray.init(address="local", namespace="cacheopt", include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{sink.url}/v1/traces",
                                           "OTEL_BSP_SCHEDULE_DELAY": "100"}})
    base = deploy(config, ready_timeout_s=60)  # /health: every replica warm and reporting
    yield {"base": base, "client": openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0),
           "sink": sink, "config": config, "redis": redis_server}
    shutdown()
    sink.server.shutdown()
    redis_server.kill()


def test_non_streaming_completion_has_text_and_usage(cluster):
    out = cluster["client"].completions.create(model=MODEL, prompt="Tell me about KV caches.", max_tokens=12,
                                               extra_body={"slo": "realtime"})
    assert out.object == "text_completion" and isinstance(out.choices[0].text, str)
    assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens > 0
    assert out.choices[0].finish_reason == "length"


def test_streaming_chat_completion_streams_every_token(cluster):
    stream = cluster["client"].chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=9, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 9
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_streamed_text_is_the_whole_answer(cluster):
    """Incremental detokenization: the streamed pieces join to the non-streamed text (the
    simulated engine writes the same ids for both), with characters whole."""
    client = cluster["client"]
    chunks = list(client.completions.create(model=MODEL, prompt="p", max_tokens=300, stream=True))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    whole = client.completions.create(model=MODEL, prompt="p", max_tokens=300).choices[0].text
    assert streamed == whole and len(whole) > 100
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_health_and_metrics(cluster):
    models = cluster["client"].models.list().data
    assert [m.id for m in models] == [MODEL]
    body = httpx.get(f"{cluster['base']}/v1/models").json()
    assert "random weights" in body["data"][0]["description"]
    assert httpx.get(f"{cluster['base']}/health").json()["status"] == "ok"
    cluster["client"].completions.create(model=MODEL, prompt="warm", max_tokens=2)
    # Every replica reports its counters and snapshot to the global scheduler twice a second.
    def metrics_with_both_replicas():
        text = httpx.get(f"{cluster['base']}/metrics").text
        return text if text.count("cacheopt_reservations_total{replica=") == 2 else None

    text = wait_for(metrics_with_both_replicas, timeout_s=5)
    assert text, httpx.get(f"{cluster['base']}/metrics").text
    for name in ("vllm:request_success_total", "vllm:time_to_first_token_seconds_bucket", "vllm:num_requests_running",
                 "cacheopt_reservations_total", "cacheopt_confidence_p", "cacheopt_arrival_rate_rps",
                 "vllm:kv_cache_usage_perc"):
        assert name in text, name


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b'{"model": "tiny-llama", "prompt": 5}', 400, "prompt"),
    ("/v1/completions", b'{"model": "tiny-llama", "prompt": "x", "max_tokens": -1}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "tiny-llama", "prompt": "x", "max_tokens": 5000}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "gpt-9", "prompt": "x"}', 404, "model"),
    ("/v1/chat/completions", b'{"model": "tiny-llama", "messages": "hi"}', 400, "messages"),
    ("/v1/completions", b'{"model": "tiny-llama", "prompt": "x", "slo": "gold"}', 400, "slo"),
    ("/v1/chat/completions", json.dumps({"model": "tiny-llama", "messages": [{"role": "user", "content": "word " * 3000}]})
     .encode(), 400, "max_tokens"),
])
def test_bad_input_gets_an_openai_error_and_the_server_stays_up(cluster, path, body, status, param):
    response = httpx.post(cluster["base"] + path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and "Traceback" not in response.text
    assert httpx.get(f"{cluster['base']}/health").status_code == 200


def test_memory_report_counts_objects_for_an_operator(cluster):
    """The deployment-handle diagnostic: a replica's RSS, its live Python objects by type,
    and what holds one kind of them (created before Serve froze the replica's startup objects)."""
    from ray import serve

    report = serve.get_deployment_handle("LLMServer", app_name="cacheopt").memory_report.remote(5, "ReplicaMetrics").result()
    assert report["rss_bytes"] > 10 * 2**20 and report["objects"] > 0 and report["frozen_objects"] > 10_000
    assert len(report["by_type"]) == 5 and "dict" in report["by_type"]
    assert "allocations" not in report  # tracemalloc is off unless PYTHONTRACEMALLOC is set
    assert report["holders"] and report["holders"][0][0].startswith("<cluster.metrics.ReplicaMetrics")


def test_overload_gets_429_with_retry_after(cluster):
    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"model": MODEL, "prompt": "x " * 50, "max_tokens": 200}
            return await asyncio.gather(*(client.post(f"{cluster['base']}/v1/completions", json=body)
                                          for _ in range(30)))
    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 12 and 429 in codes  # 2 replicas x 6 queued (the router spreads), the rest refused
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "server_overloaded"


def test_a_client_that_disconnects_frees_its_kv(cluster):
    with httpx.stream("POST", f"{cluster['base']}/v1/completions",
                      json={"model": MODEL, "prompt": "long " * 100, "max_tokens": 900, "stream": True}) as r:
        replica = r.headers["x-cacheopt-replica"]
        next(r.iter_lines())
    snap = wait_until_idle(replica, timeout_s=10)
    assert snap["num_running"] == 0 and snap["counters"].get("abort", 0) >= 1
    assert snap["free_blocks"] + snap["reserve_free_blocks"] == snap["total_blocks"]


def test_routing_sends_requests_past_a_busy_replica(cluster):
    """HAProxy routes by our router (through the route service): while one replica holds a
    long request, small ones go to the other (each after the snapshots have caught up, so
    that the load they report, not the charge for requests in transit, decides)."""
    body = {"model": MODEL, "prompt": list(range(3, 400)), "max_tokens": 600, "stream": True, "slo": "batch"}
    with httpx.stream("POST", f"{cluster['base']}/v1/completions", json=body, timeout=60) as hog:
        full = hog.headers["x-cacheopt-replica"]
        lines = hog.iter_lines()  # kept: a dropped line iterator closes the response, and the request is aborted
        next(lines)
        time.sleep(0.5)  # the routing statistics (every 0.1 s) show it
        routed = []
        for _ in range(3):
            routed.append(cluster["client"].completions.with_raw_response.create(
                model=MODEL, prompt="small", max_tokens=2).headers["x-cacheopt-replica"])
            time.sleep(0.3)
    assert full not in routed and len(set(routed)) == 1, (full, routed)


def test_routing_follows_a_cached_prefix_within_the_slack(cluster):
    """HAProxy forwards the body to the route service, and a prompt that starts with a
    prompt sent before goes where that one went (its prefix is cached there), though that
    replica holds one request more (within cluster.routing.PREFIX_SLACK_REQUESTS); a prompt
    without one goes to the idle replica."""
    prompt = list(range(1000, 1400))
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 600, "stream": True, "slo": "batch"}
    with httpx.stream("POST", f"{cluster['base']}/v1/completions", json=body, timeout=60) as first:
        holder = first.headers["x-cacheopt-replica"]
        lines = first.iter_lines()
        next(lines)
        time.sleep(0.5)  # the routing statistics show it
        follow_up = cluster["client"].completions.with_raw_response.create(
            model=MODEL, prompt=prompt + [7, 8, 9], max_tokens=2).headers["x-cacheopt-replica"]
        other = cluster["client"].completions.with_raw_response.create(
            model=MODEL, prompt=list(range(2000, 2400)), max_tokens=2).headers["x-cacheopt-replica"]
    assert follow_up == holder and other != holder, (holder, follow_up, other)


def test_the_http_bench_replays_a_trace_against_the_cluster(cluster, tmp_path):
    """`cacheopt bench --target` end to end: a short replay of conv, one row per run, the
    preemptions during it read from the cluster's /metrics (a count, not a made-up zero or
    NaN), and what a client cannot see (which requests were preempted, KV use) left empty."""
    from cluster.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "--target", f"ours={cluster['base']}", "--rates", "4", "--limit", "12", "--warmup", "0",
                 "--no-progress", "--out", str(out)]) == 0
    (row,) = json.loads((out / "results.json").read_text())
    assert (row["policy"], row["num_requests"], row["num_finished"]) == ("ours", 12, 12)
    assert isinstance(row["preemptions_total"], float) and row["preemptions_total"] >= 0
    assert row["preempted_requests"] is None and row["kv_utilization_mean"] is None


def concurrent_completions(cluster, count: int, max_tokens: int = 2) -> list[httpx.Response]:
    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"model": MODEL, "prompt": "p", "max_tokens": max_tokens}
            return await asyncio.gather(*(client.post(f"{cluster['base']}/v1/completions", json=body)
                                          for _ in range(count)))
    return asyncio.run(burst())


def test_confidence_from_the_global_scheduler_reaches_the_replicas(cluster):
    for _ in range(3):
        cluster["client"].completions.create(model=MODEL, prompt="p", max_tokens=2)
        time.sleep(0.6)
    p = scheduler_state()["confidence"]
    assert p != cluster["config"].policy.confidence  # a low rate maps to p_max, not the 0.7 default
    # Each replica's snapshot shows the p of the last request it scheduled, so both must
    # serve one; which replica a burst lands on is the router's business, not this test's.
    served: set[str] = set()
    for _ in range(5):
        served |= {r.headers["x-cacheopt-replica"] for r in concurrent_completions(cluster, 6)}
        if len(served) == 2:
            break
    assert len(served) == 2
    assert wait_for(lambda: {s["confidence"] for s in replica_snapshots().values()} == {p}, timeout_s=3)


def test_online_calibration_reaches_every_replicas_engine(cluster):
    """Once the deployment has finished calibration_min_samples requests, the length table
    the global scheduler refitted on them is in use in every replica's engine (and stays
    there when the scheduler restarts, next test)."""
    for _ in range(cluster["config"].policy.calibration_min_samples // 6 + 1):
        assert all(r.status_code == 200 for r in concurrent_completions(cluster, 6))

    def calibrated() -> bool:
        state = scheduler_state()
        versions = [r["metrics"]["length_table_version"] for r in state["replicas"].values()]
        return state["calibration"]["version"] >= 1 and len(versions) == 2 and all(versions)

    assert wait_for(calibrated, timeout_s=5), scheduler_state()["calibration"]


def test_serving_goes_on_when_the_global_scheduler_dies(cluster):
    from global_scheduler.actor import GLOBAL_SCHEDULER, NAMESPACE

    actor = ray.get_actor(GLOBAL_SCHEDULER, namespace=NAMESPACE)
    started = scheduler_state()["started_s"]
    ray.kill(actor, no_restart=False)
    for _ in range(4):
        out = cluster["client"].completions.create(model=MODEL, prompt="still here", max_tokens=3)
        assert out.usage.completion_tokens == 3
        time.sleep(0.3)
    assert scheduler_state()["started_s"] > started
    assert wait_for(lambda: len(scheduler_state()["replicas"]) == 2, timeout_s=5)  # relearned within a report
    assert all(r["metrics"]["length_table_version"] for r in scheduler_state()["replicas"].values())


def test_each_request_is_one_trace(cluster):
    sink = cluster["sink"]
    ids = {cluster["client"].completions.create(model=MODEL, prompt="trace me", max_tokens=3).id for _ in range(2)}

    def request_id(span) -> str:
        return next((a.value.string_value for a in span.attributes if a.key == "gen_ai.request.id"), "")

    # Earlier tests' spans may still be arriving: keep the traces of these two requests.
    roots = wait_for(lambda: [s for s in sink.spans if s.name == "cacheopt.request" and request_id(s) in ids]
                     if len([s for s in sink.spans if s.name == "cacheopt.request" and request_id(s) in ids]) >= 2
                     else None)
    assert roots and len(roots) == 2 and len({r.trace_id for r in roots}) == 2
    for root in roots:
        assert not root.parent_span_id  # the replica's HTTP front starts the trace (the engine's span joins it)
        assert {e.name for e in root.events} >= {"first_token", "finished"}
        attributes = {a.key for a in root.attributes}
        assert {"gen_ai.request.id", "gen_ai.request.max_tokens", "gen_ai.usage.input_tokens",
                "gen_ai.usage.output_tokens", "cacheopt.slo", "cacheopt.replica"} <= attributes


def test_snapshots_and_leases_live_in_redis(cluster):
    cluster["client"].completions.create(model=MODEL, prompt="hello", max_tokens=2)
    client = cluster["redis"].client()
    replicas = sorted(scheduler_state()["replicas"])
    assert len(replicas) == 2
    assert wait_for(lambda: all(client.get(f"cacheopt:snapshot:{r}") for r in replicas))
    assert wait_for(lambda: all(client.get(f"cacheopt:lease:{r}") is not None for r in replicas))
    assert 0 < client.pttl(f"cacheopt:lease:{replicas[0]}") <= 10_000


def test_redis_dies_mid_load_nothing_is_lost_and_leases_reconcile(cluster):
    redis_server = cluster["redis"]

    async def load():
        async with httpx.AsyncClient(timeout=60) as client:
            async def one(i):
                await asyncio.sleep(i * 0.1)
                return await client.post(f"{cluster['base']}/v1/completions",
                                         json={"model": MODEL, "prompt": f"request {i}", "max_tokens": 20})

            async def killer():
                await asyncio.sleep(0.8)
                redis_server.kill()
            results = await asyncio.gather(*(one(i) for i in range(30)), killer())
            return results[:-1]

    responses = asyncio.run(load())
    assert [r.status_code for r in responses] == [200] * 30
    assert all(r.json()["usage"]["completion_tokens"] == 20 for r in responses)
    # Serving went on without Redis (snapshots reach the router through Serve, p and leases
    # through the global scheduler).
    redis_server.start()  # empty: no persistence
    client = redis_server.client()
    cluster["client"].completions.create(model=MODEL, prompt="back", max_tokens=2)
    replicas = sorted(scheduler_state()["replicas"])
    assert wait_for(lambda: all(client.get(f"cacheopt:lease:{r}") is not None
                                and client.get(f"cacheopt:snapshot:{r}") is not None for r in replicas))
    assert int(client.get("cacheopt:lease_epoch")) > 0


def test_a_killed_replica_fails_its_requests_cleanly_and_serving_goes_on(cluster):
    from ray.util import list_named_actors

    with httpx.stream("POST", f"{cluster['base']}/v1/completions",
                      json={"model": MODEL, "prompt": "doomed " * 20, "max_tokens": 900, "stream": True},
                      timeout=60) as response:
        replica = response.headers["x-cacheopt-replica"]
        lines = response.iter_lines()
        next(lines)
        (name,) = [a["name"] for a in list_named_actors(all_namespaces=True) if a["name"].endswith(f"#{replica}")]
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=False)
        try:
            rest = [line for line in lines if line.startswith("data: ")]
        except httpx.HTTPError:
            rest = []  # the connection itself broke: also an end, not a hang
    # The stream ends (an OpenAI error event or a broken connection), never a hang and
    # never a [DONE] after a half-finished answer.
    assert "data: [DONE]" not in rest
    if rest:
        assert json.loads(rest[-1][6:]).get("error", {}).get("type") == "server_error"
    # Serve replaces the replica; requests succeed again.
    assert wait_for(lambda: httpx.post(f"{cluster['base']}/v1/completions",
                                       json={"model": MODEL, "prompt": "after", "max_tokens": 3},
                                       timeout=30).status_code == 200, timeout_s=60, step_s=1.0)


def test_a_killed_route_service_costs_posts_a_503_until_serve_restarts_it(cluster):
    """HAProxy asks the route service for every POST: while it is gone, POSTs get 503 (never
    a hang, and GETs such as /health still go by least connections); Serve restarts it and
    routing goes on."""
    from ray.util import list_named_actors

    (name,) = [a["name"] for a in list_named_actors(all_namespaces=True) if "#KVRouteService#" in a["name"]]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=False)
    body = {"model": MODEL, "prompt": "route me", "max_tokens": 2}
    killed = time.time()
    codes = []

    def served():
        codes.append(httpx.post(f"{cluster['base']}/v1/completions", json=body, timeout=30).status_code)
        return codes[-1] == 200
    assert wait_for(served, timeout_s=60, step_s=0.2), codes
    assert set(codes) <= {200, 503}, codes
    assert httpx.get(f"{cluster['base']}/health", timeout=10).status_code == 200
    print(f"route service killed: {codes.count(503)} POSTs got 503, served again after {time.time() - killed:.1f} s")


def test_older_lease_epochs_are_refused_and_leases_expire(cluster):
    from global_scheduler.store import RedisStore

    store = RedisStore(cluster["redis"].url)
    epoch = store.epoch()
    assert store.set_leases(epoch + 100, {"x": 7}) == epoch + 100
    assert store.set_leases(epoch + 50, {"x": 1}) == epoch + 100  # a stale scheduler loses
    assert store.lease("x").blocks == 7
    client = cluster["redis"].client()
    assert 0 < client.pttl("cacheopt:lease:x") <= 10_000
    client.pexpire("cacheopt:lease:x", 1)
    assert wait_for(lambda: store.lease("x") is None, timeout_s=2)


def test_zz_a_replica_that_is_gone_loses_its_lease(cluster):
    """Last in the module: scales the application in to one replica. The global scheduler
    stops renewing the departed replica's lease, and Redis expires it."""
    from ray import serve

    from cluster.app import build_app
    from cluster.ingress import driver_agrees_on_haproxy
    from cluster.serve import APP_NAME
    from global_scheduler.control import REPLICA_SILENT_S
    from global_scheduler.store import LEASE_TTL_S

    client = cluster["redis"].client()
    assert wait_for(lambda: len(client.keys("cacheopt:lease:*")) >= 2)
    smaller = cluster["config"].model_copy(update={"replicas": 1})
    with driver_agrees_on_haproxy(smaller):
        serve.run(build_app({"config_dict": smaller.model_dump()}), name=APP_NAME, route_prefix="/")
    (kept,) = wait_for(lambda: list(scheduler_state()["replicas"]) if len(scheduler_state()["replicas"]) == 1
                       else None, timeout_s=REPLICA_SILENT_S + 5)

    def only_the_kept_lease():
        cluster["client"].completions.create(model=MODEL, prompt="keep going", max_tokens=2)
        return [k.decode() for k in client.keys("cacheopt:lease:*")] == [f"cacheopt:lease:{kept}"]
    assert wait_for(only_the_kept_lease, timeout_s=LEASE_TTL_S + 10, step_s=0.5)
