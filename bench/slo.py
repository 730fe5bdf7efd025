"""Which SLO class each replayed request gets: a deterministic draw from a mix.

The classes themselves live in replicas/slo.py (one table for every path).
"""

from __future__ import annotations

from collections.abc import Mapping

from replicas.request import Slo
from replicas.slo import SLO_CLASSES, get_slo_class

# Share of requests per class; a mapping from class name to a non-negative weight.
DEFAULT_SLO_MIX: dict[str, float] = {"realtime": 0.2, "chat": 0.5, "batch": 0.3}


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def unit_hash(index: int, seed: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, index)."""
    return _splitmix64(_splitmix64(seed & 0xFFFFFFFFFFFFFFFF) ^ (index & 0xFFFFFFFFFFFFFFFF)) / 2.0**64


def _cumulative_mix(mix: Mapping[str, float], classes: Mapping[str, Slo]) -> list[tuple[float, Slo]]:
    if not mix:
        raise ValueError("SLO mix is empty")
    for name, weight in mix.items():
        get_slo_class(name, classes)
        if not weight >= 0:
            raise ValueError(f"SLO mix weight for {name!r} is {weight}; must be >= 0")
    total = sum(mix.values())
    if total <= 0:
        raise ValueError(f"SLO mix weights sum to {total}; must be > 0")
    cumulative, edges = 0.0, []
    for name, weight in mix.items():
        cumulative += weight / total
        edges.append((cumulative, classes[name]))
    return edges


def make_slo_assigner(
    mix: Mapping[str, float] = DEFAULT_SLO_MIX,
    classes: Mapping[str, Slo] = SLO_CLASSES,
):
    """Validate `mix` once and return `assign(index, seed) -> Slo` (for loading whole traces)."""
    edges = _cumulative_mix(mix, classes)
    last = edges[-1][1]

    def assign(index: int, seed: int) -> Slo:
        u = unit_hash(index, seed)
        for edge, slo in edges:
            if u < edge:
                return slo
        return last  # u within rounding of 1.0

    return assign


def assign_slo(
    index: int,
    seed: int,
    mix: Mapping[str, float] = DEFAULT_SLO_MIX,
    classes: Mapping[str, Slo] = SLO_CLASSES,
) -> Slo:
    """The SLO class of request `index`: a pure function of (seed, index), drawn from `mix`
    (class name -> weight; weights are normalised). Unknown class names raise ValueError."""
    return make_slo_assigner(mix, classes)(index, seed)
