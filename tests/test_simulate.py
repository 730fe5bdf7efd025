"""The simulator: deterministic, explicit event order, invariants at every step, clear errors."""

import pytest

from bench.metrics import summarize
from bench.simulate import SimSetup, simulate
from bench.traces import TraceRequest, load_azure_trace, scale_to_rate
from predictor.length_quantile import LengthQuantilePredictor
from replicas.engines.config import LLAMA3_8B_H100
from replicas.policies import ABLATION_NAMES, POLICY_NAMES
from replicas.slo import SLO_CLASSES


@pytest.fixture(scope="module")
def small_trace():
    trace = load_azure_trace("conv", limit=400)
    predictor = LengthQuantilePredictor.fit((r.prompt_tokens, r.output_tokens) for r in trace[:100])
    return scale_to_rate(trace[100:], 8.0), predictor


@pytest.mark.parametrize("policy", POLICY_NAMES + ABLATION_NAMES)
def test_every_policy_finishes_a_contended_trace_with_balanced_books(small_trace, policy):
    """Under KV pressure every request either finishes with its true length or is shed before
    its first token (only policies that shed); the ledger balances after every step."""
    trace, predictor = small_trace
    result = simulate(trace, policy, SimSetup(engine=LLAMA3_8B_H100.with_(kv_blocks=1024), check_invariants=True), predictor)
    served = [o for o in result.outcomes if not o.shed]
    assert all(o.finish_s is not None for o in served)
    assert all(o.output_tokens == min(o.true_output_tokens, 1024) for o in served)
    assert all(o.first_token_s is None and o.output_tokens == 0 for o in result.outcomes if o.shed)
    if policy in ("vllm", "vllm-2048", "sglang", "s3", "lcf", "past-future", "cacheopt-no_shedding"):
        assert not any(o.shed for o in result.outcomes)
    assert len(result.outcomes) + result.num_dropped == len(trace)


def test_kv_pressure_makes_vllm_preempt(small_trace):
    """The contended setting is contended: vLLM preempts, and a huge cache makes it stop."""
    trace, predictor = small_trace
    tight = simulate(trace, "vllm", SimSetup(engine=LLAMA3_8B_H100.with_(kv_blocks=1024)), predictor)
    roomy = simulate(trace, "vllm", SimSetup(), predictor)
    assert tight.stats.preemptions_by_mode["recompute"] > 0
    assert roomy.stats.preemptions_by_mode["recompute"] == 0


def test_simulation_is_deterministic(small_trace):
    """Two runs of the same trace, policy and setup give identical outcomes."""
    trace, predictor = small_trace
    first = simulate(trace, "cacheopt", SimSetup(engine=LLAMA3_8B_H100.with_(kv_blocks=1024)), predictor)
    second = simulate(trace, "cacheopt", SimSetup(engine=LLAMA3_8B_H100.with_(kv_blocks=1024)), predictor)
    assert summarize(first.outcomes, first.stats) == summarize(second.outcomes, second.stats)
    assert [o.token_gaps_s for o in first.outcomes] == [o.token_gaps_s for o in second.outcomes]


def _request(rid, arrival_s, prompt=100, output=5):
    return TraceRequest(rid, arrival_s, prompt, output, SLO_CLASSES["chat"])


def test_arrival_at_a_step_end_joins_the_next_step():
    """An arrival exactly at a step boundary is offered admission in the step that starts there."""
    probe = simulate([_request("a", 0.0, output=3)], "vllm", SimSetup(engine=LLAMA3_8B_H100.with_(kv_blocks=1024)), None)
    step_end = probe.outcomes[0].first_token_s  # the end of the first step
    result = simulate([_request("a", 0.0, output=3), _request("b", step_end, output=1)], "vllm",
                      SimSetup(engine=LLAMA3_8B_H100.with_(kv_blocks=1024)), None)
    by_id = {o.request_id: o for o in result.outcomes}
    # b is prefilled in the second step, alongside a's first decode.
    assert by_id["b"].first_token_s == by_id["a"].first_token_s + by_id["a"].token_gaps_s[0]


def test_too_long_requests_are_dropped_and_counted():
    """A request beyond the model's context is rejected like a server would, and counted."""
    result = simulate([_request("a", 0.0), _request("long", 0.1, prompt=9000)], "vllm",
                      SimSetup(engine=LLAMA3_8B_H100.with_(kv_blocks=1024)), None)
    assert result.num_dropped == 1 and [o.request_id for o in result.outcomes] == ["a"]


@pytest.mark.parametrize("engine, kwargs, message", [
    (dict(kv_blocks=10), {}, "cannot hold one request"),
    (dict(max_num_seqs=512, max_num_batched_tokens=256), {}, "max_num_seqs=512 must be <="),
    ({}, dict(max_tokens=0), "max_tokens=0"),
    (dict(latency_model="llama3-8b-tpu"), {}, "unknown latency model"),
])
def test_bad_setup_is_a_clear_error(engine, kwargs, message):
    """Impossible setups raise ValueError naming what is wrong."""
    with pytest.raises(ValueError, match=message):
        SimSetup(engine=LLAMA3_8B_H100.with_(**engine), **kwargs).total_blocks()


def test_unknown_policy_is_a_clear_error(small_trace):
    """An unknown policy name lists the known ones."""
    trace, predictor = small_trace
    with pytest.raises(ValueError, match="unknown policy 'fifo'.*vllm"):
        simulate(trace, "fifo", SimSetup(engine=LLAMA3_8B_H100.with_(kv_blocks=1024)), predictor)


def test_confidence_controller_sets_the_policy_bound(small_trace):
    """A controller's p is the confidence every admitted request's bound was made with."""
    from global_scheduler.confidence import FixedConfidence

    trace, predictor = small_trace
    result = simulate(trace[:50], "cacheopt", SimSetup(engine=LLAMA3_8B_H100.with_(kv_blocks=1024)), predictor, FixedConfidence(0.55))
    requests = {o.request_id: o for o in result.outcomes}
    for item in trace[:50]:
        probe = _probe_request(item)
        assert requests[item.request_id].bound_tokens == predictor.predict(probe, 0.55).bound_tokens


def _probe_request(item):
    from replicas.request import Request

    return Request(item.request_id, item.arrival_s, item.prompt_tokens, 1024, item.slo)
