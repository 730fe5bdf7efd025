"""KV block ledger: who holds and who is promised which share of a replica's KV cache.

All accounting is in blocks and by count: the engine's block pool knows block ids, the
ledger knows shares. Every block is in exactly one of four places:

    total == free + reserve_free + sum(reserved of every owner)

An owner's reservation `reserved` (a_r) covers the blocks it holds (`held`, u_r), the
blocks it has lent to guests (`lent`), and its idle promise. A guest (an embedded request)
has its reservation carved out of its host's, so it does not appear in the sum above:

    host:  held + lent <= reserved          guest: held <= reserved, lent == 0

The global reserve (`reserve_free`, at most `reserve_target`) only ever feeds top-ups and
critical requests; released blocks refill it before they return to the free pool.
Every mutating method either succeeds or changes nothing and returns False/None.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(slots=True)
class Share:
    reserved: int
    held: int = 0
    host: str | None = None  # set for a guest: the request whose reservation it lives in
    guests: set[str] = field(default_factory=set)
    lent: int = 0  # sum of the guests' reservations

    @property
    def room(self) -> int:
        """Blocks this request may hold: its reservation less what its guests borrow."""
        return self.reserved - self.lent

    @property
    def idle(self) -> int:
        """Promised blocks that nobody holds or borrows."""
        return self.reserved - self.held - self.lent


class KVLedger:
    def __init__(self, total_blocks: int, *, reserve_blocks: int = 0, host_swap_blocks: int = 0):
        if total_blocks < 1:
            raise ValueError(f"total_blocks={total_blocks} must be >= 1")
        if not 0 <= reserve_blocks < total_blocks:
            raise ValueError(f"reserve_blocks={reserve_blocks} must be in [0, total_blocks={total_blocks})")
        if host_swap_blocks < 0:
            raise ValueError(f"host_swap_blocks={host_swap_blocks} must be >= 0")
        self.total_blocks = total_blocks
        self.reserve_target = reserve_blocks
        self.reserve_free = reserve_blocks
        self.free = total_blocks - reserve_blocks
        self.host_swap_total = host_swap_blocks
        self.host_swap_used = 0
        self.held_total = 0
        self.shares: dict[str, Share] = {}

    # --- admission -----------------------------------------------------------------

    def try_reserve(self, rid: str, blocks: int, *, use_reserve: bool = False) -> int | None:
        """Promise `blocks` from the free pool (then the reserve if allowed).

        Returns how many came from the reserve, or None (and changes nothing) if they
        do not fit."""
        if rid in self.shares:
            raise ValueError(f"request {rid} already has a share")
        if blocks < 0:
            raise ValueError(f"request {rid}: cannot reserve {blocks} blocks")
        drawn = self._take(blocks, use_reserve)
        if drawn is None:
            return None
        self.shares[rid] = Share(reserved=blocks)
        return drawn

    def try_embed(self, rid: str, host_id: str, blocks: int) -> bool:
        """Carve a guest reservation of `blocks` out of the host's idle promise."""
        if rid in self.shares:
            raise ValueError(f"request {rid} already has a share")
        host = self.shares[host_id]
        if host.host is not None:
            raise ValueError(f"request {host_id} is itself a guest and cannot host {rid}")
        if host.idle < blocks:
            return False
        host.guests.add(rid)
        host.lent += blocks
        self.shares[rid] = Share(reserved=blocks, host=host_id)
        return True

    # --- growth --------------------------------------------------------------------

    def try_hold(self, rid: str, held: int) -> bool:
        """Set the blocks `rid` physically holds; they must lie within its reservation."""
        s = self.shares[rid]
        if held > s.room:
            return False
        if held < 0:
            raise ValueError(f"request {rid}: held={held} < 0")
        self.held_total += held - s.held
        s.held = held
        return True

    def try_top_up(self, rid: str, blocks: int, *, use_reserve: bool) -> int | None:
        """Grow `rid`'s reservation by `blocks` from free (then reserve) blocks.

        A guest that tops up leaves its host: its reservation becomes its own, and the
        host's promise shrinks by the same amount (the blocks were the host's idle ones).
        Returns the number of blocks drawn from the reserve, or None."""
        s = self.shares[rid]
        drawn = self._take(blocks, use_reserve)
        if drawn is None:
            return None
        if s.host is not None:
            self._detach(rid, s)
        s.reserved += blocks
        return drawn

    # --- release -------------------------------------------------------------------

    def release(self, rid: str, inherited: Mapping[str, int] | None = None) -> list[str]:
        """Drop `rid`'s share. A guest's blocks return to its host's idle promise; a host's
        guests keep their blocks, which become their own. `inherited`: blocks of `rid`
        that other holders of a shared prefix still hold, per heir (kv_blocks.py); they
        stay in use, charged to the heir, whose reservation grows to cover them. Returns
        the freed guests."""
        passed_on = sum(inherited.values()) if inherited else 0
        if passed_on > self.shares[rid].held:
            raise ValueError(f"request {rid} passes on {passed_on} blocks but holds {self.shares[rid].held}")
        s = self.shares.pop(rid)
        self.held_total -= s.held
        if s.host is not None:
            host = self.shares[s.host]
            host.guests.discard(rid)
            host.lent -= s.reserved
            host.reserved -= passed_on  # the blocks stay in use: out of the host's promise
            freed = []
        else:
            freed = sorted(s.guests)
            for gid in freed:
                self.shares[gid].host = None
            self._give_back(s.room - passed_on)
        for heir, n in (inherited or {}).items():
            h = self.shares[heir]
            if h.host is not None:
                self._detach(heir, h)
            h.reserved += n
            h.held += n
            self.held_total += n
        return freed

    # --- swap space on the host --------------------------------------------------------

    def try_park(self, blocks: int) -> bool:
        if self.host_swap_used + blocks > self.host_swap_total:
            return False
        self.host_swap_used += blocks
        return True

    def unpark(self, blocks: int) -> None:
        if blocks > self.host_swap_used:
            raise AssertionError(f"unpark {blocks} > parked {self.host_swap_used}")
        self.host_swap_used -= blocks

    # --- global reserve lease ------------------------------------------------------------

    def set_reserve_target(self, blocks: int) -> None:
        """Resize the global reserve lease; growth takes free blocks as they become free."""
        if not 0 <= blocks < self.total_blocks:
            raise ValueError(f"reserve target {blocks} must be in [0, {self.total_blocks})")
        self.reserve_target = blocks
        if self.reserve_free > blocks:
            self.free += self.reserve_free - blocks
            self.reserve_free = blocks
        else:
            move = min(self.free, blocks - self.reserve_free)
            self.free -= move
            self.reserve_free += move

    # --- internals ---------------------------------------------------------------------

    def _take(self, blocks: int, use_reserve: bool) -> int | None:
        if blocks <= self.free:
            self.free -= blocks
            return 0
        if not use_reserve or blocks > self.free + self.reserve_free:
            return None
        drawn = blocks - self.free
        self.free = 0
        self.reserve_free -= drawn
        return drawn

    def _give_back(self, blocks: int) -> None:
        refill = min(blocks, self.reserve_target - self.reserve_free)
        self.reserve_free += refill
        self.free += blocks - refill

    def _detach(self, rid: str, s: Share) -> None:
        assert s.host is not None, f"{rid} is not a guest"
        host = self.shares[s.host]
        host.guests.discard(rid)
        host.lent -= s.reserved
        host.reserved -= s.reserved
        s.host = None

    def check_invariants(self) -> None:
        """Raise AssertionError if the books do not balance."""
        owned = 0
        held = 0
        for rid, s in self.shares.items():
            assert s.held >= 0 and s.lent >= 0 and s.reserved >= 0, (rid, s)
            held += s.held
            if s.host is None:
                owned += s.reserved
                assert s.held + s.lent <= s.reserved, (rid, s)
                lent = 0
                for gid in s.guests:
                    g = self.shares.get(gid)
                    assert g is not None and g.host == rid, (rid, gid)
                    lent += g.reserved
                assert lent == s.lent, (rid, s, lent)
            else:
                host = self.shares.get(s.host)
                assert host is not None and host.host is None and rid in host.guests, (rid, s)
                assert s.held <= s.reserved and s.lent == 0 and not s.guests, (rid, s)
        assert self.free >= 0, self.free
        assert 0 <= self.reserve_free <= self.reserve_target, (self.reserve_free, self.reserve_target)
        assert self.free + self.reserve_free + owned == self.total_blocks, (
            self.free, self.reserve_free, owned, self.total_blocks)
        assert held == self.held_total, (held, self.held_total)
        assert 0 <= self.host_swap_used <= self.host_swap_total, (self.host_swap_used, self.host_swap_total)
