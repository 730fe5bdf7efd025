"""Predictors behind the policy's interface: length-only quantiles, point + bound, oracle."""

import pytest
from factories import CHAT, LOOSE, TIGHT, make_request

from predictor import LengthQuantilePredictor, OraclePredictor
from predictor.bounds import fit_bound
from predictor.point_bound import PointBoundPredictor


def test_length_quantiles_per_bucket():
    """The bound at p is the bucket's empirical p-quantile; the point is its median."""
    samples = [(100, n) for n in range(1, 101)] + [(3000, 10 * n) for n in range(1, 101)]
    predictor = LengthQuantilePredictor.fit(samples, min_samples=10)
    short = predictor.predict(make_request(prompt=100, max_tokens=2000), 0.9)
    long = predictor.predict(make_request(prompt=3000, max_tokens=2000), 0.9)
    assert (short.point_tokens, short.bound_tokens) == (50, 90)
    assert (long.point_tokens, long.bound_tokens) == (500, 900)


def test_length_quantiles_per_slo_class_with_fallback():
    """A populated (bucket, class) cell has its own quantiles; a sparse one uses the bucket's."""
    samples = [(100, 10, "chat")] * 60 + [(100, 500, "batch")] * 60 + [(100, 300, "realtime")] * 5
    predictor = LengthQuantilePredictor.fit(samples, min_samples=50)
    assert predictor.predict(make_request(prompt=100, slo=CHAT, max_tokens=1000), 0.9).bound_tokens == 10
    assert predictor.predict(make_request(prompt=100, slo=LOOSE, max_tokens=1000), 0.9).bound_tokens == 500
    # "realtime" has 5 samples: the pooled median of 60 x 10, 5 x 300, 60 x 500 is 300.
    assert predictor.predict(make_request(prompt=100, slo=TIGHT, max_tokens=1000), 0.5).point_tokens == 300


@pytest.mark.parametrize("predictor", [
    LengthQuantilePredictor.fit([(100, n) for n in range(1, 300)]),
    PointBoundPredictor("pb", lambda r: 100.0, fit_bound("conformal", [100.0] * 200, list(range(1, 201)))),
    OraclePredictor(),
])
@pytest.mark.parametrize("generated", [0, 10, 150, 299, 600])
def test_contract_bounds(predictor, generated):
    """1 <= point <= bound <= max_tokens, and a conditional bound lies in (g, max_tokens]."""
    request = make_request(prompt=100, output=250, max_tokens=300)
    prediction = predictor.predict(request, 0.9)
    assert 1 <= prediction.point_tokens <= prediction.bound_tokens <= 300
    request.predicted_output_tokens = prediction.point_tokens
    g = min(generated, 299)
    assert g < predictor.conditional_bound(request, g, 0.9) <= 300


def test_point_bound_clamps_to_max_tokens():
    """A bound the calibration cannot certify (inf) becomes max_tokens."""
    predictor = PointBoundPredictor("pb", lambda r: 50.0, fit_bound("conformal", [50.0] * 40, [60.0] * 40,
                                                                     num_buckets=1))
    assert predictor.predict(make_request(max_tokens=128), 0.99).bound_tokens == 128


def test_oracle_needs_the_truth():
    """Outside simulation the oracle refuses with a clear error."""
    request = make_request()
    request.true_output_tokens = None
    with pytest.raises(ValueError, match="simulation only"):
        OraclePredictor().predict(request, 0.9)
