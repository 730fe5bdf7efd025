"""Choosing a replica by KV headroom, as a Ray Serve request router.

`rank_by_headroom` (cluster/routing.py) is the rule. `KVHeadroomRouter` plugs it into
Ray Serve (`request_router_class`): Serve's HTTP proxy (and any handle to the serving
deployment) routes with it, then Serve's own queue-length check picks the first ranked
replica that has room. Snapshots reach it as the replicas' routing statistics
(`record_routing_stats`, every cluster.routing.ROUTING_STATS_PERIOD_S). Without fresh snapshots for every
candidate it falls back to power of two choices, Serve's default.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict, deque

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from cluster.routing import ReplicaView, rank_by_headroom, snapshot_of


class KVHeadroomRouter(FIFOMixin, RequestRouter):
    """`request_router_class` of the serving deployment (see the module docstring)."""

    def initialize_state(self, **kwargs) -> None:
        # replica -> when this router sent it requests; bounded in case its snapshots stop
        self._sent: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=4096))
        self._rng = random.Random()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        now = time.time()
        views = []
        for replica in candidate_replicas:
            stats = replica.routing_stats or {}
            snap = snapshot_of(stats)
            sent = self._sent[replica.replica_id.unique_id]
            if snap is not None:
                while sent and sent[0] <= snap.taken_s:
                    sent.popleft()  # the snapshot has seen it
            views.append(ReplicaView(snap, len(sent), bool(stats.get("healthy", True)),
                                     float(stats.get("request_blocks", 0.0))))
        order = rank_by_headroom(views, now)
        if order is None:  # power of two choices on queue length, as Serve's default router
            pair = self._rng.sample(candidate_replicas, min(2, len(candidate_replicas)))
            return [pair]
        return [[candidate_replicas[i]] for i in order]

    def on_send_request(self, replica_id) -> None:
        """Called as Serve sends a request, right after choosing (no await between, so
        concurrent requests see each other's charge)."""
        super().on_send_request(replica_id)
        self._sent[replica_id.unique_id].append(time.time())
