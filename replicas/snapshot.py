"""What a replica publishes about its KV cache, for the router and the global scheduler.

Ray Serve's own routing statistics are ten seconds old; these are taken every step (the
adapter throttles writes), so the router sees headroom as the policy does: blocks that
are free or promised but idle, less what the queued requests will ask for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from replicas.plan import blocks_for
from replicas.scheduler import ReplicaScheduler


@dataclass(frozen=True, slots=True)
class KVSnapshot:
    taken_s: float
    total_blocks: int
    free_blocks: int
    reserve_free_blocks: int
    reserve_target_blocks: int
    idle_blocks: int  # reserved by running requests but not yet written
    queued_need_blocks: int  # what the waiting requests will reserve (prompt + bound)
    num_running: int
    num_waiting: int
    counters: dict
    confidence: float | None = None  # the policy's p, as last set by the global scheduler

    @property
    def headroom_blocks(self) -> int:
        """Free plus idle, less the queue's needs: negative means the queue alone overfills."""
        return self.free_blocks + self.idle_blocks - self.queued_need_blocks

    def to_dict(self) -> dict:
        return asdict(self) | {"headroom_blocks": self.headroom_blocks}

    @classmethod
    def from_dict(cls, data: dict) -> KVSnapshot:
        return cls(**{k: v for k, v in data.items() if k != "headroom_blocks"})


def take_snapshot(core: ReplicaScheduler, now_s: float) -> KVSnapshot:
    ledger = core.ledger
    block = core.config.block_size
    idle = sum(share.idle for share in ledger.shares.values() if share.host is None)
    need = sum(blocks_for(r.prompt_tokens + max(r.bound_output_tokens, 1), block) for r in core.waiting)
    return KVSnapshot(taken_s=now_s, total_blocks=ledger.total_blocks, free_blocks=ledger.free,
                      reserve_free_blocks=ledger.reserve_free, reserve_target_blocks=ledger.reserve_target,
                      idle_blocks=idle, queued_need_blocks=need, num_running=len(core.running),
                      num_waiting=len(core.waiting), counters=dict(core.counters),
                      confidence=getattr(core.policy, "confidence", None))
