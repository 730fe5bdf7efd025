"""HAProxy's replica chooser for `router: kv` (Ray Serve's ingress request router).

Behind HAProxy, HAProxy picks the replica itself (least connections) unless the
application has an ingress request router: then, for every POST, HAProxy's Lua action asks
this deployment's `POST /internal/route` for a replica and sends the request straight to
that replica's own port (Ray Serve LLM's direct-streaming path; GETs such as /health and
/metrics still go by least connections). The choice is the serving deployment's request
router's (KVHeadroomRouter, cluster/router.py), run through a deployment handle without
sending anything, so one rule and one routing state serve both ingresses. Where Ray
forwards the request body (`RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY=1`, which
`cacheopt serve` sets for `router: kv`), the prompt's block keys go with the pick, for
prefix affinity; without the body the rule routes by load (and KV room, with
`router_headroom`) alone.

Ray's hook for attaching it (`Application._with_ingress_request_router`) is internal to Ray
Serve 2.60 (Ray Serve LLM's own use); the pinned Ray is what it was checked against.
"""

from __future__ import annotations

from fastapi import FastAPI, HTTPException, Request
from ray import serve
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from cluster.routing import prompt_block_keys

# A keyword the route service passes to choose_replica: KVHeadroomRouter then charges its
# pick itself, since without a reserved slot Serve neither probes nor reports the send.
ROUTE_ONLY = "cacheopt_route_only"
ROUTE_PATH = "/internal/route"  # Ray's HAProxy Lua action calls this path
PREFIX_KEYS = "cacheopt_prefix_keys"  # the prompt's block keys (cluster.routing.prompt_block_keys)

route_app = FastAPI()


@serve.deployment
@serve.ingress(route_app)
class KVRouteService:
    """Answers HAProxy with `{"host", "port", "replica_id"}` of the replica to send to."""

    def __init__(self, server: DeploymentHandle, block_tokens: int) -> None:
        self._server = server
        self._block_tokens = block_tokens  # the engine's KV block size
        self._server._init()  # the handle's router starts now, not at the first request

    @route_app.post(ROUTE_PATH)
    async def route(self, request: Request) -> dict:
        keys = prompt_block_keys(await request.body(), self._block_tokens)
        try:
            # _reserve=False: pick only (the request goes out through HAProxy, not this handle).
            async with self._server.choose_replica(_reserve=False, **{ROUTE_ONLY: True, PREFIX_KEYS: keys}) as selection:
                replica = selection._replica
        except DeploymentUnavailableError as e:  # any non-200 makes HAProxy answer 503
            raise HTTPException(status_code=503, detail=str(e)) from None
        endpoint = replica.backend_http_endpoint
        if endpoint is None:
            raise HTTPException(status_code=503, detail=f"replica {selection.replica_id} has no HTTP port yet")
        host, port = endpoint
        return {"host": host, "port": port, "replica_id": replica.replica_id.to_full_id_str()}
