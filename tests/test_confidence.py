"""Arrival-rate estimate and the confidence it tunes."""

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from global_scheduler.confidence import (
    ArrivalRateEstimator,
    FeedbackConfidence,
    FixedConfidence,
    RateController,
    RateTunedConfidence,
)


def test_rate_estimate_of_a_steady_stream():
    """A stream at 5 req/s reads as 5 req/s once the window is full."""
    est = ArrivalRateEstimator(window_s=10.0)
    for i in range(200):
        est.observe(i * 0.2)
    assert est.rate_rps(40.0) == pytest.approx(5.0, rel=0.03)


def test_rate_estimate_forgets_old_arrivals():
    """Arrivals older than the window no longer count."""
    est = ArrivalRateEstimator(window_s=10.0)
    for i in range(100):
        est.observe(i * 0.1)
    assert est.rate_rps(100.0) == 0.0


@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=2, max_size=30))
def test_rate_tuned_confidence_never_rises_with_rate(rates):
    """p(rate) is non-increasing and stays within [p_min, p_max]."""
    tuner = RateTunedConfidence(p_min=0.5, p_max=0.95, low_rps=6, high_rps=14)
    ps = [tuner.confidence(r) for r in sorted(rates)]
    assert all(a >= b for a, b in zip(ps, ps[1:]))
    assert all(0.5 <= p <= 0.95 for p in ps)


def test_rate_tuned_confidence_end_points():
    """p_max at or below low_rps, p_min at or above high_rps, the midpoint halfway."""
    tuner = RateTunedConfidence(p_min=0.5, p_max=0.9, low_rps=4, high_rps=8)
    assert tuner.confidence(2) == 0.9 and tuner.confidence(20) == 0.5
    assert tuner.confidence(6) == pytest.approx(0.7)


def test_feedback_settles_where_misses_hit_the_target():
    """If misses happen with probability 1 - p (a calibrated bound), p settles near 1 - target."""
    rng = random.Random(0)
    feedback = FeedbackConfidence(target=0.2, step=0.002, p_min=0.5, p_max=0.99)
    history = [feedback.observe_finish(rng.random() > feedback.confidence()) for _ in range(30000)]
    settled = history[10000:]
    assert sum(settled) / len(settled) == pytest.approx(0.8, abs=0.02)


@pytest.mark.parametrize("kwargs", [dict(p_min=0.9, p_max=0.5), dict(low_rps=5, high_rps=5), dict(p_max=1.0)])
def test_bad_tuner_settings_are_clear_errors(kwargs):
    """Impossible settings raise ValueError naming the values."""
    with pytest.raises(ValueError):
        RateTunedConfidence(**kwargs)


def test_rate_controller_lowers_p_when_arrivals_crowd_in():
    """Fed a slow then a fast stream, the controller's p falls from p_max to p_min."""
    controller = RateController(RateTunedConfidence(p_min=0.5, p_max=0.9, low_rps=2, high_rps=10), window_s=5)
    t = 0.0
    for _ in range(20):
        t += 1.0  # 1 req/s
        controller.observe_arrival(t)
    assert controller.confidence(t) == 0.9
    for _ in range(200):
        t += 0.05  # 20 req/s
        controller.observe_arrival(t)
    assert controller.confidence(t) == 0.5


def test_fixed_confidence_is_fixed():
    """FixedConfidence ignores every event."""
    fixed = FixedConfidence(0.8)
    fixed.observe_arrival(1.0)
    fixed.observe_finish(True)
    assert fixed.confidence(2.0) == 0.8
