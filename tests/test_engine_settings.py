"""The adapter's settings and per-request hints, and the pieces of the engine benchmark
that need no engine: predictor tables, the calibrated latency model, step-log parsing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.calibrate import fit_linear, step_periods
from bench.engine import _Stream, outcomes_of, preemptions_from_steps
from bench.traces import TraceRequest
from predictor.length_quantile import LengthQuantilePredictor
from replicas.engine_settings import (
    XARG_BOUND,
    XARG_CONFIDENCE,
    XARG_MAX_TOKENS,
    XARG_POINT,
    XARG_SLO,
    EngineSettings,
    ForwardedPredictor,
    MaxTokensPredictor,
    RequestHints,
)
from replicas.latency import LinearLatencyModel, get_latency_model
from replicas.request import Request, Slo

CHAT = Slo("chat", 3.0, 0.2)


def test_settings_round_trip_through_additional_config():
    settings = EngineSettings(policy="cacheopt", slo_classes={"fast": (0.5, 0.05)}, default_slo="fast",
                              cacheopt={"confidence": 0.8})
    again = EngineSettings.from_mapping(json.loads(json.dumps(settings.as_additional_config()))["cacheopt"])
    assert again == settings
    assert again.build_policy().confidence == 0.8


@pytest.mark.parametrize("values, message", [
    ({"default_slo": "nope"}, "default_slo"),
    ({"cacheopt": {"confidence": 2.0}}, "confidence"),
    ({"cacheopt": {"bogus": 1}}, "unknown CacheOptConfig option"),
    ({"slo_classes": {"chat": (0.0, 1.0)}}, "must be > 0"),
    ({"policy_name": "x"}, "unknown EngineSettings option"),
    ({"predictor_path": "/no/such/file.json"}, "is not a file"),
])
def test_bad_settings_are_refused_by_name(values, message):
    with pytest.raises(ValueError, match=message):
        EngineSettings.from_mapping(values)


def test_hints_parse_and_bad_hints_fall_back_with_a_reason():
    settings = EngineSettings()
    hints, problems = RequestHints.parse({XARG_SLO: "realtime", XARG_MAX_TOKENS: 300, XARG_CONFIDENCE: 0.6,
                                          XARG_POINT: 20, XARG_BOUND: 50}, settings, max_tokens=100)
    assert problems == []
    assert (hints.slo.name, hints.max_tokens, hints.confidence, hints.forwarded_prediction) == ("realtime", 300, 0.6, (20, 50))

    hints, problems = RequestHints.parse({XARG_SLO: "gold", XARG_MAX_TOKENS: "many", XARG_CONFIDENCE: 1.5,
                                          XARG_POINT: 50}, settings, max_tokens=100)
    assert (hints.slo.name, hints.max_tokens, hints.confidence, hints.forwarded_prediction) == ("chat", 100, None, None)
    assert len(problems) == 4 and "gold" in problems[0]
    assert RequestHints.parse(None, settings, max_tokens=7)[0].max_tokens == 7


def test_forwarded_prediction_wins_and_is_clamped_to_max_tokens():
    base = MaxTokensPredictor()
    predictor = ForwardedPredictor(base)
    request = Request("r", 0.0, 10, 100, CHAT, forwarded_prediction=(30, 500))
    prediction = predictor.predict(request, 0.7)
    assert (prediction.point_tokens, prediction.bound_tokens) == (30, 100)
    plain = Request("s", 0.0, 10, 100, CHAT)
    assert predictor.predict(plain, 0.7).bound_tokens == 100  # no hint: the base predictor
    assert predictor.conditional_bound(request, 40, 0.7) == 100


def test_length_table_saves_and_loads_without_pickle(tmp_path):
    samples = [(p, (p * 7) % 300 + 1, "chat" if p % 2 else "batch") for p in range(1, 2000, 3)]
    fitted = LengthQuantilePredictor.fit(samples, min_samples=20)
    path = tmp_path / "table.json"
    fitted.save(path)
    loaded = LengthQuantilePredictor.load(path)
    for prompt in (5, 200, 1500):
        request = Request("r", 0.0, prompt, 1000, CHAT)
        assert loaded.predict(request, 0.8) == fitted.predict(request, 0.8)
        assert loaded.conditional_bound(request, 50, 0.8) == fitted.conditional_bound(request, 50, 0.8)
    path.write_text('{"kind": "something else"}')
    with pytest.raises(ValueError, match="not a length-quantile table"):
        LengthQuantilePredictor.load(path)


def test_linear_latency_model_is_validated_and_never_swaps(tmp_path):
    with pytest.raises(ValueError, match="per_request_s"):
        LinearLatencyModel("m", 0.001, 0.0, -1.0, 0.0, 0.0)
    model = LinearLatencyModel("m", 0.005, 1e-5, 1e-4, 1e-7, 0.0)
    assert model.iteration_time_s(0, 0, 0) == 0.0
    assert model.iteration_time_s(10, 2, 100) == pytest.approx(0.005 + 1e-4 + 2e-4 + 1e-5)
    assert model.swap_time_s(100, 32) == float("inf")
    path = tmp_path / "m.json"
    path.write_text(json.dumps(model.to_dict()))
    assert LinearLatencyModel.load(path) == model
    shipped = get_latency_model("tiny-llama-cpu")  # the calibration shipped in replicas/data
    assert 0.001 < shipped.iteration_time_s(1, 1, 256) < 0.1


def synthetic_steps(truth: LinearLatencyModel, n: int, *, seed: int, jitter: float, stall_share: float,
                    stall_s: float = 0.1) -> list[tuple[dict, float]]:
    """n (step shape, period) samples of `truth`, +-jitter noise, and a stall_s stall in stall_share of them."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        reqs = int(rng.integers(1, 40))
        new = reqs + int(rng.integers(0, 400))
        ctx = new + int(rng.integers(0, 4000))
        period = truth.iteration_time_s(new, reqs, ctx) * rng.uniform(1 - jitter, 1 + jitter)
        if rng.random() < stall_share:
            period += stall_s
        rows.append(({"new": new, "reqs": reqs, "ctx": ctx}, period))
    return rows


