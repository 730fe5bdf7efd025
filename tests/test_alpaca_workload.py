"""bench.alpaca_workload: real prompts and answer lengths on the Azure trace's arrivals."""

from __future__ import annotations

import pytest

from bench.alpaca_workload import DEFAULT_GENERATOR, alpaca_trace
from bench.traces import load_azure_trace
from predictor.alpaca import AlpacaRecord, load_alpaca, split_by_prompt
from predictor.tokens import chat_prompt_tokens

LIMIT = 2000


@pytest.fixture(scope="module")
def test_records() -> list[AlpacaRecord]:
    return split_by_prompt(load_alpaca())[2]


@pytest.fixture(scope="module")
def trace(test_records):
    return alpaca_trace(test_records, limit=LIMIT)


def test_arrivals_and_slos_are_the_azure_traces(trace):
    """Request i arrives when the Azure conv trace's request i does, with its SLO class."""
    azure = load_azure_trace("conv", limit=LIMIT)
    assert [r.arrival_s for r in trace] == [a.arrival_s for a in azure]
    assert [r.slo for r in trace] == [a.slo for a in azure]


def test_each_request_carries_its_records_lengths(trace, test_records):
    """Every request's output is its record's answer length (default generator), its prompt
    the chat-templated instruction's token count, and its text the instruction."""
    by_text = {r.instruction: r for r in test_records if r.generator == DEFAULT_GENERATOR}
    for req in trace:
        record = by_text[req.prompt_text]
        assert req.output_tokens == record.output_tokens
        assert req.prompt_tokens == chat_prompt_tokens(record.instruction)


def test_records_cycle_through_a_permutation(trace, test_records):
    """Each of the generator's records is used once before any is used twice."""
    n = sum(r.generator == DEFAULT_GENERATOR for r in test_records)
    first_round = [r.prompt_text for r in trace[:n]]
    assert len(set(first_round)) == n
    assert [r.prompt_text for r in trace[n : 2 * n]] == first_round


def test_trace_is_deterministic_for_a_seed(trace, test_records):
    """The same seed gives the same trace whatever the order of the records; another seed
    gives another order."""
    assert alpaca_trace(list(reversed(test_records)), limit=LIMIT) == trace
    assert [r.prompt_text for r in alpaca_trace(test_records, limit=LIMIT, seed=1)] != [r.prompt_text for r in trace]


def test_request_ids_number_the_arrivals(trace):
    """request_id is "alpaca-" and the 0-based arrival index in six digits."""
    assert trace[0].request_id == "alpaca-000000"
    assert trace[123].request_id == "alpaca-000123"


def test_unknown_generator_is_rejected(test_records):
    """Filtering to a generator with no records raises ValueError listing the known ones."""
    with pytest.raises(ValueError, match="gpt4_1106_preview"):
        alpaca_trace(test_records, limit=10, generator="no-such-model")
