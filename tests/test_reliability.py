"""The cluster exposed: API keys, hostile input, Redis faults and a short soak, on a real
local Ray with two simulated-engine replicas and a password-protected redis-server of its
own (started only after the cluster, so the cluster also starts with Redis down).

The fault tests write what they measured (recovery times, failed requests) to
reports/reliability/faults.json; docs/RESULTS.md section 6 quotes it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from cluster_support import (  # noqa: E402
    RedisServer,
    free_port,
    replica_snapshots,
    scheduler_state,
    wait_for,
    wait_until_idle,
)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cluster.config import load_config  # noqa: E402

pytestmark = pytest.mark.integration
MODEL = "tiny-llama"
KEYS = ("key-one", "key-two")
TRUSTED_KEY = "gateway"  # may forward output-length predictions
AUTH = {"Authorization": f"Bearer {KEYS[0]}"}
REDIS_PASSWORD = "s3cret pass"  # a space: the URL must carry it escaped
FAULTS_REPORT = Path(__file__).resolve().parents[1] / "reports" / "reliability" / "faults.json"


@pytest.fixture(scope="module")
def secured():
    from urllib.parse import quote

    from cluster.serve import deploy, shutdown

    redis_server = RedisServer(password=REDIS_PASSWORD, start=False)  # down at start
    redis_server.url = f"redis://:{quote(REDIS_PASSWORD)}@127.0.0.1:{redis_server.port}/0"
    port = free_port()
    config = load_config(port=port, redis_url=redis_server.url, api_keys=list(KEYS), trusted_api_keys=[TRUSTED_KEY],
                         metrics_require_key=True,
                         max_queued_requests=64, engine={"kind": "sim", "kv_blocks": 256, "max_model_len": 1024})
    base = deploy(config, ready_timeout_s=60)  # with the default ingress, HAProxy
    faults: dict = {}
    yield {"base": base, "config": config, "redis": redis_server, "faults": faults,
           "client": openai.OpenAI(base_url=f"{base}/v1", api_key=KEYS[1], max_retries=0)}
    shutdown()
    redis_server.kill()
    FAULTS_REPORT.parent.mkdir(parents=True, exist_ok=True)
    FAULTS_REPORT.write_text(json.dumps(faults, indent=1))


def metrics(base: str) -> dict[str, float]:
    from bench.soak import read_metrics

    return read_metrics(httpx.get(f"{base}/metrics", headers=AUTH).text)


def test_aa_serving_starts_with_redis_down_and_coordination_follows_it_up(secured):
    """First: the cluster came up while its Redis was down, and serves; once Redis is up,
    snapshots and leases are in it within two exchanges (report period 0.5 s)."""
    from global_scheduler.control import REPORT_PERIOD_S

    out = secured["client"].completions.create(model=MODEL, prompt="no redis yet", max_tokens=3)
    assert out.usage.completion_tokens == 3
    secured["redis"].start()
    started = time.time()
    client = secured["redis"].client()
    replicas = sorted(scheduler_state()["replicas"])
    assert len(replicas) == 2
    assert wait_for(lambda: all(client.get(f"cacheopt:lease:{r}") and client.get(f"cacheopt:snapshot:{r}")
                                for r in replicas), timeout_s=10, step_s=0.05)
    secured["faults"]["redis down at start: seconds until leases and snapshots are in Redis"] = round(
        time.time() - started, 2)
    secured["faults"]["report period s"] = REPORT_PERIOD_S


def test_redis_takes_acl_users_and_a_wrong_password_fails_the_deploy_clearly():
    from cluster.app import build_app
    from global_scheduler.store import RedisStore, StoreConfigError, StoreUnavailable

    server = RedisServer(password="admin-pw")
    try:
        server.client().execute_command("ACL", "SETUSER", "cacheopt", "on", ">user-pw", "~cacheopt:*", "+@all")
        url = f"redis://cacheopt:user-pw@127.0.0.1:{server.port}/0"
        store = RedisStore(url)
        store.check()
        store.publish_snapshot("r", {"a": 1})
        assert store.snapshots(["r"]) == {"r": {"a": 1}}
        for bad in (f"redis://cacheopt:wrong@127.0.0.1:{server.port}/0", f"redis://127.0.0.1:{server.port}/0"):
            with pytest.raises(StoreConfigError, match="refused the credentials") as caught:
                RedisStore(bad).check()
            assert "wrong" not in str(caught.value)  # the password never reaches a log line
            with pytest.raises(StoreConfigError, match="refused the credentials"):
                build_app({"config_dict": load_config(redis_url=bad, engine={"kind": "sim"}).model_dump()})
        # A key outside the user's ACL: refused (NOPERM), counted, survived.
        with pytest.raises(StoreUnavailable):
            store._call(store._redis.set, "elsewhere", 1)
        assert store.errors["NoPermissionError"] == 1
    finally:
        server.kill()


def test_redis_over_tls_with_a_password(tmp_path):
    """`rediss://` with the CA as redis-py's URL option, against a redis-server with TLS
    only (no plain port) and a password."""
    import subprocess

    from global_scheduler.store import RedisStore

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", "0", "--tls-port", str(port), "--tls-cert-file", cert,
                               "--tls-key-file", key, "--tls-ca-cert-file", cert, "--tls-auth-clients", "no",
                               "--requirepass", "tls-pw", "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL)
    try:
        store = RedisStore(f"rediss://:tls-pw@127.0.0.1:{port}/0?ssl_ca_certs={cert}")

        def answers() -> bool:
            try:
                return store._redis.ping()
            except Exception:  # noqa: BLE001 (not listening yet)
                return server.poll() is not None  # or it died: fail below, not here
        assert wait_for(answers, timeout_s=10) and server.poll() is None
        store.check()
        store.publish_snapshot("r", {"tls": True})
        assert store.snapshots(["r"]) == {"r": {"tls": True}}
    finally:
        server.kill()
        server.wait()


def test_keys_are_required_where_configured(secured):
    base = secured["base"]
    assert httpx.get(f"{base}/health").status_code == 200  # open: load balancers probe it
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(f"{base}{path}").status_code == 401
        assert httpx.get(f"{base}{path}", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(f"{base}{path}", headers=AUTH).status_code == 200
    refused = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert refused.headers["www-authenticate"] == "Bearer"
    bad_client = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_client.completions.create(model=MODEL, prompt="x", max_tokens=1)
    for key in KEYS:  # every configured key works
        good = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
        assert good.completions.create(model=MODEL, prompt="x", max_tokens=1).usage.completion_tokens == 1


def _listening(processes) -> set[tuple[str, int]]:
    import psutil

    found = set()
    for process in processes:
        try:
            found |= {(c.laddr.ip, c.laddr.port) for c in process.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue  # gone meanwhile (an HAProxy reload)
    return found


def test_haproxy_listens_on_loopback_only_and_the_replicas_own_ports_need_a_key(secured):
    """The default ingress: HAProxy in front, each replica serving HTTP on a port of its own
    (Ray's direct-ingress range). Nothing of it may listen beyond the cluster's loopback
    host, and a client that finds a replica's port directly still needs a key."""
    import psutil
    from ray.serve._private.constants import (
        RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT,
        RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT,
    )

    ours = psutil.Process().children(recursive=True)  # this test's Ray, not another on the machine
    haproxy = _listening(p for p in ours if p.name() == "haproxy")
    assert ("127.0.0.1", secured["config"].port) in haproxy
    assert {ip for ip, _ in haproxy} == {"127.0.0.1"}, haproxy  # its stats page and exporter too
    replica_ports = {port for ip, port in _listening(p for p in ours if "ServeReplica" in " ".join(p.cmdline()))
                     if RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT <= port <= RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT
                     and ip == "127.0.0.1"}
    assert len(replica_ports) == 2
    for port in replica_ports:
        direct = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{direct}/v1/models").status_code == 401
        assert httpx.get(f"{direct}/v1/models", headers=AUTH).status_code == 200


def test_every_hostile_request_gets_a_4xx_and_the_server_stays_up(secured):
    from bench.hostile import catalogue, run_catalogue
    from bench.http_bench import Target

    cases = catalogue(MODEL, body_limit=secured["config"].max_request_body_bytes)
    assert len(cases) >= 30
    time.sleep(1.1)  # the earlier tests' refusals reach /metrics within two report periods
    invalid_before = metrics(secured["base"])["cacheopt_requests_invalid_total"]
    outcomes = run_catalogue(Target(secured["base"], MODEL, True, AUTH), cases, api_key=KEYS[0])
    bad = [(o.case.name, o.status, o.detail) for o in outcomes if not o.ok]
    assert not bad
    assert httpx.get(f"{secured['base']}/health").json()["status"] == "ok"
    assert secured["client"].completions.create(model=MODEL, prompt="still fine", max_tokens=2).usage.completion_tokens == 2
    # Each refusal by a completions endpoint is counted (within a report period, 0.5 s).
    served = sum(c.method == "POST" and c.path.endswith("completions") for c in cases)
    assert wait_for(lambda: metrics(secured["base"])["cacheopt_requests_invalid_total"] - invalid_before == served,
                    timeout_s=3)


def test_large_bodies_are_refused_while_streams_go_on(secured):
    from bench.hostile import large_bodies
    from bench.http_bench import Target

    result = asyncio.run(large_bodies(Target(secured["base"], MODEL, True, AUTH), api_key=KEYS[0],
                                      body_limit=secured["config"].max_request_body_bytes, duration_s=3))
    assert result["statuses"] == {"10 MB announced": [413], "10 MB chunked": [413], "prompt near the limit": [400],
                                  "ordinary stream": [200]}
    # The event-loop lag is a figure (`cacheopt hostile`, docs/RESULTS.md 6), not a timed assertion here.


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
                     lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                                        max_size=4), max_leaves=12)


