"""Memory diagnostics for operators chasing growth in a long-running process (the
replica's `memory_report` serves them over a deployment handle). Plain Python, no Ray."""

from __future__ import annotations

import gc
import os
import tracemalloc
import types
from collections import Counter


def memory_report(top: int = 30, holders_of: str | None = None) -> dict:
    """This process's RSS, its live Python objects by type (the `top` most numerous), when
    the process runs with PYTHONTRACEMALLOC the allocation sites holding the most, and with
    `holders_of` (a type's qualified name) what keeps a few such objects alive.

    Ray Serve freezes a replica's objects once it has started (gc.freeze, to shorten
    collections): `objects` and `by_type` count only those made since, which is where
    growth shows, and `frozen_objects` the rest. The holder search must see frozen
    holders too, so it unfreezes and freezes again: what is live at that moment is frozen
    with the startup objects, and if it later becomes cyclic garbage it is not collected
    (a diagnostic to call now and then, not per request)."""
    import psutil

    gc.collect()
    census = Counter(type(o).__qualname__ for o in gc.get_objects())
    report: dict = {"pid": os.getpid(), "rss_bytes": psutil.Process().memory_info().rss,
                    "objects": sum(census.values()), "frozen_objects": gc.get_freeze_count(),
                    "by_type": dict(census.most_common(top))}
    if tracemalloc.is_tracing():
        stats = tracemalloc.take_snapshot().statistics("lineno")[:top]
        report["allocations"] = [(str(s.traceback), s.size, s.count) for s in stats]
    if holders_of:
        frozen = gc.get_freeze_count() > 0
        gc.unfreeze()
        try:
            report["holders"] = holder_chains(holders_of)
        finally:
            if frozen:
                gc.freeze()
    return report


def holder_chains(type_name: str, sample: int = 3, depth: int = 6) -> list[list[str]]:
    """For the `sample` most recently created live objects whose type is named `type_name`:
    the object's repr, then the chain of objects holding it, nearest first, described
    briefly.

    Each step follows the first referrer that is not this search's own bookkeeping; a
    chain ends at a module, a class, a frame (shown with its code's place) or an object
    with no holder the collector can see (one held only from C code, or by a function
    still running, ends there)."""
    gc.collect()
    found = [o for o in gc.get_objects() if type(o).__qualname__ == type_name][-sample:]
    chains: list[list[str]] = []
    for obj in found:
        chain, ignore, scratch = [repr(obj)[:160]], {id(found), id(chains)}, []
        for _ in range(depth):
            ignore.add(id(obj))
            referrers = gc.get_referrers(obj)
            holders = [r for r in referrers if id(r) not in ignore and not _is_ours(r)]
            scratch += [referrers, holders]  # the search's own lists refer to what it walks; kept, their ids stay theirs
            ignore.update(map(id, scratch))
            if not holders:
                break
            obj = holders[0]
            chain.append(describe(obj))
            if isinstance(obj, (types.ModuleType, type, types.FrameType)):
                break
        chains.append(chain)
    return chains


def _is_ours(obj: object) -> bool:
    return isinstance(obj, types.FrameType) and obj.f_code.co_filename == __file__


def describe(obj: object) -> str:
    """A short, safe description: the type, then a size, some keys, a name or a place."""
    kind = type(obj).__qualname__
    if isinstance(obj, types.FrameType):
        return f"frame {obj.f_code.co_qualname} {obj.f_code.co_filename}:{obj.f_lineno}"
    if isinstance(obj, dict):
        return f"{kind} keys={[str(k)[:40] for k in list(obj)[:6]]}"
    if isinstance(obj, (list, tuple, set, frozenset)) or kind == "deque":
        return f"{kind} len={len(obj)}"  # type: ignore[arg-type]
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if isinstance(name, str):
        return f"{kind} {name}"
    return kind
