"""The KV-headroom routing rule, pure: `rank_by_headroom` orders candidate replicas by
what the router knows of them. The Ray Serve router (cluster/router.py) and the cluster
simulator (bench/cluster_sim.py) both call it.

Replicas with KV room for one more request (free plus idle reservations, less what their
queue will take and what this router sent them since their snapshot) first, the least
loaded of them first; without room, the most headroom first; failing replicas last.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from replicas.snapshot import KVSnapshot

# A snapshot older than this is not trusted (the replica may be gone or stuck).
SNAPSHOT_MAX_AGE_S = 2.0
ROUTING_STATS_PERIOD_S = 0.1  # how often Serve's controller collects each replica's snapshot


@dataclass(frozen=True)
class ReplicaView:
    """What the router knows of one candidate replica."""

    snapshot: KVSnapshot | None
    sent_since_snapshot: int = 0  # requests this router sent it after the snapshot was taken
    healthy: bool = True  # False: it failed requests lately or its engine is dead
    request_blocks: float = 0.0  # what a request asks of its KV cache, smoothed, as the replica saw


def blocks_per_request(views: Sequence[ReplicaView]) -> float:
    """The charge for each request sent since a snapshot (the router cannot see request
    bodies): what the replicas say a request asks for, on average."""
    known = [v.request_blocks for v in views if v.request_blocks > 0]
    return sum(known) / len(known) if known else 0.0


def rank_by_headroom(views: Sequence[ReplicaView], now_s: float) -> list[int] | None:
    """Candidate indices, best first, or None when some snapshot is missing or stale.

    KV headroom decides where it binds: a replica with room for one more request (headroom
    less the charge for what was sent since its snapshot) ranks before every replica
    without, and among those without room the most headroom wins. Among replicas with room
    the least loaded (running, waiting and sent since the snapshot) goes first, as Serve's
    default router would pick: where KV is not short, compute is what a new request waits
    for. Replicas that failed requests lately go last."""
    if any(v.snapshot is None or now_s - v.snapshot.taken_s > SNAPSHOT_MAX_AGE_S for v in views):
        return None
    charge = blocks_per_request(views)

    def key(i: int):
        v = views[i]
        s = v.snapshot
        assert s is not None
        room = s.headroom_blocks - charge * v.sent_since_snapshot
        fits = room >= charge
        load = v.sent_since_snapshot + s.num_running + s.num_waiting
        return (not v.healthy, not fits, load if fits else 0, -room, -s.reserve_free_blocks, i)
    return sorted(range(len(views)), key=key)


def snapshot_of(routing_stats: dict) -> KVSnapshot | None:
    data = routing_stats.get("kv") if routing_stats else None
    try:
        return None if data is None else KVSnapshot.from_dict(data)
    except (TypeError, ValueError):
        return None  # a replica of another version: route without its snapshot