def _fields(model_cls) -> dict:
    """Each field of the request model: values of its own kind or any JSON at all."""
    return {name: _json for name in model_cls.model_fields if name not in ("model", "stream")}


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_requests_never_get_a_5xx(secured, data):
    """Property: whatever JSON a client sends to the completion endpoints, the answer is a
    2xx or a 4xx with OpenAI's error body, never a 5xx. Bodies are drawn over the request
    models' own fields (from the pydantic models), valid and invalid values mixed."""
    from cluster.openai_api import ChatRequest, CompletionRequest

    chat = data.draw(st.booleans())
    model_cls = ChatRequest if chat else CompletionRequest
    base = {"model": MODEL, "max_tokens": data.draw(st.integers(1, 4) | _json)}
    if chat:
        base["messages"] = data.draw(st.lists(st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "tool"]) | _json,
             "content": st.text(max_size=30) | _json}), min_size=0, max_size=3) | _json)
    else:
        base["prompt"] = data.draw(st.text(max_size=30) | st.lists(st.integers(-5, 40_000), max_size=5) | _json)
    extra = data.draw(st.dictionaries(st.sampled_from(sorted(_fields(model_cls))), _json, max_size=3))
    body = {**base, **extra}
    body.pop("stream", None)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    response = httpx.post(f"{secured['base']}{path}", json=body, headers=AUTH, timeout=30)
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        assert {"message", "type"} <= set(response.json()["error"])


