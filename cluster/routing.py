"""The KV-headroom routing rule, pure: `rank_by_headroom` orders candidate replicas by
what the router knows of them. The Ray Serve router (cluster/router.py) and the cluster
simulator (bench/cluster_sim.py) both call it.

Replicas with KV room for one more request (free plus idle reservations, less what their
queue will take and what this router sent them since their snapshot) first, the least
loaded of them first; without room, the most headroom first; failing replicas last.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

from replicas.snapshot import KVSnapshot

# A snapshot older than this is not trusted (the replica may be gone or stuck).
SNAPSHOT_MAX_AGE_S = 2.0
ROUTING_STATS_PERIOD_S = 0.1  # how often Serve's controller collects each replica's snapshot


class ReplicaView(NamedTuple):
    """What the router knows of one candidate replica (a tuple: a router builds one per
    replica per request)."""

    snapshot: KVSnapshot | None
    sent_since_snapshot: int = 0  # requests this router sent it after the snapshot was taken
    healthy: bool = True  # False: it failed requests lately or its engine is dead
    request_blocks: float = 0.0  # what a request asks of its KV cache, smoothed, as the replica saw


def blocks_per_request(views: Sequence[ReplicaView]) -> float:
    """The charge for each request sent since a snapshot (the router cannot see request
    bodies): what the replicas say a request asks for, on average."""
    known = [v.request_blocks for v in views if v.request_blocks > 0]
    return sum(known) / len(known) if known else 0.0


def rank_by_headroom(views: Sequence[ReplicaView], now_s: float, limit: int | None = None) -> list[int] | None:
    """Candidate indices, best first (the best `limit` of them), or None when some
    snapshot is missing or stale.

    KV headroom decides where it binds: a replica with room for one more request (headroom
    less the charge for what was sent since its snapshot) ranks before every replica
    without, and among those without room the most headroom wins. Among replicas with room
    the least loaded (running, waiting and sent since the snapshot) goes first, as Serve's
    default router would pick: where KV is not short, compute is what a new request waits
    for. Replicas that failed requests lately go last."""
    oldest = now_s - SNAPSHOT_MAX_AGE_S
    if any(v.snapshot is None or v.snapshot.taken_s < oldest for v in views):
        return None
    charge = blocks_per_request(views)
    keys = []
    for i, (s, sent, healthy, _) in enumerate(views):
        room = s.headroom_blocks - charge * sent
        fits = room >= charge
        keys.append((not healthy, not fits, sent + s.num_running + s.num_waiting if fits else 0, -room,
                     -s.reserve_free_blocks, i))
    best = sorted(keys) if limit is None or limit >= len(keys) else heapq.nsmallest(limit, keys)
    return [key[-1] for key in best]


def snapshot_of(routing_stats: dict) -> KVSnapshot | None:
    data = routing_stats.get("kv") if routing_stats else None
    try:
        return None if data is None else KVSnapshot.from_dict(data)
    except (TypeError, ValueError):
        return None  # a replica of another version: route without its snapshot


SENT_BUFFERED = 4096  # per replica, in case its snapshots stop
# The router ranks this many one by one; Serve tries them in order (each may be full),
# then the rest as one group.
RANKED_CANDIDATES = 4


class RoutingState:
    """One router's memory: when it sent each replica requests (charged until a snapshot
    shows them) and each replica's last routing statistics, parsed once (they change
    every ROUTING_STATS_PERIOD_S; a router decides many times in between)."""

    def __init__(self) -> None:
        self._sent: dict[str, deque[float]] = {}
        self._parsed: dict[str, tuple[dict, KVSnapshot | None]] = {}

    def rank(self, replicas: Sequence[tuple[str, dict]], now_s: float, limit: int | None = None) -> list[int] | None:
        """`replicas`: (id, routing statistics) of each candidate; rank_by_headroom's answer."""
        if len(self._parsed) > 2 * len(replicas) + 16:  # replicas come and go: forget the gone ones
            current = {replica_id for replica_id, _ in replicas}
            self._parsed = {k: v for k, v in self._parsed.items() if k in current}
            self._sent = {k: v for k, v in self._sent.items() if k in current}
        views = []
        for replica_id, stats in replicas:
            cached = self._parsed.get(replica_id)
            if cached is None or cached[0] is not stats:
                cached = self._parsed[replica_id] = (stats, snapshot_of(stats))
            snap = cached[1]
            sent = self._sent.get(replica_id)
            if sent is None:
                sent = self._sent[replica_id] = deque(maxlen=SENT_BUFFERED)
            if snap is not None:
                while sent and sent[0] <= snap.taken_s:
                    sent.popleft()  # the snapshot has seen it
            views.append(ReplicaView(snap, len(sent), bool(stats.get("healthy", True)),
                                     float(stats.get("request_blocks", 0.0))))
        return rank_by_headroom(views, now_s, limit)

    def on_send(self, replica_id: str, now_s: float) -> None:
        sent = self._sent.get(replica_id)
        if sent is None:
            sent = self._sent[replica_id] = deque(maxlen=SENT_BUFFERED)
        sent.append(now_s)
