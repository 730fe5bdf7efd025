"""Choosing a replica: by fresh KV headroom, or power-of-two by queue length without it.

Pure: the ingress feeds it the replicas' latest snapshots and its own in-flight counts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from replicas.snapshot import KVSnapshot

# A snapshot older than this is not trusted (the replica may be gone or stuck).
SNAPSHOT_MAX_AGE_S = 2.0


def choose_replica(snapshots: Sequence[KVSnapshot | None], in_flight: Sequence[int], unseen_need: Sequence[int],
                   now_s: float, rng: random.Random) -> tuple[int, str]:
    """(replica index, how it was chosen). With fresh snapshots for every replica: the one
    with the most headroom (free plus idle reservations, minus what its queue will take,
    minus `unseen_need`: blocks of requests sent to it after its snapshot was taken), ties
    broken by the larger global reserve and then by fewer requests in flight. Otherwise:
    power of two choices on requests in flight."""
    n = len(in_flight)
    if n == 1:
        return 0, "only"
    fresh = all(s is not None and now_s - s.taken_s <= SNAPSHOT_MAX_AGE_S for s in snapshots)
    if fresh:
        best = max(range(n), key=lambda i: (snapshots[i].headroom_blocks - unseen_need[i],
                                            snapshots[i].reserve_free_blocks, -in_flight[i], -i))
        return best, "kv"
    a, b = rng.sample(range(n), 2)
    return (a if in_flight[a] <= in_flight[b] else b), "p2c"
