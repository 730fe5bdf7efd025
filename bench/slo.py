"""SLO classes with heterogeneous TBT objectives, and a deterministic per-request assignment.

Every class is a multiple of one unit: the engine's unloaded per-token latency (the decode
step time of a lone request). Llama-3-8B in bf16 on one H100 reads ~16 GB of weights per
decode step: ~5 ms at 3.35 TB/s, ~10 ms with kernel and scheduler overhead. Under load, a
decode step with a batch of hundreds and a chunked-prefill piece takes roughly 10-40 ms.

    class     TTFT            TBT            on an H100 (unit 10 ms)
    realtime  100 x unit      10 x unit      1 s,  0.1 s
    chat      300 x unit      20 x unit      3 s,  0.2 s
    batch     1500 x unit     100 x unit     15 s, 1.0 s

Why these multiples (the same reasoning as DistServe's per-application SLOs and
Sarathi-Serve's "strict" and "relaxed" P99 TBT of ~5x and ~25x a decode iteration):
- realtime TBT = 10 units, 2.5-10 loaded decode steps: met by any schedule that keeps
  decoding, but missed by a single recompute stall (a preempted request re-prefills its
  whole context and waits for admission again: hundreds of ms). This is the class that
  preemption policy decides.
- chat TBT = 20 units, ~0.2 s: a little faster than people read (~5 tokens/s), so a user
  sees a stall only when a request is preempted and waits.
- batch TBT = 100 units, 1 s: streaming hardly matters; the victim of choice for
  SLO-aware preemption (loosest TBT first).
- TTFT grows with the same ratios: realtime must start within ~100 steps (a few prefills
  of trace-sized prompts queued ahead), batch tolerates queueing behind a burst.

The Azure conversation trace at its native 5.5 req/s loads one H100 lightly, so the TTFT
objectives bite only when the rate is scaled up, which is what the sweep does.
"""

from __future__ import annotations

from collections.abc import Mapping

from replicas.request import Slo

# (TTFT multiple, TBT multiple) of the engine's unloaded per-token latency.
SLO_MULTIPLES: dict[str, tuple[float, float]] = {
    "realtime": (100.0, 10.0),
    "chat": (300.0, 20.0),
    "batch": (1500.0, 100.0),
}

# Unloaded per-token latency of Llama-3-8B (bf16) on one H100 that SLO_CLASSES assumes.
H100_LLAMA3_8B_UNIT_S = 0.010

SLO_CLASSES: dict[str, Slo] = {
    "realtime": Slo("realtime", ttft_s=1.0, tbt_s=0.1),
    "chat": Slo("chat", ttft_s=3.0, tbt_s=0.2),
    "batch": Slo("batch", ttft_s=15.0, tbt_s=1.0),
}

# Share of requests per class; a mapping from class name to a non-negative weight.
DEFAULT_SLO_MIX: dict[str, float] = {"realtime": 0.2, "chat": 0.5, "batch": 0.3}


def scaled_slo_classes(unit_s: float) -> dict[str, Slo]:
    """The SLO classes as multiples (SLO_MULTIPLES) of `unit_s`, an engine's unloaded
    per-token latency; `scaled_slo_classes(0.010)` equals SLO_CLASSES."""
    if not unit_s > 0:
        raise ValueError(f"unit_s={unit_s} must be > 0")
    return {
        name: Slo(name, ttft_s=ttft_x * unit_s, tbt_s=tbt_x * unit_s)
        for name, (ttft_x, tbt_x) in SLO_MULTIPLES.items()
    }


def get_slo_class(name: str, classes: Mapping[str, Slo] = SLO_CLASSES) -> Slo:
    try:
        return classes[name]
    except KeyError:
        raise ValueError(f"unknown SLO class {name!r}; known: {sorted(classes)}") from None


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
