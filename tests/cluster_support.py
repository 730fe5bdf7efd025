"""What the cluster tests share: a redis-server of a test's own on a free loopback port
(never the machine's 6379), optionally with a password, killed and restarted by the fault
tests; free ports; waiting for a condition; the global scheduler's view of the replicas."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from cluster.serve import free_port  # noqa: F401 (the tests import it from here)


class RedisServer:
    def __init__(self, *, password: str | None = None, start: bool = True, host: str = "127.0.0.1"):
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
        self.port = free_port()
        self.password = password
        self.host = host  # another loopback address (127.0.0.2) plays a machine of a multi-node test
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}{host}:{self.port}/0"
        self.process: subprocess.Popen | None = None
        if start:
            self.start()

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        import redis

        client = self.client()
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def client(self):
        import redis

        return redis.Redis(host=self.host, port=self.port, password=self.password)


def wait_for(predicate, timeout_s: float = 10.0, step_s: float = 0.1):
    """The predicate's first truthy value within the timeout, else its last value."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step_s)
    return predicate()


def scheduler_state() -> dict:
    """The global scheduler's state (every replica's last report, leases, p)."""
    import ray

    from global_scheduler.actor import GLOBAL_SCHEDULER, NAMESPACE

    return ray.get(ray.get_actor(GLOBAL_SCHEDULER, namespace=NAMESPACE).state.remote())


def replica_snapshots() -> dict[str, dict]:
    """Each live replica's KV snapshot as it last reported it (at most 0.5 s old)."""
    return {name: r["snapshot"] for name, r in scheduler_state()["replicas"].items() if r["snapshot"]}


def wait_until_idle(replica: str, *, timeout_s: float) -> dict:
    """`replica`'s snapshot once nothing runs or waits there (or at the timeout), taken
    after this call."""
    since = time.time()
    deadline = since + timeout_s
    while True:
        snap = replica_snapshots().get(replica)
        if (snap and snap["taken_s"] > since and snap["num_running"] == 0 and snap["num_waiting"] == 0) \
                or time.time() >= deadline:
            return snap
        time.sleep(0.1)