def test_stop_sequences_end_the_text_before_them(secured):
    """The simulated engine writes a fixed sequence of token ids; a stop sequence taken
    from its middle ends the answer right before it, streamed or not, with finish 'stop'."""
    from cluster.openai_api import PromptRenderer

    renderer = PromptRenderer(Path(secured["config"].engine.model_dir))
    whole = renderer.decode([3 + i for i in range(40)])
    stop = whole[len(whole) // 2: len(whole) // 2 + 3]
    expected = whole[:whole.index(stop)]
    client = secured["client"]
    plain = client.completions.create(model=MODEL, prompt="x", max_tokens=40, stop=[stop, "never-seen"])
    assert plain.choices[0].text == expected and plain.choices[0].finish_reason == "stop"
    assert plain.usage.completion_tokens < 40  # the engine stopped early
    streamed = client.completions.create(model=MODEL, prompt="x", max_tokens=40, stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == expected and chunks[-1].choices[0].finish_reason == "stop"


def test_clients_cannot_set_the_reserve_and_no_replica_exceeds_its_lease(secured):
    response = httpx.post(f"{secured['base']}/v1/completions", headers=AUTH, json={
        "model": MODEL, "prompt": "x", "vllm_xargs": {"cacheopt_reserve_blocks": 200}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "vllm_xargs"
    for _ in range(6):
        secured["client"].completions.create(model=MODEL, prompt="load", max_tokens=4)

    def within_leases() -> bool:
        state = scheduler_state()
        snaps = {name: r["snapshot"] for name, r in state["replicas"].items() if r["snapshot"]}
        return len(snaps) == 2 and all(s["reserve_target_blocks"] <= state["leases"][name] for name, s in snaps.items())
    assert wait_for(within_leases, timeout_s=5)


def test_a_request_that_cannot_start_in_time_gets_429_and_leaves_nothing(secured):
    """Realtime requests (TTFT 1 s) queued behind long ones are shed by the replicas'
    policy after twice their TTFT, streamed or not: 429 with Retry-After, never a 200 that
    ends in an error; the served ones complete; the replicas end with nothing queued. Each
    is predicted to write 900 tokens (a prediction only a trusted client may forward), so
    about eight fit a replica's 256 blocks at once and each takes seconds."""
    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            def body(i):
                return {"model": MODEL, "prompt": "x " * 50, "max_tokens": 900, "slo": "realtime",
                        "stream": bool(i % 2), "ignore_eos": True,
                        "vllm_xargs": {"cacheopt_point_tokens": 900, "cacheopt_bound_tokens": 900}}
            return await asyncio.gather(*(client.post(f"{secured['base']}/v1/completions", json=body(i),
                                                      headers={"Authorization": f"Bearer {TRUSTED_KEY}"})
                                          for i in range(40)))
    responses = asyncio.run(burst())
    shed = [r for r in responses if r.status_code == 429 and "in time" in r.json()["error"]["message"]]
    assert shed and all(r.headers["retry-after"] == "1" for r in shed)
    assert {r.status_code for r in responses} <= {200, 429} and any(r.status_code == 200 for r in responses)
    metrics = httpx.get(f"{secured['base']}/metrics", headers=AUTH).text
    assert any(line.startswith("cacheopt_requests_shed_total") and float(line.split()[-1]) >= len(shed)
               for line in metrics.splitlines())
    replicas = sorted(replica_snapshots())
    assert len(replicas) == 2
    for replica in replicas:
        snap = wait_until_idle(replica, timeout_s=20)
        assert snap["num_waiting"] == 0 and snap["num_running"] == 0
        assert snap["free_blocks"] + snap["reserve_free_blocks"] == snap["total_blocks"]
    assert sum(s["counters"].get("shed", 0) for s in replica_snapshots().values()) >= len(shed)


async def _steady_load(base: str, seconds: float, rate: float = 10.0) -> list[int]:
    """Streaming completions at `rate` per second for `seconds`: every status (0: broken)."""
    async with httpx.AsyncClient(timeout=60, headers=AUTH) as client:
        async def one(i: int) -> int:
            await asyncio.sleep(i / rate)
            body = {"model": MODEL, "prompt": f"steady {i}", "max_tokens": 6, "stream": True}
            try:
                async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
                    lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                    return r.status_code if lines and lines[-1] == "data: [DONE]" else -r.status_code
            except httpx.HTTPError:
                return 0
        return await asyncio.gather(*(one(i) for i in range(int(seconds * rate))))


@pytest.mark.parametrize("fault", ["read-only", "out of memory", "NOAUTH", "bad values", "killed"])
def test_redis_faults_fail_no_request_and_control_recovers(secured, fault):
    """During each Redis fault requests keep succeeding (0 failed) and the store counts the
    errors; after it, the scheduler's lease writes resume within two exchanges."""
    redis_server = secured["redis"]
    admin = redis_server.client()
    replicas = sorted(scheduler_state()["replicas"])
    errors_before = metrics(secured["base"]).get("cacheopt_store_errors_total", 0.0)
    stop = threading.Event()
    if fault == "read-only":  # a replica of a master that is not there: every write fails with READONLY
        admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
    elif fault == "out of memory":
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", "1")
    elif fault == "NOAUTH":  # the password changes and the connections drop: every reconnect is refused
        import redis

        admin.config_set("requirepass", "changed")
        admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        admin = redis.Redis(port=redis_server.port, password="changed")
    elif fault == "bad values":  # written over and over, so that the replicas read them between the scheduler's writes
        def vandal():
            while not stop.is_set():
                for r in replicas:
                    admin.set(f"cacheopt:lease:{r}", b"\xff not json", px=3000)
                admin.set("cacheopt:lease_epoch", "garbage")
                time.sleep(0.02)
        threading.Thread(target=vandal, daemon=True).start()
    else:
        redis_server.kill()
    statuses = asyncio.run(_steady_load(secured["base"], seconds=3))
    stop.set()
    time.sleep(0.1)
    if fault == "killed":
        redis_server.start()
    elif fault == "read-only":
        admin.execute_command("REPLICAOF", "NO", "ONE")
    elif fault == "out of memory":
        admin.config_set("maxmemory", "0")
    elif fault == "NOAUTH":
        admin.config_set("requirepass", REDIS_PASSWORD)
    elif fault == "bad values":
        admin.set("cacheopt:lease_epoch", "0")
    restored = time.time()
    admin = redis_server.client()
    admin.delete(*[f"cacheopt:lease:{r}" for r in replicas])  # the next write puts them back

    def leases_back() -> bool:
        values = [admin.get(f"cacheopt:lease:{r}") for r in replicas]
        return all(v is not None and json.loads(v)["epoch"] > 0 for v in values)
    assert wait_for(leases_back, timeout_s=10, step_s=0.05)
    recovery_s = time.time() - restored
    errors_after = metrics(secured["base"]).get("cacheopt_store_errors_total", 0.0)
    failed = sum(s != 200 for s in statuses)
    secured["faults"][fault] = {"requests": len(statuses), "failed": failed, "recovery_s": round(recovery_s, 2),
                                "store_errors": errors_after - errors_before}
    assert failed == 0, statuses
    assert errors_after > errors_before  # seen, counted and survived


def test_zz_a_short_soak_leaves_the_books_balanced_and_nothing_behind(secured):
    """The long soak's short form (docs/RESULTS.md 6 has the 20-minute one): 30 s at 8
    req/s with 20% of clients leaving early and 10% reading slowly."""
    from bench.http_bench import Target
    from bench.soak import SoakSpec, soak

    spec = SoakSpec(duration_s=30, rate_rps=8, disconnect_share=0.2, slow_share=0.1, output_tokens=(8, 64),
                    rss_period_s=2.0)
    result = asyncio.run(soak(Target(secured["base"], MODEL, True, AUTH), spec))
    server, idle = result["server"], result["idle"]
    # Books exact; every engine abort is a cancellation (a client can leave after the engine
    # finished, which aborts nothing: see bench/soak.py), and nothing is left in any engine.
    assert result["books_balance"] and 0 <= result["cancelled_after_the_engine_finished"] <= server["cancelled"], \
        json.dumps({"server": server, "client": result["client_outcomes"], "idle": idle})
    assert idle == {"in_flight": 0, "running": 0, "waiting": 0, "kv_usage": 0}, result
    assert server["failed"] == 0 and server["cancelled"] > 0 and server["finished"] > 0, result
    assert sum(result["client_outcomes"].values()) == result["sent"], result
