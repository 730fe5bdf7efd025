"""The SLO classes: one table for the simulator, the engine adapter and the cluster.

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



def scaled_slo_classes(unit_s: float) -> dict[str, Slo]:
    """The SLO classes as multiples (SLO_MULTIPLES) of `unit_s`, an engine's unloaded
    per-token latency; `scaled_slo_classes(0.010)` equals SLO_CLASSES."""
    if not unit_s > 0:
        raise ValueError(f"unit_s={unit_s} must be > 0")
    return {
        name: Slo(name, ttft_s=ttft_x * unit_s, tbt_s=tbt_x * unit_s)
        for name, (ttft_x, tbt_x) in SLO_MULTIPLES.items()
    }


# The H100 classes: realtime 1 s / 0.1 s, chat 3 s / 0.2 s, batch 15 s / 1 s (TTFT / TBT).
SLO_CLASSES: dict[str, Slo] = scaled_slo_classes(H100_LLAMA3_8B_UNIT_S)
SLO_CLASS_NAMES: tuple[str, ...] = tuple(SLO_MULTIPLES)


def slo_seconds(classes: Mapping[str, Slo]) -> dict[str, tuple[float, float]]:
    """{name: (ttft_s, tbt_s)}: the classes as plain JSON-able data (engine settings)."""
    return {name: (slo.ttft_s, slo.tbt_s) for name, slo in classes.items()}


def get_slo_class(name: str, classes: Mapping[str, Slo] = SLO_CLASSES) -> Slo:
    try:
        return classes[name]
    except KeyError:
        raise ValueError(f"unknown SLO class {name!r}; known: {sorted(classes)}") from None
