"""Splitting the cluster-wide KV reserve among replicas by pressure (DESIGN section 4.3).

Pure. Each replica's pressure is what its queue needs beyond what it has free or idle
(its snapshot's negative headroom), plus one so that an idle replica keeps a share; the
budget is split in proportion, in whole blocks, never above what a replica could hold
(half its blocks: the rest must stay admissible).
"""

from __future__ import annotations

from collections.abc import Mapping

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
