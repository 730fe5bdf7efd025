"""Confidence bounds: conformal coverage on a known distribution, conditional bounds, errors."""

import math
import random

import pytest

from predictor.bounds import ResidualBound, fit_bound


def _lognormal_pairs(n, seed, sigma=0.6):
    """True length = point * exp(N(0, sigma)): the ratio a length predictor typically leaves."""
    rng = random.Random(seed)
    points = [rng.uniform(20, 600) for _ in range(n)]
    truths = [p * math.exp(rng.gauss(0.0, sigma)) for p in points]
    return points, truths


@pytest.mark.parametrize("confidence", [0.8, 0.9, 0.95, 0.99])
def test_conformal_covers_at_the_requested_confidence(confidence):
    """On fresh samples from the calibration distribution, coverage is p to within sampling error."""
    bound = fit_bound("conformal", *_lognormal_pairs(2000, seed=1))
    points, truths = _lognormal_pairs(20000, seed=2)
    covered = sum(t <= bound.upper(p, confidence) for p, t in zip(points, truths)) / len(points)
    # Split conformal gives p <= coverage <= p + 1/(n_bucket + 1) in expectation; allow
    # three standard errors of the test estimate on top.
    slack = 3 * math.sqrt(confidence * (1 - confidence) / len(points))
    assert confidence - slack <= covered <= confidence + 1 / 501 + slack


def test_conformal_bound_grows_with_confidence():
    """A higher confidence never gives a lower bound."""
    bound = fit_bound("conformal", *_lognormal_pairs(1000, seed=3))
    uppers = [bound.upper(200, p) for p in (0.5, 0.8, 0.9, 0.95, 0.99)]
    assert uppers == sorted(uppers)


def test_hoeffding_is_the_paper_formula():
    """point + mean residual + range * sqrt(ln(1/(1-p)) / 2n), one bucket."""
    points = [100.0] * 40
    truths = [100.0 + r for r in [-20, 0, 10, 30] * 10]
    bound = fit_bound("hoeffding", points, truths, num_buckets=1)
    expected = 100 + 5 + 50 * math.sqrt(math.log(10) / 80)
    assert bound.upper(100, 0.9) == pytest.approx(expected)


@pytest.mark.parametrize("method", ["conformal", "hoeffding"])
@pytest.mark.parametrize("generated", [0, 50, 300, 900, 5000])
def test_conditional_bound_is_above_what_was_generated(method, generated):
    """A request that generated g tokens gets a bound of at least g + 1 (inf when nobody reached g)."""
    bound = fit_bound(method, *_lognormal_pairs(1000, seed=4))
    assert bound.conditional_upper(200, generated, 0.9) >= generated + 1


def test_conditional_bound_uses_only_requests_that_got_as_far():
    """Conditioning on having reached g raises the bound above the unconditional one."""
    bound = fit_bound("conformal", *_lognormal_pairs(2000, seed=5))
    assert bound.conditional_upper(200, 250, 0.9) > bound.upper(200, 0.9)


def test_round_trip_through_dict():
    """to_dict/from_dict preserves every bound."""
    bound = fit_bound("conformal", *_lognormal_pairs(400, seed=6))
    again = ResidualBound.from_dict(bound.to_dict())
    assert again.upper(123, 0.9) == bound.upper(123, 0.9)


@pytest.mark.parametrize("args, message", [
    (("quantile", [1.0] * 50, [1.0] * 50), "unknown bound method"),
    (("conformal", [1.0] * 5, [1.0] * 5), "too few"),
    (("conformal", [1.0] * 50, [1.0] * 49), "50 points but 49"),
])
def test_bad_calibration_is_a_clear_error(args, message):
    """Bad calibration input raises ValueError naming the problem."""
    with pytest.raises(ValueError, match=message):
        fit_bound(*args)


def test_confidence_out_of_range_is_rejected():
    """Confidence must lie in (0, 1)."""
    bound = fit_bound("conformal", *_lognormal_pairs(100, seed=7))
    with pytest.raises(ValueError, match="confidence"):
        bound.upper(100, 1.0)