def test_calibration_fit_recovers_the_shape_despite_stalls():
    truth = LinearLatencyModel("t", 0.004, 3e-5, 2e-4, 1e-7, 0.0)
    rows = synthetic_steps(truth, 600, seed=0, jitter=0.05, stall_share=0.03)
    fitted = fit_linear(rows, name="fit", source="synthetic")
    # The median shape is recovered; the level is raised so that total time matches.
    ratio = fitted.per_new_token_s / truth.per_new_token_s
    assert 1.0 < ratio < 1.5
    assert fitted.per_request_s / truth.per_request_s == pytest.approx(ratio, rel=0.15)
    assert fitted.intercept_s / truth.intercept_s == pytest.approx(ratio, rel=0.15)
    total_fit = sum(fitted.iteration_time_s(r["new"], r["reqs"], r["ctx"]) for r, _ in rows)
    assert total_fit == pytest.approx(sum(p for _, p in rows), rel=1e-6)


def test_calibration_fit_can_keep_stalls_apart():
    """With stalls=True the fit finds the stalls (share and size) and keeps the steady
    shape, so that a simulator can draw the stalls; the mean step still matches the total."""
    truth = LinearLatencyModel("t", 0.004, 3e-5, 2e-4, 1e-7, 0.0)
    rows = synthetic_steps(truth, 2000, seed=1, jitter=0.03, stall_share=0.02)
    fitted = fit_linear(rows, name="fit", source="synthetic", stalls=True)
    assert fitted.stall_probability == pytest.approx(0.02, abs=0.01) and fitted.stall_s == pytest.approx(0.1, rel=0.1)
    assert fitted.per_new_token_s / truth.per_new_token_s == pytest.approx(1.0, rel=0.1)
    total_fit = sum(fitted.iteration_time_s(r["new"], r["reqs"], r["ctx"]) for r, _ in rows)
    assert total_fit == pytest.approx(sum(p for _, p in rows), rel=0.02)


def test_the_simulated_engine_draws_stalls_from_its_seed():
    """A stalling model makes a few long steps, reproducibly for a seed, with the mean step."""
    import random

    from replicas.plan import StepPlan
    from replicas.request import Request, Slo
    from replicas.sim_engine import SimEngine

    model = LinearLatencyModel("s", 0.005, 0.0, 0.0, 0.0, 0.0, stall_probability=0.1, stall_s=0.05)
    plan = StepPlan(0, scheduled={Request("r", 0.0, 8, 8, Slo("x", 1.0, 1.0)): 1})
    durations = [SimEngine(model, 16, rng=random.Random(7)).step_duration_s(plan) for _ in range(1)]
    engine = SimEngine(model, 16, rng=random.Random(7))
    steps = [engine.step_duration_s(plan) for _ in range(5000)]
    assert durations[0] == steps[0] and set(round(d, 6) for d in steps) == {0.005, 0.055}
    assert sum(steps) / len(steps) == pytest.approx(model.iteration_time_s(1, 1, 8), rel=0.1)
    assert SimEngine(model, 16).step_duration_s(plan) == pytest.approx(0.005 + 0.1 * 0.05)  # no rng: the mean


def test_step_periods_keep_only_busy_steps():
    rows = [{"t": 0.0, "done": 0.010, "new": 5}, {"t": 0.011, "done": 0.020, "new": 5},
            {"t": 0.500, "done": 0.510, "new": 5}, {"t": 0.511, "done": 0.52, "new": 0}]
    assert [round(p, 3) for _, p in step_periods(rows)] == [0.011, 0.011]


def test_preemptions_and_recomputed_tokens_come_from_the_step_log():
    rows = [{"scheduled": {"a-1": 100, "b-2": 50}, "preempted": []},
            {"scheduled": {"a-1": 1}, "preempted": ["b-2"]},
            {"scheduled": {"a-1": 1, "b-2": 50}, "preempted": []}]
    preemptions, recomputed = preemptions_from_steps(rows)
    assert preemptions == {"b-2": 1} and recomputed == {"b-2": 50}
    stream = _Stream(TraceRequest("b", 0.0, 50, 3, CHAT), arrival_s=10.0, token_times=[10.5, 10.6, 10.8],
                     finished=True)
    (outcome,) = outcomes_of([stream], rows)
    assert (outcome.num_preemptions, outcome.num_recomputed_tokens) == (1, 50)
    assert outcome.first_token_s == 10.5 and outcome.finish_s == 10.8
    assert outcome.token_gaps_s == pytest.approx([0.1, 0.2])
