"""Trace loading, rescaling and SLO assignment (bench.traces, bench.slo)."""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from pathlib import Path

import pytest

from bench.slo import DEFAULT_SLO_MIX, assign_slo
from bench.traces import (
    TraceRequest,
    load_azure_trace,
    load_trace_file,
    load_trace_path,
    mean_rate_rps,
    scale_to_rate,
    scale_tokens,
    split_train_test,
)
from replicas.slo import SLO_CLASSES, scaled_slo_classes


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


def _write_jsonl(tmp_path: Path, rows: list[dict | str], name: str = "user.jsonl") -> Path:
    """Rows as JSON lines; a str row is written verbatim (blank lines, broken JSON)."""
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _req(ts: float, prompt: int = 10, output: int = 5, **extra) -> dict:
    return {"timestamp": ts, "input_length": prompt, "output_length": output, **extra}


def test_jsonl_arrivals_are_seconds_since_first_and_sorted_stably(tmp_path):
    """Millisecond timestamps become seconds after the earliest; ties keep file order."""
    path = _write_jsonl(tmp_path, [_req(1500), _req(1000.5), _req(1500), _req(250_000)])
    requests = load_trace_path(path)
    assert [r.request_id for r in requests] == ["user-000001", "user-000000", "user-000002", "user-000003"]
    assert [r.arrival_s for r in requests] == pytest.approx([0.0, 0.4995, 0.4995, 248.9995])
    assert requests[0].arrival_s == 0.0


def test_jsonl_keeps_tokens_clamps_zeros_and_keeps_hash_ids(tmp_path):
    """Token counts pass through, 0 becomes 1, hash_ids become a tuple; absent or null is None."""
    path = _write_jsonl(tmp_path, [
        _req(0, 300, 0, hash_ids=[7, 8, 9], session_id="ignored"),
        _req(1, 0, 40),
        _req(2, 5, 6, hash_ids=None),
    ])
    a, b, c = load_trace_path(path)
    assert (a.prompt_tokens, a.output_tokens, a.hash_ids) == (300, 1, (7, 8, 9))
    assert (b.prompt_tokens, b.output_tokens, b.hash_ids) == (1, 40, None)
    assert c.hash_ids is None and c.prompt_text is None


def test_jsonl_ids_take_prefix_and_slo_follows_data_row(tmp_path):
    """Ids are <prefix>-<row>, rows counted without blank lines; the SLO class is assign_slo(row, seed)."""
    path = _write_jsonl(tmp_path, [_req(5), "", _req(0), _req(9)])
    requests = load_trace_path(path, prefix="mine", seed=4)
    assert [r.request_id for r in requests] == ["mine-000001", "mine-000000", "mine-000002"]
    assert [r.slo for r in requests] == [assign_slo(1, 4), assign_slo(0, 4), assign_slo(2, 4)]


def test_csv_through_load_trace_path_equals_load_trace_file():
    """A .csv goes to load_trace_file unchanged: the bundled Azure trace loads identically."""
    path = Path(__file__).parents[1] / "bench" / "data" / "azure_llm_2023_conv.csv"
    assert load_trace_path(path, prefix="conv", limit=300, seed=2) == load_trace_file(
        path, prefix="conv", limit=300, seed=2
    )
    assert load_trace_path(path, limit=3)[0].request_id == "azure_llm_2023_conv-000000"


def test_format_is_sniffed_when_the_extension_says_nothing(tmp_path):
    """Without .csv/.jsonl/.json, a first non-empty line starting with { means JSONL, else CSV."""
    jsonl = _write_jsonl(tmp_path, ["", _req(0, 11, 3), _req(2000, 12, 4)], name="traffic.log")
    assert [(r.arrival_s, r.prompt_tokens) for r in load_trace_path(jsonl)] == [(0.0, 11), (2.0, 12)]
    csv = tmp_path / "traffic.txt"
    csv.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.5,374,44\n")
    assert [(r.request_id, r.prompt_tokens) for r in load_trace_path(csv)] == [("traffic-000000", 374)]


