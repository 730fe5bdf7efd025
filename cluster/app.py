"""The Ray Serve application: one deployment of N serving replicas (cluster.server), behind
HAProxy or Serve's own proxy (cluster.ingress), and the global scheduler actor
(global_scheduler.actor) they report to. With `router: kv` Serve's proxy routes by our
rule (cluster.router: load from the replicas' snapshots, KV room with `router_headroom`),
and HAProxy asks a route service that runs the same router and also weighs cached prefixes
(cluster.route_service); otherwise each ingress balances by its own rule.

`serve run cluster.app:build_app [config=path.yaml]` or `cacheopt serve` builds it.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from ray.serve.config import RequestRouterConfig

from cluster.config import LOOPBACK, ClusterConfig, ConfigError
from cluster.ingress import check_cluster_ingress
from cluster.route_service import KVRouteService
from cluster.router import KVHeadroomRouter
from cluster.routing import ROUTING_STATS_PERIOD_S
from cluster.server import LLMServer
from global_scheduler.store import RedisStore

log = logging.getLogger("cacheopt.app")
DEPLOYMENT = "LLMServer"
REQUEST_SLOTS_SPARE = 16  # beyond the queue limit: /health, /metrics and the 429 answers themselves


def request_router_config(config: ClusterConfig) -> RequestRouterConfig:
    """kv: our router (cluster.router), fed each replica's KV snapshot as Serve's routing
    statistics every ROUTING_STATS_PERIOD_S; p2c: Ray Serve's default router (power of two
    choices on queue length), which reads no routing statistics, so Serve collects them at
    its own default period rather than ten times a second from every replica."""
    if config.router == "kv":
        return RequestRouterConfig(request_router_class=KVHeadroomRouter,
                                   request_router_kwargs={"headroom": config.router_headroom},
                                   request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
                                   request_routing_stats_timeout_s=1.0)
    return RequestRouterConfig()


def loopback_redis_problem(redis_url: str, node_ips: set[str]) -> str | None:
    """Why `redis_url` cannot coordinate a cluster on these nodes, or None: a loopback
    address means a different Redis (or none) on each machine, so replicas would never see
    each other's snapshots and leases."""
    host = urlsplit(redis_url).hostname
    if host not in LOOPBACK or len(node_ips) <= 1:
        return None
    return (f"redis_url points at {host}, but the Ray cluster spans the machines {', '.join(sorted(node_ips))}: "
            "each would reach its own loopback. Give Redis's address on the network every node can reach "
            "(deploy/README.md)")


def _node_ips() -> set[str]:
    """The machines of the Ray cluster this deploys on (none known outside Ray)."""
    import ray

    if not ray.is_initialized():
        return set()
    return {node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")}


def build_app(args: dict | None = None):
    """`serve run cluster.app:build_app [config=path.yaml]`, or with the settings as a
    mapping under `config_dict` (`cacheopt serve`, deploy/serve-config.yaml); secrets the
    settings leave out come from the environment (cluster.config.secrets_from_environment)."""
    from cluster.config import load_config, secrets_from_environment

    args = dict(args or {})
    config = (ClusterConfig.model_validate(secrets_from_environment(args["config_dict"])) if "config_dict" in args
              else load_config(args.get("config")))
    if config.require_api_keys and not config.api_keys:
        raise ConfigError("require_api_keys is set but no API key is configured: set api_keys or $CACHEOPT_API_KEY")
    if not config.api_keys and config.host not in LOOPBACK:
        log.warning("serving without API keys: anyone who reaches the port can use the cluster "
                    "(set api_keys or $CACHEOPT_API_KEY)")
    check_cluster_ingress(config)
    if config.redis_url:  # a wrong password fails the deploy here, clearly, not later in silence
        RedisStore(config.redis_url).check()
        problem = loopback_redis_problem(config.redis_url, _node_ips())
        if problem:
            raise ConfigError(problem)
    # The engine's own processes are outside Ray's accounting; a replica asks Ray only for
    # its GPU (none on CPU machines), so that two replicas fit a 2-core machine.
    server = LLMServer.options(num_replicas=config.replicas,
                               max_ongoing_requests=config.max_queued_requests + REQUEST_SLOTS_SPARE,
                               request_router_config=request_router_config(config),
                               ray_actor_options={"num_cpus": 0, "num_gpus": config.engine.num_gpus,
                                                  "resources": dict(config.replica_resources)}
                               ).bind(config.model_dump())
    if config.router == "kv" and config.ingress == "haproxy":  # HAProxy asks our router for each request
        return server._with_ingress_request_router(
            KVRouteService.options(num_replicas=1, ray_actor_options={"num_cpus": 0}).bind(
                server, config.engine.block_size))
    return server
