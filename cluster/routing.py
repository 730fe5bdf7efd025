"""The KV-headroom routing rule, pure: `rank_by_headroom` orders candidate replicas by
what the router knows of them. The Ray Serve router (cluster/router.py) and the cluster
simulator (bench/cluster_sim.py) both call it.

The least loaded replica first, failing replicas last. With the rule's KV part on
(`headroom`; off by default, ROUTER_HEADROOM), replicas with KV room for one more request
(free plus idle reservations, less what their queue will take and what this router sent
them since their snapshot) go before those without, and among those without room the most
headroom first.

A serving replica also reports the requests it holds (`accepted`, read at `read_s`), those
still being parsed or tokenized included: its engine's snapshot, taken at the last step,
does not show those yet, so a router that stopped charging for a request once a snapshot
was taken after it was sent would miss the requests in between (where least connections
counts every open one).

Prefix affinity (`PrefixIndex`): where a request's prompt starts with blocks this router
sent to a replica lately, vLLM's prefix cache there likely still holds them, and the
replica skips their prefill. Among replicas with room whose load is within
`PREFIX_SLACK_REQUESTS` of the least loaded one, the one holding the longest prefix goes
first; without a prefix anywhere the order is by load (and room) alone.
"""

from __future__ import annotations

import heapq
import json
import operator
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable, Sequence
from typing import NamedTuple

import numpy as np

from replicas.snapshot import KVSnapshot

# A snapshot older than this is not trusted (the replica may be gone or stuck).
SNAPSHOT_MAX_AGE_S = 2.0
ROUTING_STATS_PERIOD_S = 0.1  # how often Serve's controller collects each replica's snapshot
# How many requests more than the least loaded replica holds a replica may hold and still be
# chosen for the prefix it caches (chosen on the sessions training split, docs/RESULTS.md 4.6).
PREFIX_SLACK_REQUESTS = 2
# Whether router: kv ranks by KV room before load (the rule's KV part). Off: the ablation
# without it did better on the sessions training split, at the real engine's KV sizes too,
# and at 1-64 replicas it never beat power of two choices (docs/RESULTS.md 4.6, 4.7, 7).
ROUTER_HEADROOM = False


class ReplicaView(NamedTuple):
    """What the router knows of one candidate replica (a tuple: a router builds one per
    replica per request)."""

    snapshot: KVSnapshot | None
    sent_since_snapshot: int = 0  # requests this router sent it after the snapshot (or the count below) was taken
    healthy: bool = True  # False: it failed requests lately or its engine is dead
    request_blocks: float = 0.0  # what a finished request held (prompt and output), smoothed, as the replica reports
    # Requests the replica holds (its engine's and those being prepared), when it reports
    # them: then the load, with `sent_since_snapshot` counted from when it was read.
    accepted: int | None = None
    preparing: int = 0  # of those, not yet in its engine (so not in the KV snapshot)
    prefix_blocks: int = 0  # leading blocks of the request's prompt this router sent it lately (PrefixIndex)


def blocks_per_request(views: Sequence[ReplicaView]) -> float:
    """The charge for each request sent since a snapshot: what the replicas say a
    finished request held, on average (the worst case, prompt plus max_tokens, is several
    times that: with it the rule saw most replicas without room and ranked by room alone)."""
    known = [v.request_blocks for v in views if v.request_blocks > 0]
    return sum(known) / len(known) if known else 0.0


def rank_by_headroom(views: Sequence[ReplicaView], now_s: float, limit: int | None = None,
                     prefix_slack: float = PREFIX_SLACK_REQUESTS,
                     headroom: bool = ROUTER_HEADROOM) -> list[int] | None:
    """Candidate indices, best first (the best `limit` of them), or None when some
    snapshot is missing or stale.

    The least loaded (the requests it holds, or its engine's running and waiting where it
    does not report them, plus those sent since) goes first, as Serve's default router
    would pick: compute is what a new request waits for. Except that among those within
    `prefix_slack` requests of the least loaded, the longest prefix held goes first (then
    the least loaded). Replicas that failed requests lately go last.

    With `headroom=True` (off by default, ROUTER_HEADROOM; docs/RESULTS.md 4.6, 4.7) KV
    headroom decides first: a replica with room for one more request (headroom less the
    charge for what was sent since its snapshot, plus the prefix it holds, blocks the
    request will not need there) ranks before every replica without, and among those
    without room the most headroom wins; the order above applies among those with room."""
    oldest = now_s - SNAPSHOT_MAX_AGE_S
    if any(v.snapshot is None or v.snapshot.taken_s < oldest for v in views):
        return None
    charge = blocks_per_request(views)
    rows = []
    for v in views:
        s = v.snapshot
        assert s is not None
        room = s.headroom_blocks - charge * (v.sent_since_snapshot + v.preparing) + v.prefix_blocks if headroom \
            else charge
        held = s.num_running + s.num_waiting if v.accepted is None else v.accepted
        rows.append((room, room >= charge, v.sent_since_snapshot + held))
    least = min((load for (_, fits, load), v in zip(rows, views) if fits and v.healthy), default=0)
    keys = []
    for i, ((room, fits, load), v) in enumerate(zip(rows, views)):
        near = fits and load <= least + prefix_slack
        keys.append((not v.healthy, not fits, not near, -v.prefix_blocks if near else 0, load if fits else 0,
                     -room, -v.snapshot.reserve_free_blocks, i))  # type: ignore[union-attr]
    best = sorted(keys) if limit is None or limit >= len(keys) else heapq.nsmallest(limit, keys)
    return [key[-1] for key in best]