def test_json_extension_is_read_as_jsonl(tmp_path):
    """A .json file is JSON lines, not one JSON document."""
    path = _write_jsonl(tmp_path, [_req(0), _req(1)], name="trace.json")
    assert len(load_trace_path(path)) == 2


def test_jsonl_limit_keeps_first_file_rows_and_their_classes(tmp_path):
    """limit=n keeps the first n rows of the file (before sorting), with the full load's classes."""
    path = _write_jsonl(tmp_path, [_req(30), _req(10), _req(20), _req(0)])
    full = {r.request_id: r.slo for r in load_trace_path(path)}
    head = load_trace_path(path, limit=2)
    assert [r.request_id for r in head] == ["user-000001", "user-000000"]
    assert [r.arrival_s for r in head] == [0.0, 0.02]
    assert all(r.slo == full[r.request_id] for r in head)
    assert load_trace_path(path, limit=0) == []


_GOOD = json.dumps(_req(0))


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"timestamp": 1, "input_length": 3,', "bad JSON"),
        ("[1, 2, 3]", "expected a JSON object, got array"),
        ('"hello"', "expected a JSON object, got string"),
        ('{"timestamp": 1, "input_length": 3}', "missing field 'output_length'"),
        ('{"input_length": 3, "output_length": 4}', "missing field 'timestamp'"),
        ('{"timestamp": "1", "input_length": 3, "output_length": 4}', "timestamp must be a number"),
        ('{"timestamp": 1, "input_length": "3", "output_length": 4}', "input_length must be an integer"),
        ('{"timestamp": 1, "input_length": 3.5, "output_length": 4}', "input_length must be an integer"),
        ('{"timestamp": -1, "input_length": 3, "output_length": 4}', "timestamp=-1 must be >= 0"),
        ('{"timestamp": 1, "input_length": 3, "output_length": -4}', "output_length=-4 must be >= 0"),
        ('{"timestamp": true, "input_length": 3, "output_length": 4}', "timestamp must be a number.*boolean"),
        ('{"timestamp": 1, "input_length": false, "output_length": 4}', "input_length must be an integer.*boolean"),
        ('{"timestamp": NaN, "input_length": 3, "output_length": 4}', "timestamp=nan must be a finite"),
        ('{"timestamp": Infinity, "input_length": 3, "output_length": 4}', "timestamp=inf must be a finite"),
        ('{"timestamp": 1, "input_length": 3, "output_length": 4, "hash_ids": "1,2"}', "hash_ids must be a list"),
        ('{"timestamp": 1, "input_length": 3, "output_length": 4, "hash_ids": [1, 2.5]}', r"hash_ids\[1\] must be"),
        ('{"timestamp": 1, "input_length": 3, "output_length": 4, "hash_ids": [true]}', r"hash_ids\[0\] must be"),
    ],
)
def test_malformed_jsonl_line_names_file_and_line(tmp_path, line, reason):
    """Any bad line is a ValueError '<path>:<1-based line>: <reason>' (blank lines count)."""
    path = _write_jsonl(tmp_path, [_GOOD, "", line, _GOOD])
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + reason):
        load_trace_path(path)


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("empty.jsonl", "", ":1: no requests"),
        ("blank.log", "\n  \n\n", ":1: no requests"),
        ("header.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n", ":2: no requests"),
    ],
)
def test_file_without_requests_is_an_error(tmp_path, name, text, where):
    """An empty trace (or a CSV with only its header) is a ValueError, not an empty workload."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{path}{where}")):
        load_trace_path(path)


def test_missing_trace_file_is_a_value_error(tmp_path):
    """A path that does not exist is a ValueError naming it, not FileNotFoundError."""
    path = tmp_path / "nope.jsonl"
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_trace_path(path)


def test_non_utf8_bytes_name_their_line(tmp_path):
    """Undecodable bytes are a ValueError with the line they sit on."""
    path = tmp_path / "bin.jsonl"
    path.write_bytes(_GOOD.encode() + b"\n" + b'{"timestamp": 1\xff}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not UTF-8")):
        load_trace_path(path)
