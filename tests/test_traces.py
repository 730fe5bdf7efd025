"""Trace loading, rescaling and SLO assignment (bench.traces, bench.slo)."""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

import pytest

from bench.slo import DEFAULT_SLO_MIX, SLO_CLASSES, assign_slo, scaled_slo_classes
from bench.traces import (
    TraceRequest,
    load_azure_trace,
    load_trace_file,
    mean_rate_rps,
    scale_to_rate,
    scale_tokens,
    split_train_test,
)


@pytest.fixture(scope="module")
def conv() -> list[TraceRequest]:
    return load_azure_trace("conv")


def _gaps(requests: list[TraceRequest]) -> list[float]:
    return [b.arrival_s - a.arrival_s for a, b in zip(requests, requests[1:])]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(text)
    return path


def test_full_conv_trace_loads_sorted_from_zero(conv):
    """All 19,366 rows load, arrivals are sorted and start at 0, ids are unique."""
    assert len(conv) == 19_366
    assert conv[0].arrival_s == 0.0
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(conv, conv[1:]))
    assert len({r.request_id for r in conv}) == len(conv)
    assert conv[0].request_id == "conv-000000"


def test_conv_trace_matches_published_statistics(conv):
    """Duration, mean rate and first row agree with the data README (7-digit timestamps)."""
    assert conv[-1].arrival_s == pytest.approx(3501.721937, abs=1e-7)
    assert mean_rate_rps(conv) == pytest.approx(5.53, abs=0.005)
    assert (conv[1].arrival_s, conv[0].prompt_tokens, conv[0].output_tokens) == (pytest.approx(4.314579), 374, 44)
    assert min(r.output_tokens for r in conv) >= 1


def test_code_trace_loads():
    """The code trace loads with its 8,819 rows."""
    assert len(load_azure_trace("code")) == 8_819


def test_limit_keeps_first_rows_and_their_slo_classes(conv):
    """limit=n gives the first n requests with the same SLO classes as the full load."""
    head = load_azure_trace("conv", limit=50)
    assert head == conv[:50]


def test_scale_to_rate_hits_target_and_keeps_shape(conv):
    """The mean rate becomes the target; order, tokens, SLOs and gap CV are unchanged."""
    scaled = scale_to_rate(conv, 20.0)
    assert mean_rate_rps(scaled) == pytest.approx(20.0, rel=1e-9)
    assert [(r.request_id, r.prompt_tokens, r.output_tokens, r.slo) for r in scaled] == [
        (r.request_id, r.prompt_tokens, r.output_tokens, r.slo) for r in conv
    ]
    cv = lambda g: statistics.pstdev(g) / statistics.fmean(g)  # noqa: E731
    assert cv(_gaps(scaled)) == pytest.approx(cv(_gaps(conv)), rel=1e-9)
    assert scaled[0].arrival_s == 0.0


def test_scale_to_rate_rejects_bad_rate(conv):
    """A non-positive rate is an input error."""
    with pytest.raises(ValueError, match="rate_rps"):
        scale_to_rate(conv[:10], 0.0)


def test_scale_tokens_divides_and_fits_context(conv):
    """Tokens are divided (at least 1) and prompt + output never exceeds max_context."""
    scaled = scale_tokens(conv, 4, max_context=512)
    assert all(r.prompt_tokens >= 1 and r.output_tokens >= 1 for r in scaled)
    assert all(r.prompt_tokens + r.output_tokens <= 512 for r in scaled)
    assert (scaled[0].prompt_tokens, scaled[0].output_tokens) == (94, 11)  # 93.5 rounds half up


def test_split_train_test_is_deterministic_and_partitions(conv):
    """A fixed seed gives the same split; the parts are disjoint, cover all, keep order."""
    train, test = split_train_test(conv, 0.2, seed=3)
    assert (train, test) == split_train_test(conv, 0.2, seed=3)
    assert len(train) == round(0.2 * len(conv))
    assert {r.request_id for r in train}.isdisjoint(r.request_id for r in test)
    assert len(train) + len(test) == len(conv)
    assert test == sorted(test, key=lambda r: r.arrival_s)


def test_slo_assignment_is_deterministic_and_follows_mix(conv):
    """Same (seed, index) gives the same class; every class appears at about its share."""
    assert [assign_slo(i, 7) for i in range(200)] == [assign_slo(i, 7) for i in range(200)]
    assert [assign_slo(i, 7) for i in range(200)] != [assign_slo(i, 8) for i in range(200)]
    counts = Counter(r.slo.name for r in conv)
    assert set(counts) == set(SLO_CLASSES)
    for name, share in DEFAULT_SLO_MIX.items():
        assert counts[name] / len(conv) == pytest.approx(share, abs=0.02)


def test_slo_classes_have_distinct_tbt_and_scale_with_unit():
    """Classes differ in TBT; the GPU classes are the multiples at a 10 ms unit."""
    assert len({slo.tbt_s for slo in SLO_CLASSES.values()}) == len(SLO_CLASSES) >= 3
    assert scaled_slo_classes(0.010) == SLO_CLASSES
    assert scaled_slo_classes(0.001)["realtime"].tbt_s == pytest.approx(0.01)


def test_unknown_slo_class_raises():
    """A mix naming an unknown class is an input error."""
    with pytest.raises(ValueError, match="interactive"):
        assign_slo(0, 0, {"interactive": 1.0})


def test_unknown_trace_name_raises():
    """Only conv and code exist."""
    with pytest.raises(ValueError, match="'chat'"):
        load_azure_trace("chat")


def test_malformed_timestamp_names_file_and_line(tmp_path):
    """A bad row raises ValueError with file:line."""
    path = _write(tmp_path, "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                            "2023-11-16 18:15:46.6805900,374,44\n"
                            "2023-11-16 18:15:4x.0000000,396,109\n")
    with pytest.raises(ValueError, match=r"trace\.csv:3: bad TIMESTAMP"):
        load_trace_file(path, prefix="t")


def test_malformed_field_count_and_header_raise(tmp_path):
    """Wrong field counts and wrong headers are rejected with their line."""
    path = _write(tmp_path, "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374\n")
    with pytest.raises(ValueError, match=r":2: expected 3 fields"):
        load_trace_file(path, prefix="t")
    path = _write(tmp_path, "time,in,out\n")
    with pytest.raises(ValueError, match=r":1: expected header"):
        load_trace_file(path, prefix="t")


def test_zero_output_is_clamped_and_fraction_kept_exactly(tmp_path):
    """0 generated tokens become 1; 7-digit fractions are exact to 100 ns."""
    path = _write(tmp_path, "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                            "2023-11-16 23:59:59.9999999,10,0\n"
                            "2023-11-17 00:00:00.0000001,10,5")
    first, second = load_trace_file(path, prefix="t")
    assert first.output_tokens == 1
    assert second.arrival_s == pytest.approx(2e-7, abs=1e-12)