class PrefixIndex:
    """The prompt blocks this router sent each replica lately: per replica an LRU of block
    keys, as many as its KV cache holds (vLLM's prefix cache evicts least recently used
    blocks, a request's last blocks first; a prompt's first block is recorded as its most
    recent so). It knows what this router sent, not what the replica caches: another
    router's sends and the replica's evictions under pressure are guesses."""

    def __init__(self) -> None:
        self._held: dict[Hashable, OrderedDict] = {}

    def matched(self, replica: Hashable, keys: Sequence[Hashable]) -> int:
        """How many of `keys`, from the first, were sent to `replica` and not yet evicted here."""
        held = self._held.get(replica)
        if not held:
            return 0
        n = 0
        for key in keys:
            if key not in held:
                break
            n += 1
        return n

    def record(self, replica: Hashable, keys: Sequence[Hashable], capacity_blocks: int) -> None:
        held = self._held.setdefault(replica, OrderedDict())
        for key in reversed(keys):
            held[key] = None
            held.move_to_end(key)
        while len(held) > max(capacity_blocks, 0):
            held.popitem(last=False)

    def keep_only(self, replicas: Iterable[Hashable]) -> None:
        """Forget replicas that are gone."""
        alive = set(replicas)
        for replica in [r for r in self._held if r not in alive]:
            del self._held[replica]


CHARS_PER_TOKEN = 4  # a text prompt's blocks are of block_tokens * this many characters


def prompt_block_keys(body: bytes, block_tokens: int, max_blocks: int = 4096) -> tuple[int, ...]:
    """Keys of the full blocks of an OpenAI request's prompt, each naming the prompt up to
    its end (a chained hash), for PrefixIndex: token ids in blocks of `block_tokens` (the
    engine's block size, so a key is one of vLLM's blocks), text (a completion's prompt,
    or a chat's messages in order) in blocks of about as many tokens. No keys for anything
    else, or for a body cut short (HAProxy forwards at most its buffer). Python's hash:
    keys compare within one process (the router's), which is all PrefixIndex needs."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ()
    if not isinstance(request, dict):
        return ()
    prompt = request.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (list, str)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not all(isinstance(t, int) for t in prompt):
            return ()
        size: int = block_tokens
        units: Sequence = prompt
    elif isinstance(prompt, str):
        size, units = block_tokens * CHARS_PER_TOKEN, prompt
    elif isinstance(messages := request.get("messages"), list):
        size = block_tokens * CHARS_PER_TOKEN
        units = "".join(f"\x00{m.get('role')}\x01{m.get('content')}" for m in messages if isinstance(m, dict))
    else:
        return ()
    keys, key = [], 0
    for start in range(0, min(len(units) // size, max_blocks) * size, size):
        key = hash((key, tuple(units[start:start + size]) if isinstance(units, list) else units[start:start + size]))
        keys.append(key)
    return tuple(keys)


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
        self._total_blocks = np.zeros(n)

    def rank(self, candidates: Sequence, now_s: float, limit: int | None = None,
             prefix_blocks: Sequence[int] | None = None,
             prefix_slack: float = PREFIX_SLACK_REQUESTS, headroom: bool = ROUTER_HEADROOM) -> list[int] | None:
        """rank_by_headroom's answer for `candidates` (indices into it); `prefix_blocks`:
        each candidate's ReplicaView.prefix_blocks (none: zeros)."""
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
        prefix = np.zeros(len(candidates)) if prefix_blocks is None else np.asarray(prefix_blocks, dtype=float)
        room = self._headroom - charge * (self._sent_count + self._preparing) + prefix if headroom \
            else np.full(len(candidates), charge)
        fits = room >= charge
        load = np.where(fits, self._sent_count + self._base_load, 0.0)
        eligible = fits & ~self._unhealthy
        least = load[eligible].min() if eligible.any() else 0.0
        near = fits & (load <= least + prefix_slack)
        order = np.lexsort((np.arange(len(candidates)), -self._reserve_free, -room, load, np.where(near, -prefix, 0.0),
                            ~near, ~fits, self._unhealthy))
        return order[:limit].tolist() if limit is not None else order.tolist()

    def total_blocks(self, index: int) -> int:
        """The KV blocks of candidate `index` of the last ranking (0: not known)."""
        return int(self._total_blocks[index])

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
        self._total_blocks = np.zeros(n)

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
            self._total_blocks[i] = kv["total_blocks"]
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
