"""A real multi-node Ray cluster on loopback: a head and a worker node started with `ray
start` (two raylets on this machine, at the loopback addresses 127.0.0.2 and 127.0.0.3 as
two machines would have two addresses), one serving replica on each through a custom
resource, Redis on the "head" (127.0.0.2) reached by every node, leases and snapshots
flowing across nodes; then the worker node dies (its raylet SIGKILLed, as a lost
machine): its replica's traffic goes to the head's replica and its lease expires."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import openai
import psutil
import pytest
import ray
from cluster_support import RedisServer, free_port, scheduler_state, wait_for

from cluster.config import load_config
from global_scheduler.control import REPLICA_SILENT_S
from global_scheduler.store import LEASE_TTL_S

pytestmark = pytest.mark.integration
MODEL = "tiny-llama"
RAY = str(Path(sys.executable).with_name("ray"))


HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"  # loopback, but not 127.0.0.1, which Ray rewrites


def _ray_start(ip: str, *args: str) -> None:
    """A node at `ip` with ports of its own (two nodes on one machine must not share the
    agent's). RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (tests/conftest.py) would refuse a second
    node; with it on, Ray rewrites 127.0.0.1 (never 127.0.0.2) to the machine's address."""
    # Token authentication off, explicitly: Ray 2.60 turns it on for a new head when
    # ~/.ray/auth_token exists and off for a joining node (the ray up YAMLs set it on all).
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([RAY, "start", f"--node-ip-address={ip}", "--disable-usage-stats",
                           f"--dashboard-agent-listen-port={free_port()}", "--min-worker-port=0", "--max-worker-port=0",
                           *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def _raylet_of(node_manager_port: int) -> psutil.Process:
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or ())
        if "raylet" in cmdline and f"--node_manager_port={node_manager_port}" in cmdline:
            return process
    raise LookupError(f"no raylet on node manager port {node_manager_port}")


@pytest.fixture(scope="module")
def two_nodes():
    from ray import serve

    from cluster.serve import deploy, shutdown, stop_ray_cluster

    gcs_port, worker_port, http_port = free_port(), free_port(), free_port()
    redis_server = RedisServer(host=HEAD_IP)
    try:
        _ray_start(HEAD_IP, "--head", f"--port={gcs_port}", "--num-cpus=2", "--include-dashboard=false",
                   '--resources={"replica_slot": 1, "head": 1}')
        _ray_start(WORKER_IP, f"--address={HEAD_IP}:{gcs_port}", "--num-cpus=2", f"--node-manager-port={worker_port}",
                   '--resources={"replica_slot": 1, "worker": 1}')
        ray.init(address=f"{HEAD_IP}:{gcs_port}", namespace="cacheopt", log_to_driver=False,
                 _node_ip_address=HEAD_IP)  # this driver runs on the head's machine
        config = load_config(port=http_port, ray_address=f"{HEAD_IP}:{gcs_port}", redis_url=redis_server.url,
                             replica_resources={"replica_slot": 1}, proxy_location="HeadOnly", ingress="serve-proxy",
                             engine={"kind": "sim", "kv_blocks": 96, "max_model_len": 1024})
        base = deploy(config, ready_timeout_s=180)
        yield {"base": base, "redis": redis_server, "worker_port": worker_port,
               "client": openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)}
    finally:
        try:
            serve.shutdown()
        except Exception:  # noqa: BLE001 (never started, or the node is gone)
            pass
        shutdown()
        stop_ray_cluster(gcs_port)  # never `ray stop`: it would stop every Ray on the machine
        redis_server.kill()


def test_replicas_on_both_nodes_share_leases_and_snapshots_through_redis(two_nodes):
    assert sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]) == [HEAD_IP, WORKER_IP]
    # Each node offers one replica slot and both are taken: one replica per node.
    assert ray.cluster_resources()["replica_slot"] == 2 and ray.available_resources().get("replica_slot", 0) == 0
    client = two_nodes["redis"].client()

    def keys(kind: str) -> set[bytes]:
        return set(client.scan_iter(f"cacheopt:{kind}:*"))
    assert wait_for(lambda: len(keys("snapshot")) == 2 and len(keys("lease")) == 2, 10), (keys("snapshot"),
                                                                                            keys("lease"))
    for key in keys("snapshot"):
        snapshot = json.loads(client.get(key))
        assert snapshot["total_blocks"] == 95
    for _ in range(8):
        out = two_nodes["client"].completions.create(model=MODEL, prompt="across nodes", max_tokens=4)
        assert out.usage.completion_tokens == 4


def test_a_lost_worker_node_sends_its_traffic_to_the_head_and_its_lease_expires(two_nodes):
    client = two_nodes["redis"].client()
    leases_before = set(client.scan_iter("cacheopt:lease:*"))
    raylet = _raylet_of(two_nodes["worker_port"])
    for process in [*raylet.children(recursive=True), raylet]:  # the machine is gone, with every process on it
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    lost = time.time()
    # Every request from now on is served (by the head's replica), at most after Serve's
    # proxy notices the dead replica.
    statuses = []
    while time.time() - lost < 20:
        try:
            out = two_nodes["client"].completions.create(model=MODEL, prompt="after the loss", max_tokens=3,
                                                         timeout=10)
            statuses.append(out.usage.completion_tokens == 3)
        except openai.APIError as error:
            statuses.append(repr(error))
        time.sleep(0.2)
    first_ok = statuses.index(True)
    assert all(s is True for s in statuses[first_ok:]), statuses
    assert first_ok <= 10, statuses  # a few seconds at most while Serve learns of the loss
    # The lost replica's lease expires in Redis, and the global scheduler stops counting it.
    gone = wait_for(lambda: len(set(client.scan_iter("cacheopt:lease:*"))) < len(leases_before),
                    LEASE_TTL_S + REPLICA_SILENT_S + 5)
    assert gone, set(client.scan_iter("cacheopt:lease:*"))
    assert wait_for(lambda: len(scheduler_state()["replicas"]) == 1, REPLICA_SILENT_S + 5)
