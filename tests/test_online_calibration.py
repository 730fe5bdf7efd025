"""Online calibration: the bound refitted on the served model's own completions."""

import random

import pytest

from predictor.length_quantile import LengthQuantilePredictor
from predictor.online import OnlineCalibration, OnlineLengthTable, leave_one_generator_out


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


class _Req:
    def __init__(self, prompt_tokens: int, max_tokens: int = 4096, slo: str = "chat"):
        self.prompt_tokens, self.max_tokens = prompt_tokens, max_tokens
        self.slo = type("Slo", (), {"name": slo})()


def test_the_length_table_is_refitted_on_the_served_lengths():
    """A served model that writes 300-400 tokens where the static table expects far fewer:
    from min_samples on, the table's bound at p is the served lengths' p-quantile."""
    online = OnlineLengthTable(min_samples=100, refit_every=50, window=500)
    rng = random.Random(1)
    for _ in range(99):
        online.observe(rng.randint(10, 100), rng.randint(300, 400), "chat")
    assert online.table() is None and online.version == 0
    online.observe(50, 350, "chat")
    table = LengthQuantilePredictor.from_dict(online.table())
    assert online.version == 1 and online.table() is not None and online.version == 1  # no refit until 50 more
    bound = table.predict(_Req(50), 0.9).bound_tokens
    assert 380 <= bound <= 400
    for _ in range(50):
        online.observe(50, 20, "chat")  # the workload changes: refitted on the window
    assert online.table() is not None and online.version == 2
    for row in [(-1, 5, "chat"), (5, 0, "chat"), (5, 5), (5.5, 5, "chat"), (5, 5, None)]:
        online.observe_many([row])
    assert online.samples == 150  # malformed rows ignored
