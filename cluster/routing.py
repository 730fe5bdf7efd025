"""The KV-headroom routing rule, pure: `rank_by_headroom` orders candidate replicas by
what the router knows of them. The Ray Serve router (cluster/router.py) and the cluster
simulator (bench/cluster_sim.py) both call it.

Replicas with KV room for one more request (free plus idle reservations, less what their
queue will take and what this router sent them since their snapshot) first, the least
loaded of them first; without room, the most headroom first; failing replicas last.

A serving replica also reports the requests it holds (`accepted`, read at `read_s`), those
still being parsed or tokenized included: its engine's snapshot, taken at the last step,
does not show those yet, so a router that stopped charging for a request once a snapshot
was taken after it was sent would miss the requests in between (where least connections
counts every open one).
"""

from __future__ import annotations

import heapq
import operator
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from replicas.snapshot import KVSnapshot

# A snapshot older than this is not trusted (the replica may be gone or stuck).
SNAPSHOT_MAX_AGE_S = 2.0
ROUTING_STATS_PERIOD_S = 0.1  # how often Serve's controller collects each replica's snapshot


class ReplicaView(NamedTuple):
    """What the router knows of one candidate replica (a tuple: a router builds one per
    replica per request)."""

    snapshot: KVSnapshot | None
    sent_since_snapshot: int = 0  # requests this router sent it after the snapshot (or the count below) was taken
    healthy: bool = True  # False: it failed requests lately or its engine is dead
    request_blocks: float = 0.0  # what a request asks of its KV cache, smoothed, as the replica saw
    # Requests the replica holds (its engine's and those being prepared), when it reports
    # them: then the load, with `sent_since_snapshot` counted from when it was read.
    accepted: int | None = None
    preparing: int = 0  # of those, not yet in its engine (so not in the KV snapshot)


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
    the least loaded (the requests it holds, or its engine's running and waiting where it
    does not report them, plus those sent since) goes first, as Serve's default router would pick: where KV is not short, compute is what a new request waits
    for. Replicas that failed requests lately go last."""
    oldest = now_s - SNAPSHOT_MAX_AGE_S
    if any(v.snapshot is None or v.snapshot.taken_s < oldest for v in views):
        return None
    charge = blocks_per_request(views)
    keys = []
    for i, (s, sent, healthy, _, accepted, preparing) in enumerate(views):
        room = s.headroom_blocks - charge * (sent + preparing)
        fits = room >= charge
        held = s.num_running + s.num_waiting if accepted is None else accepted
        keys.append((not healthy, not fits, sent + held if fits else 0, -room, -s.reserve_free_blocks, i))
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
    """One router's memory, and `rank_by_headroom` over it in a few array operations: a
    router decides once per request over every replica, so per-replica Python work is what
    its time is made of (bench/control_plane.py). Kept per candidate slot: each replica's
    last routing statistics, parsed when they change (every ROUTING_STATS_PERIOD_S, while
    the router decides many times in between), and the requests sent to it since its
    snapshot (charged until a newer snapshot shows them). tests/test_cluster_parts.py
    checks that it ranks as rank_by_headroom does.

    Candidates are the router's replica objects: `.routing_stats` (a dict) and an id from
    `replica_id_of`; the same objects from one decision to the next cost one identity
    check each, in C."""

    def __init__(self, replica_id_of=lambda replica: replica.replica_id.unique_id) -> None:
        self._replica_id_of = replica_id_of
        self._sent: dict[str, deque[float]] = {}
        self._candidates: list = []
        self._stats: list = []
        self._ids: list[str] = []
        self._slot: dict[str, int] = {}
        n = 0
        self._headroom = np.zeros(n)
        self._base_load = np.zeros(n)
        self._reserve_free = np.zeros(n)
        self._unhealthy = np.zeros(n, dtype=bool)
        self._request_blocks = np.zeros(n)
        self._taken = np.zeros(n)
        self._seen_until = np.zeros(n)  # sends up to this time are in the replica's statistics
        self._preparing = np.zeros(n)
        self._sent_count = np.zeros(n)

    def rank(self, candidates: Sequence, now_s: float, limit: int | None = None) -> list[int] | None:
        """rank_by_headroom's answer for `candidates` (indices into it)."""
        if len(candidates) != len(self._candidates) or not all(map(operator.is_, candidates, self._candidates)):
            self._rebuild(candidates)
        stats = list(map(_stats_of, candidates))
        if not all(map(operator.is_, stats, self._stats)):
            for i, (new, old) in enumerate(zip(stats, self._stats, strict=True)):
                if new is not old:
                    self._load(i, new)
        if not len(candidates) or self._taken.min() < now_s - SNAPSHOT_MAX_AGE_S:
            return None  # a snapshot missing (taken -inf) or stale
        known = self._request_blocks[self._request_blocks > 0]
        charge = float(known.mean()) if known.size else 0.0
        room = self._headroom - charge * (self._sent_count + self._preparing)
        fits = room >= charge
        load = np.where(fits, self._sent_count + self._base_load, 0.0)
        order = np.lexsort((np.arange(len(candidates)), -self._reserve_free, -room, load, ~fits, self._unhealthy))
        return order[:limit].tolist() if limit is not None else order.tolist()

    def on_send(self, replica_id: str, now_s: float) -> None:
        sent = self._sent.get(replica_id)
        if sent is None:
            sent = self._sent[replica_id] = deque(maxlen=SENT_BUFFERED)
        sent.append(now_s)
        slot = self._slot.get(replica_id)
        if slot is not None:  # None: not among the current candidates
            while sent and sent[0] <= self._seen_until[slot]:
                sent.popleft()  # its statistics have seen it
            self._sent_count[slot] = len(sent)

    def _rebuild(self, candidates: Sequence) -> None:
        n = len(candidates)
        self._candidates = list(candidates)
        self._ids = [self._replica_id_of(c) for c in candidates]
        self._slot = {rid: i for i, rid in enumerate(self._ids)}
        self._sent = {rid: self._sent[rid] for rid in self._ids if rid in self._sent}  # forget gone replicas
        self._stats = [None] * n  # every slot loads below
        self._headroom, self._base_load, self._reserve_free = np.zeros(n), np.zeros(n), np.zeros(n)
        self._unhealthy, self._request_blocks = np.zeros(n, dtype=bool), np.zeros(n)
        self._taken, self._sent_count = np.full(n, -np.inf), np.zeros(n)
        self._seen_until, self._preparing = np.full(n, -np.inf), np.zeros(n)

    def _load(self, i: int, stats: dict) -> None:
        """Slot i from new routing statistics: the snapshot's numbers the rule reads, taken
        from its dict directly (Serve re-sends every replica's statistics whenever one
        changes, so this runs for every replica several times a second)."""
        self._stats[i] = stats
        self._unhealthy[i] = not stats.get("healthy", True)
        self._request_blocks[i] = float(stats.get("request_blocks", 0.0))
        kv = stats.get("kv")
        try:
            taken = seen_until = float(kv["taken_s"])
            self._headroom[i], self._reserve_free[i] = kv["headroom_blocks"], kv["reserve_free_blocks"]  # KVSnapshot.to_dict
            self._base_load[i] = kv["num_running"] + kv["num_waiting"]
            self._preparing[i] = 0
            if "accepted" in stats:  # cluster/server.py's record_routing_stats
                seen_until = float(stats["read_s"])
                self._base_load[i], self._preparing[i] = stats["accepted"], stats["preparing"]
        except (KeyError, TypeError, ValueError):  # none, or a replica of another version: Serve's router decides
            taken = seen_until = -np.inf
        self._taken[i], self._seen_until[i] = taken, seen_until
        sent = self._sent.get(self._ids[i])
        while sent and sent[0] <= seen_until:
            sent.popleft()  # its statistics have seen it
        self._sent_count[i] = len(sent) if sent else 0


def _stats_of(candidate) -> dict:
    return candidate.routing_stats or _NO_STATS


_NO_STATS: dict = {}  # one object: a replica without statistics is not "changed" at every decision
