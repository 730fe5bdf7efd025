"""The projected peak of a replica's KV usage (DESIGN section 4, mechanism 2).

Every running request is expected to grow by one token per step until its predicted last
step, then free everything. Time is counted in engine steps since the replica started,
so an entry does not move while its request decodes:

    request i holds  a_i + t  tokens at the end of step t,   for t <= T_i (its last step)

with T_i = now + remaining - 1 and a_i = (tokens after this step) - now, so every term
a_i + t (a size) is positive for t >= now, which the tie handling below relies on. Usage only falls
at a finish point and rises in between, so the peak over the future is taken at some
T_k, where everyone still running has grown to a_i + T_k:

    usage(T_k) = sum_{i: T_i >= T_k} (a_i + T_k)            peak = max_k usage(T_k)

This is LightLLM's `_can_add_new_req` (Past-Future scheduler, ASPLOS'25) in absolute
time: entries sorted by T, suffix sums of a. Adding a candidate (T_c, a_c) raises every
point before T_c by a_c + T_k and adds one point at T_c, so one sorted pass (C-level
`accumulate`, rebuilt lazily after a change) answers any number of candidates by
bisection. Changes are O(log n) plus a list insert; a step in which everyone decodes
changes nothing.

Each entry carries `slack` tokens of block rounding (block_size - 1: a request holding x
tokens holds at most (x + block_size - 1) / block_size blocks), so `peak // block_size`
bounds the blocks, not just the tokens. Standard library only.
"""

from __future__ import annotations

import bisect
import operator
from itertools import accumulate


class PeakProjection:
    def __init__(self, slack_tokens: int = 0):
        if slack_tokens < 0:
            raise ValueError(f"slack_tokens={slack_tokens} must be >= 0")
        self.slack_tokens = slack_tokens
        self._finish: list[int] = []  # T, ascending
        self._offset: list[int] = []  # a + slack, aligned with _finish
        self._ids: list[str] = []
        self._entries: dict[str, tuple[int, int]] = {}
        self._stale = True
        self._suffix_offset: list[int] = []
        self._point: list[int] = []  # usage(T_k) over the entries from k on (ties: the first of a run is exact)
        self._prefix_max_rising: list[int] = []  # max over j <= k of usage(T_j) + T_j
        self._suffix_max_point: list[int] = []  # max over j >= k of usage(T_j)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, rid: str) -> bool:
        return rid in self._entries

    def entry(self, rid: str) -> tuple[int, int]:
        """(T, a) of a request, a without the slack."""
        finish, offset = self._entries[rid]
        return finish, offset - self.slack_tokens

    def set(self, rid: str, finish_step: int, offset_tokens: int) -> None:
        """Add a request, or move it (a new bound, a step without progress)."""
        if rid in self._entries:
            self.discard(rid)
        offset = offset_tokens + self.slack_tokens
        i = bisect.bisect_right(self._finish, finish_step)
        self._finish.insert(i, finish_step)
        self._offset.insert(i, offset)
        self._ids.insert(i, rid)
        self._entries[rid] = (finish_step, offset)
        self._stale = True

    def discard(self, rid: str) -> None:
        entry = self._entries.pop(rid, None)
        if entry is None:
            return
        i = bisect.bisect_left(self._finish, entry[0])
        while self._ids[i] != rid:
            i += 1
        del self._finish[i], self._offset[i], self._ids[i]
        self._stale = True

    def expired(self, now_step: int) -> list[str]:
        """Requests whose last predicted step is before `now_step` (they outlived their
        bound), earliest first."""
        return self._ids[:bisect.bisect_left(self._finish, now_step)]

    def peak_tokens(self) -> int:
        """The largest projected usage over the future (0 with nobody running)."""
        self._refresh()
        return max(self._point, default=0)

    def peak_with(self, finish_step: int, offset_tokens: int) -> int:
        """The peak if a request with this entry joined."""
        self._refresh()
        offset = offset_tokens + self.slack_tokens
        n = len(self._finish)
        first_at = bisect.bisect_left(self._finish, finish_step)
        after = bisect.bisect_right(self._finish, finish_step)
        own = (self._suffix_offset[first_at] if first_at < n else 0) + offset + (n - first_at + 1) * finish_step
        peak = own
        if after > 0:  # points before it finishes: it is there too, grown to offset + T_k
            peak = max(peak, self._prefix_max_rising[after - 1] + offset)
        if after < n:
            peak = max(peak, self._suffix_max_point[after])
        return peak

    def _refresh(self) -> None:
        if not self._stale:
            return
        finish, n = self._finish, len(self._finish)
        self._suffix_offset = list(accumulate(reversed(self._offset)))[::-1]
        self._point = list(map(operator.add, self._suffix_offset, map(operator.mul, range(n, 0, -1), finish)))
        self._prefix_max_rising = list(accumulate(map(operator.add, self._point, finish), max))
        self._suffix_max_point = list(accumulate(reversed(self._point), max))[::-1]
        self._stale = False
