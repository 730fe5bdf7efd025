"""Choosing a replica by load, cached prefix and (optionally) KV headroom, as a Ray Serve
request router.

`rank_by_headroom` (cluster/routing.py) is the rule. `KVHeadroomRouter` plugs it into
Ray Serve (`request_router_class`). Behind Serve's HTTP proxy (and for any handle to the
serving deployment) Serve routes with it, then its own queue-length check picks the first
ranked replica that has room. Behind HAProxy the route service (cluster/route_service.py)
asks it for a pick only, and HAProxy sends the request: the first ranked replica goes.
There the route service also passes the prompt's block keys (it has the request body), so
the rule weighs where the prompt's prefix is cached (`PrefixIndex`, what this router sent).
Snapshots reach it as the replicas' routing statistics (`record_routing_stats`, every
cluster.routing.ROUTING_STATS_PERIOD_S). Without fresh snapshots for every candidate it
falls back to power of two choices, Serve's default (behind HAProxy, where nothing probes
queue lengths, to one replica drawn at random).
"""

from __future__ import annotations

import random
import time

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from cluster.route_service import PREFIX_KEYS, ROUTE_ONLY
from cluster.routing import RANKED_CANDIDATES, ROUTER_HEADROOM, PrefixIndex, RoutingState


class KVHeadroomRouter(FIFOMixin, RequestRouter):
    """`request_router_class` of the serving deployment (see the module docstring)."""

    def initialize_state(self, headroom: bool = ROUTER_HEADROOM, **kwargs) -> None:
        self._headroom = headroom  # ClusterConfig.router_headroom
        self._state = RoutingState()
        self._prefixes = PrefixIndex()
        self._rng = random.Random()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        now = time.time()
        if pending_request is not None and pending_request.kwargs.get(ROUTE_ONLY):
            # A pick for HAProxy: Serve takes the first replica of the first group and
            # reports no send, so the charge for it is made here.
            keys = pending_request.kwargs.get(PREFIX_KEYS) or ()
            ids = [r.replica_id.unique_id for r in candidate_replicas]
            prefix = [self._prefixes.matched(rid, keys) for rid in ids] if keys else None
            order = self._state.rank(candidate_replicas, now, limit=1, prefix_blocks=prefix, headroom=self._headroom)
            pick = order[0] if order else self._rng.randrange(len(candidate_replicas))
            self._state.on_send(ids[pick], now)
            if keys:
                self._prefixes.keep_only(ids)
                self._prefixes.record(ids[pick], keys, self._state.total_blocks(pick))
            return [[candidate_replicas[pick]]]
        order = self._state.rank(candidate_replicas, now, limit=RANKED_CANDIDATES, headroom=self._headroom)
        if order is None:  # power of two choices on queue length, as Serve's default router
            pair = self._rng.sample(candidate_replicas, min(2, len(candidate_replicas)))
            return [pair]
        ranks = [[candidate_replicas[i]] for i in order]
        if len(order) < len(candidate_replicas):  # the rest, for Serve to try together if all of these are full
            ranked = set(order)
            ranks.append([r for i, r in enumerate(candidate_replicas) if i not in ranked])
        return ranks

    def on_send_request(self, replica_id) -> None:
        """Called as Serve sends a request, right after choosing (no await between, so
        concurrent requests see each other's charge)."""
        super().on_send_request(replica_id)
        self._state.on_send(replica_id.unique_id, time.time())
