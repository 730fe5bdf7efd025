"""Confidence bounds on a point estimate of output length, fitted on calibration residuals.

Both methods work per bucket of the point estimate (requests predicted short and long
err differently), so coverage holds within each bucket, not just on average.

- `conformal`: split conformal. Residuals are log ratios log(true / point); the bound at
  confidence p is point * exp(r_(k)), r_(k) the k-th smallest calibration residual with
  k = ceil((n + 1) p). For exchangeable data Pr(true <= bound) >= p (Vovk et al.;
  Angelopoulos & Bates, "A Gentle Introduction to Conformal Prediction", 2021).
- `hoeffding`: the paper's form. Residuals are additive, true - point, with observed range
  [a, b]; the one-sided Hoeffding deviation at confidence p over n calibration samples is
  t = (b - a) sqrt(ln(1 / (1 - p)) / (2 n)), and the bound is point + mean + t. This
  bounds the deviation of the mean residual, not of one request's, so its per-request
  coverage can fall short of p; the predictor evaluation measures by how much.

A request that outlives its bound gets a conditional one: the same method over the
calibration residuals of requests that reached at least as far (g tokens for a point
estimate of `point`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from predictor.base import check_confidence

METHODS = ("conformal", "hoeffding")


@dataclass(frozen=True)
class ResidualBound:
    method: str
    edges: tuple[float, ...]  # bucket edges on the point estimate
    residuals: tuple[tuple[float, ...], ...]  # sorted residuals per bucket

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown bound method {self.method!r}; choose one of {', '.join(METHODS)}")
        if len(self.residuals) != len(self.edges) + 1 or not all(self.residuals):
            raise ValueError("a residual bound needs a non-empty residual list for each of len(edges) + 1 buckets")

    def upper(self, point: float, confidence: float) -> float:
        """An upper bound on the true length at `confidence`, given the point estimate."""
        check_confidence(confidence)
        return self._bound(point, self._bucket(point), confidence)

    def conditional_upper(self, point: float, generated: int, confidence: float) -> float:
        """The bound for a request that has generated `generated` tokens and goes on:
        only calibration requests that got at least as far count. math.inf if none did."""
        check_confidence(confidence)
        residuals = self._bucket(point)
        reached = self._residual(point, generated)
        beyond = residuals[bisect.bisect_left(residuals, reached):]
        if not beyond:
            return math.inf
        return max(generated + 1, self._bound(point, beyond, confidence))

    def _bucket(self, point: float) -> Sequence[float]:
        return self.residuals[bisect.bisect_right(self.edges, point)]

    def _residual(self, point: float, true: float) -> float:
        if self.method == "conformal":
            return math.log(max(true, 1) / max(point, 1))
        return true - point

    def _bound(self, point: float, residuals: Sequence[float], confidence: float) -> float:
        n = len(residuals)
        if self.method == "conformal":
            k = math.ceil((n + 1) * confidence)
            if k > n:
                return math.inf  # too few samples to certify this confidence
            return max(point, 1) * math.exp(residuals[k - 1])
        mean = sum(residuals) / n
        spread = residuals[-1] - residuals[0]
        return point + mean + spread * math.sqrt(math.log(1 / (1 - confidence)) / (2 * n))

    def to_dict(self) -> dict:
        return {"method": self.method, "edges": list(self.edges), "residuals": [list(r) for r in self.residuals]}

    @classmethod
    def from_dict(cls, data: dict) -> ResidualBound:
        try:
            return cls(data["method"], tuple(data["edges"]), tuple(tuple(r) for r in data["residuals"]))
        except (KeyError, TypeError) as error:
            raise ValueError(f"malformed residual bound data: {error}") from None


def fit_bound(method: str, points: Sequence[float], truths: Sequence[float], *,
              num_buckets: int = 4) -> ResidualBound:
    """Calibrate `method` on (point estimate, true length) pairs, with buckets at the
    quantiles of the point estimates so that each holds about the same number of samples."""
    if len(points) != len(truths):
        raise ValueError(f"{len(points)} points but {len(truths)} true lengths")
    if len(points) < num_buckets * 10:
        raise ValueError(f"{len(points)} calibration samples are too few for {num_buckets} buckets (need 10 each)")
    if method not in METHODS:
        raise ValueError(f"unknown bound method {method!r}; choose one of {', '.join(METHODS)}")
    ordered = sorted(points)
    edges = tuple(ordered[len(ordered) * i // num_buckets] for i in range(1, num_buckets))
    template = ResidualBound(method, edges, tuple((0.0,) for _ in range(num_buckets)))
    buckets: list[list[float]] = [[] for _ in range(num_buckets)]
    for point, true in zip(points, truths):
        buckets[bisect.bisect_right(edges, point)].append(template._residual(point, true))
    if not all(buckets):
        # Repeated point estimates can leave a bucket empty: merge into one bucket.
        return fit_bound(method, points, truths, num_buckets=1) if num_buckets > 1 else template
    return ResidualBound(method, edges, tuple(tuple(sorted(b)) for b in buckets))
