"""Physical KV blocks under prefix caching: who holds which block, and who is charged for it.

With prefix caching a block can sit in several requests' block tables (a shared prompt
prefix), and a block nobody holds any more stays cached, evictable, until its space is
needed. The ledger counts blocks by charge: every block in use is charged to exactly one
of its holders (the one that brought it into use, then passed on to the next holder when
that one leaves), so

    sum of charges == blocks in use == the engine's blocks - its free blocks

which is the identity the adapter checks against vLLM's pool. A cached block that nobody
holds is free, as vLLM counts it: a hit on it costs a block like a fresh allocation, a hit
on a block somebody holds costs nothing.

`BlockTables` keeps that bookkeeping over the block ids a physical pool hands out; the pool
is `SimBlockPool` in the simulator and vLLM's own in the adapter (replicas/vllm_adapter.py).
Standard library only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Protocol

from replicas.plan import blocks_for
from replicas.request import Request


class BlockPool(Protocol):
    """The physical side: block ids, prefix hits, allocation, freeing."""

    def lookup(self, request: Request) -> list[int]:
        """Cached blocks holding a prefix of `request` (whole blocks, stopping at least one
        token short of its sequence: the last token is always computed); [] without caching."""

    def allocate(self, request: Request, hits: list[int], num_new_tokens: int) -> list[int]:
        """Give `request` (whose `num_computed_tokens` already counts `hits`) the hit blocks
        and slots for `num_new_tokens` more tokens; returns the blocks added to its table
        (the hits, then new ones), usually none for a decode. The ledger has already decided
        that the blocks exist: failing here is a bug."""

    def free(self, request: Request, *, preempted: bool) -> None:
        """`request` gives its blocks back (finished, aborted, or preempted)."""


class BlockTables:
    """Holders and charges of the blocks in use, from the tables a pool hands out."""

    def __init__(self) -> None:
        self.tables: dict[str, list[int]] = {}
        self.charged: dict[str, int] = {}
        self._holders: dict[int, list[str]] = {}  # block -> holders, the charged one first

    @property
    def num_in_use(self) -> int:
        return len(self._holders)

    def num_held_by_others(self, blocks: Sequence[int]) -> int:
        """How many of `blocks` somebody holds (a hit on them costs nothing)."""
        return sum(1 for b in blocks if b in self._holders)

    def extend(self, rid: str, added: Sequence[int]) -> None:
        """Blocks an allocation appended to `rid`'s table (block tables only grow)."""
        table = self.tables.setdefault(rid, [])
        if not added:
            return
        charged = self.charged.get(rid, 0)
        for block in added:
            holders = self._holders.get(block)
            if holders is None:
                self._holders[block] = [rid]
                charged += 1
            elif rid in holders:
                raise AssertionError(f"{rid} holds block {block} twice")
            else:
                holders.append(rid)
        table.extend(added)
        self.charged[rid] = charged

    def drop(self, rid: str) -> dict[str, int]:
        """`rid` released its blocks. Returns the blocks whose charge passed on, per heir."""
        inherited: dict[str, int] = {}
        for block in self.tables.pop(rid, ()):
            holders = self._holders[block]
            was_charged = holders[0] == rid
            holders.remove(rid)
            if not holders:
                del self._holders[block]
            elif was_charged:
                inherited[holders[0]] = inherited.get(holders[0], 0) + 1
        self.charged.pop(rid, None)
        for heir, n in inherited.items():
            self.charged[heir] += n
        return inherited


def sim_block_key(request: Request, index: int) -> Hashable:
    """The prefix-cache key of block `index` of a simulated request: the workload's key for
    shared prompt blocks (`Request.prefix_keys`), otherwise one only this request has (so
    a recomputed request hits its own blocks while they stay cached)."""
    keys = request.prefix_keys
    if keys is not None and index < len(keys):
        return keys[index]
    return (request.request_id, index)


class SimBlockPool:
    """vLLM's prefix-caching block pool, reduced to what decides hits and evictions
    (vllm/v1/core/block_pool.py): full blocks become cached when scheduled (a key computed
    twice names both blocks, and a hit takes the first); a freed block with a key stays
    cached, least recently freed evicted first, while blocks without a key are reused
    first; a request's blocks are freed tail first. (Prefix caching off is no pool at all:
    the scheduler then only counts blocks.)"""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # next to allocate first
        self._key: list[Hashable | None] = [None] * num_blocks
        self._ref = [0] * num_blocks
        self._cached: dict[Hashable, dict[int, None]] = {}  # key -> its blocks (a key computed twice has two)
        self._tables: dict[str, list[int]] = {}
        self._num_keyed: dict[str, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def lookup(self, request: Request) -> list[int]:
        hits = []
        for i in range((request.num_tokens - 1) // self.block_size):
            blocks = self._cached.get(sim_block_key(request, i))
            if not blocks:
                break
            hits.append(next(iter(blocks)))
        return hits

    def allocate(self, request: Request, hits: list[int], num_new_tokens: int) -> list[int]:
        rid = request.request_id
        table = self._tables.setdefault(rid, [])
        added = list(hits)
        if hits:
            if table:
                raise AssertionError(f"{rid}: prefix hits for a request that holds blocks")
            for block in hits:
                if self._ref[block] == 0:
                    del self._free[block]
                self._ref[block] += 1
            table.extend(hits)
            self._num_keyed[rid] = len(hits)
        end = request.num_computed_tokens + num_new_tokens
        for _ in range(blocks_for(end, self.block_size) - len(table)):
            block = self._free.popitem(last=False)[0]
            key = self._key[block]
            if key is not None:
                self._key[block] = None
                blocks = self._cached[key]
                del blocks[block]
                if not blocks:
                    del self._cached[key]
            self._ref[block] = 1
            table.append(block)
            added.append(block)
        self._cache_full_blocks(request, table, min(end, request.num_tokens) // self.block_size)
        return added

    def _cache_full_blocks(self, request: Request, table: list[int], num_full: int) -> None:
        rid = request.request_id
        for i in range(self._num_keyed.get(rid, 0), num_full):
            key = sim_block_key(request, i)
            if self._key[table[i]] is None:  # a hit block is cached already
                self._key[table[i]] = key
                self._cached.setdefault(key, {})[table[i]] = None
        self._num_keyed[rid] = max(num_full, self._num_keyed.get(rid, 0))

    def free(self, request: Request, *, preempted: bool) -> None:
        rid = request.request_id
        self._num_keyed.pop(rid, None)
        reuse_first = []
        for block in reversed(self._tables.pop(rid, [])):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if self._key[block] is None:
                    reuse_first.append(block)
                else:
                    self._free[block] = None
        for block in reversed(reuse_first):
            self._free[block] = None
            self._free.move_to_end(block, last=False)
