"""Arrival-rate estimation and the confidence p it tunes (DESIGN section 4.1).

This logic runs in the global scheduler (a Ray actor in the cluster, the driver in the
simulator): it takes arrival times and outcome events, and returns the p that replicas use
for new requests. Pure Python; the clock is whatever times the caller passes in.

Why p falls as load rises: padding buys safety (fewer top-ups and preemptions) with KV
that could hold other requests. When arrivals are sparse that KV is idle anyway, so pad
generously; when they crowd in, every padded block is a request kept waiting.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Protocol


class ConfidenceController(Protocol):
    """What the global scheduler (or the simulator driver) runs: it hears of every
    arrival and every finish, and says which p new requests get."""

    def observe_arrival(self, arrival_s: float) -> None: ...

    def observe_finish(self, under_predicted: bool) -> None: ...

    def confidence(self, now_s: float) -> float: ...


class ArrivalRateEstimator:
    """Arrivals per second over a sliding window of `window_s` seconds."""

    def __init__(self, window_s: float = 10.0):
        if window_s <= 0:
            raise ValueError(f"window_s={window_s} must be > 0")
        self.window_s = window_s
        self._times: deque[float] = deque()

    def observe(self, arrival_s: float) -> None:
        self._times.append(arrival_s)

    def rate_rps(self, now_s: float) -> float:
        times = self._times
        while times and times[0] <= now_s - self.window_s:
            times.popleft()
        if not times:
            return 0.0
        # Early on the window is not full yet: divide by the time actually observed.
        span_s = min(self.window_s, max(now_s - times[0], self.window_s / 10))
        return len(times) / span_s


@dataclass(frozen=True)
class RateTunedConfidence:
    """p(rate): p_max up to `low_rps`, p_min from `high_rps`, linear in between.

    Non-increasing in the rate by construction. The rates are per replica; a deployment
    sets them from its sustainable rate (the simulator's sweep or `cacheopt bench`)."""

    p_min: float = 0.3
    p_max: float = 0.9
    low_rps: float = 8.0  # half and all of CacheOPT's sustainable rate on the simulated
    high_rps: float = 16.5  # H100 replica with the conv trace's training split

    def __post_init__(self) -> None:
        if not 0.0 < self.p_min <= self.p_max < 1.0:
            raise ValueError(f"need 0 < p_min={self.p_min} <= p_max={self.p_max} < 1")
        if not 0.0 <= self.low_rps < self.high_rps:
            raise ValueError(f"need 0 <= low_rps={self.low_rps} < high_rps={self.high_rps}")

    def confidence(self, rate_rps: float) -> float:
        if math.isnan(rate_rps):
            raise ValueError("arrival rate is NaN")
        share = (rate_rps - self.low_rps) / (self.high_rps - self.low_rps)
        share = min(1.0, max(0.0, share))
        return self.p_max - share * (self.p_max - self.p_min)


@dataclass(frozen=True)
class FixedConfidence:
    """The same p whatever happens (the baseline the tuners are measured against)."""

    p: float

    def __post_init__(self) -> None:
        if not 0.0 < self.p < 1.0:
            raise ValueError(f"p={self.p} must lie in (0, 1)")

    def observe_arrival(self, arrival_s: float) -> None:
        pass

    def observe_finish(self, under_predicted: bool) -> None:
        pass

    def confidence(self, now_s: float) -> float:
        return self.p


class RateController:
    """p from the arrival rate over the last `window_s` seconds."""

    def __init__(self, tuner: RateTunedConfidence, window_s: float = 10.0):
        self.tuner = tuner
        self.estimator = ArrivalRateEstimator(window_s)

    def observe_arrival(self, arrival_s: float) -> None:
        self.estimator.observe(arrival_s)

    def observe_finish(self, under_predicted: bool) -> None:
        pass

    def confidence(self, now_s: float) -> float:
        return self.tuner.confidence(self.estimator.rate_rps(now_s))


class FeedbackConfidence:
    """Holds the observed rate of under-predictions (requests that outlive the bound they
    were admitted with) at `target`: each event moves p up by `step * (1 - target)`, each
    on-time finish moves it down by `step * target`, so p settles where the miss rate is
    the target (a stochastic-approximation update), clamped to [p_min, p_max]."""

    def __init__(self, target: float = 0.3, *, step: float = 0.002, p_min: float = 0.3, p_max: float = 0.9,
                 initial: float | None = None):
        if not 0.0 < target < 1.0:
            raise ValueError(f"target={target} must lie in (0, 1)")
        if not 0.0 < p_min <= p_max < 1.0:
            raise ValueError(f"need 0 < p_min={p_min} <= p_max={p_max} < 1")
        if step <= 0:
            raise ValueError(f"step={step} must be > 0")
        self.target, self.step, self.p_min, self.p_max = target, step, p_min, p_max
        self.p = p_max if initial is None else min(p_max, max(p_min, initial))

    def observe_arrival(self, arrival_s: float) -> None:
        pass

    def observe_finish(self, under_predicted: bool) -> float:
        error = (1.0 if under_predicted else 0.0) - self.target
        self.p = min(self.p_max, max(self.p_min, self.p + self.step * error))
        return self.p

    def confidence(self, now_s: float = 0.0) -> float:
        return self.p
