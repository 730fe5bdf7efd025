"""Online calibration: the bound refitted on the served model's own completions."""

import random

import pytest

from predictor.online import OnlineCalibration, leave_one_generator_out


def test_no_bound_before_enough_completions_then_one_per_refit():
    online = OnlineCalibration(min_samples=100, refit_every=10, window=300)
    rng = random.Random(0)
    for _ in range(99):
        online.observe(100, rng.randint(50, 200))
    assert online.bound() is None and online.version == 0
    online.observe(100, 120)
    first = online.bound()
    assert first is not None and online.version == 1
    assert online.bound() is first  # no refit until refit_every more
    for _ in range(10):
        online.observe(100, 150)
    assert online.bound() is not first and online.version == 2
    for _ in range(1000):
        online.observe(100, 150)
    assert online.samples == 300  # the window
    online.observe(0, 10)
    online.observe(10, float("nan"))
    assert online.samples == 300  # invalid pairs ignored


def test_the_refitted_bound_covers_a_shifted_stream():
    """Completions twice as long as predicted: after 400 of them the bound at p covers a
    share p of the next ones on average over calibration draws (exchangeable data: split
    conformal's guarantee; one draw of 400 varies by a few points)."""
    coverage = {0.8: 0.0, 0.9: 0.0}
    for seed in range(5):
        rng = random.Random(seed)
        online = OnlineCalibration(min_samples=400)
        pairs = [(p, 2 * p * rng.lognormvariate(0, 0.5)) for p in (rng.randint(20, 500) for _ in range(4400))]
        online.observe_many(pairs[:400])
        bound = online.bound()
        for p in coverage:
            coverage[p] += sum(true <= bound.upper(point, p) for point, true in pairs[400:]) / 4000 / 5
    for p, covered in coverage.items():
        assert p - 0.01 <= covered <= p + 0.03, (p, covered)


def test_leave_one_generator_out_reaches_p_where_the_static_bound_falls_short():
    """GPT-4's answers are longer than the training generators': the static bound covers
    far less than p; 200 of its completions bring the online bound within 2 points."""
    result = leave_one_generator_out("gpt4_1106_preview", orders=5)
    for figure in result["figures"]:
        assert figure["static_coverage"] < figure["confidence"] - 0.05
        assert abs(figure["online_coverage"] - figure["confidence"]) <= 0.025, figure
    with pytest.raises(ValueError, match="unknown generator"):
        leave_one_generator_out("gpt-2")
