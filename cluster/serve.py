"""`cacheopt serve`: start (or join) Ray, deploy the application, serve until interrupted."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cluster.config import ClusterConfig
from cluster.ingress import driver_agrees_on_haproxy, ray_environment

APP_NAME = "cacheopt"


def start_ray(config: ClusterConfig) -> None:
    import ray

    # Keep a local Ray on loopback; never on Redis's port 6379 (ray.init picks free ports).
    # address="local": always a new Ray of our own, never one that `ray start` left named in
    # /tmp/ray/ray_current_cluster (which ray.init() would join, or hang on if it is gone).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if ray.is_initialized():
        return
    if config.ray_address:
        ray.init(address=config.ray_address, namespace="cacheopt", log_to_driver=False)
    else:
        with environment(ray_environment(config)):  # Ray's processes inherit it; this process keeps its own
            ray.init(address="local", namespace="cacheopt", include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1")


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ for the block, the previous environment after it (so that a
    Ray started later in this process, or a subprocess, does not inherit them)."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def deploy(config: ClusterConfig, *, ready_timeout_s: float = 600.0, stop: threading.Event | None = None) -> str:
    """Deploy the application and wait until `/health` is OK (every replica's engine has
    served its warm-up request); returns the base URL."""
    from ray import serve

    from cluster.app import build_app

    start_ray(config)
    serve.start(http_options={"host": config.host, "port": config.port}, proxy_location=config.proxy_location)
    with driver_agrees_on_haproxy(config):
        serve.run(build_app({"config_dict": config.model_dump()}), name=APP_NAME, route_prefix="/",
                  blocking=False)
    url = f"http://{config.host}:{config.port}"
    wait_until_ready(url, ready_timeout_s, stop)
    return url


def wait_until_ready(url: str, timeout_s: float, stop: threading.Event | None = None, *, path: str = "/health",
                     alive: Callable[[], bool] | None = None) -> None:
    """Until `url + path` answers 200; KeyboardInterrupt once `stop` is set, RuntimeError
    once `alive()` says the server's process is gone, TimeoutError after `timeout_s`."""
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if stop is not None and stop.is_set():
            raise KeyboardInterrupt("stopped while starting")
        if alive is not None and not alive():
            raise RuntimeError(f"the server for {url} exited while starting (see its log)")
        try:
            if httpx.get(f"{url}{path}", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # the proxy is not listening yet, or no replica has started
        time.sleep(0.5)
    raise TimeoutError(f"{url}{path} was not ready after {timeout_s:.0f} s (see the server's logs)")


def shutdown() -> None:
    import psutil
    import ray
    from ray import serve

    from global_scheduler.actor import GLOBAL_SCHEDULER, NAMESPACE

    # HAProxy is a child of Serve's proxy actor: if Serve's shutdown gives up on the actor
    # (it waits at most 30 s), HAProxy outlives the Ray this process started, port and all.
    haproxies = [p for p in psutil.Process().children(recursive=True) if p.name() == "haproxy"]
    try:
        serve.shutdown()
        ray.kill(ray.get_actor(GLOBAL_SCHEDULER, namespace=NAMESPACE))
    except Exception:  # noqa: BLE001 (already gone)
        pass
    ray.shutdown()
    for process in haproxies:
        try:
            process.kill()
        except psutil.Error:
            continue  # Serve stopped it


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (for checks and tests that start servers)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def stop_ray_cluster(gcs_port: int) -> int:
    """Kill every process of the Ray cluster whose GCS listens on `gcs_port` (at whatever
    address: Ray may advertise the machine's own) and their children (the dashboard's
    modules), and return how many: `ray stop` without stopping the other Ray clusters of
    the machine. For tests and checks on one machine."""
    import psutil

    mark = re.compile(rf"([\d.]+:|--gcs_server_port=){gcs_port}(\s|$)")
    doomed: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        try:
            if mark.search(" ".join(process.info["cmdline"] or ())):
                doomed.update((p.pid, p) for p in (process, *process.children(recursive=True)))
        except psutil.Error:
            continue  # gone meanwhile
    killed = 0
    for process in doomed.values():
        try:
            process.kill()
            killed += 1
        except psutil.Error:
            continue
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"  # as `ray stop` removes it
    if current.is_file() and current.read_text().strip().endswith(f":{gcs_port}"):
        current.unlink(missing_ok=True)
    return killed


def serve_forever(config: ClusterConfig) -> None:
    stop = threading.Event()
    started = False

    def on_signal(*_) -> None:
        if not started:  # serve.run blocks while the engines start: interrupt it
            raise KeyboardInterrupt
        stop.set()
    start_ray(config)  # first: ray.init installs its own SIGTERM handler, which would abort without cleanup
    for sig in (signal.SIGTERM, signal.SIGINT):  # SIGINT too: a background job inherits it ignored
        signal.signal(sig, on_signal)
    try:
        url = deploy(config, stop=stop)
        started = True
        engine = "simulated engine" if config.engine.kind == "sim" else f"vLLM on {config.engine.model}"
        print(f"CacheOPT ready: {config.engine.served_model_name} at {url}/v1 ({config.replicas} replicas, {engine}, "
              f"policy {config.policy.name}, ingress {config.ingress}, every engine warm); Ctrl-C stops.", flush=True)
        while not stop.is_set():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        shutdown()
