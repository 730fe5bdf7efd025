"""Splitting the cluster-wide KV reserve among replicas by pressure (DESIGN section 4.3).

Pure. Each replica's pressure is what its queue needs beyond what it has free or idle
(its snapshot's negative headroom), plus one so that an idle replica keeps a share; the
budget is split in proportion, in whole blocks, never above what a replica could hold
(half its blocks: the rest must stay admissible). Each split carries an epoch, and a
replica holds a lease only until it expires (`freshest_lease`), so a replica cut off from
the scheduler and Redis stops using a share that may have been given to another.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from replicas.snapshot import KVSnapshot


def rebalance_reserve(budget_blocks: int, snapshots: Mapping[str, KVSnapshot]) -> dict[str, int]:
    if budget_blocks < 0:
        raise ValueError(f"budget_blocks={budget_blocks} must be >= 0")
    if not snapshots:
        return {}
    pressure = {name: max(0, -s.headroom_blocks) + 1 for name, s in snapshots.items()}
    cap = {name: s.total_blocks // 2 for name, s in snapshots.items()}
    total = sum(pressure.values())
    leases = {name: min(cap[name], budget_blocks * p // total) for name, p in pressure.items()}
    # Hand out what rounding left, most pressed first, within the caps.
    left = budget_blocks - sum(leases.values())
    for name in sorted(pressure, key=lambda n: (-pressure[n], n)):
        if left <= 0:
            break
        extra = min(left, cap[name] - leases[name])
        leases[name] += extra
        left -= extra
    return leases


@dataclass(frozen=True)
class Lease:
    """A replica's share of the reserve as one split granted it: valid until `expires_s`
    (the holder's clock), ordered by `epoch` (the split's; later splits have larger ones)."""

    blocks: int
    epoch: int
    expires_s: float


def freshest_lease(held: Lease | None, offered: Iterable[Lease | None], now: float) -> Lease | None:
    """The lease a replica should hold: the newest-epoch one that has not expired, among
    the one it holds and those just offered (Redis, the scheduler's reply). An older split
    never replaces a newer one; with all expired the replica holds none."""
    valid = [lease for lease in (held, *offered) if lease is not None and lease.expires_s > now]
    # On equal epochs the later expiry: a renewal of the same split extends it.
    return max(valid, key=lambda lease: (lease.epoch, lease.expires_s), default=None)
