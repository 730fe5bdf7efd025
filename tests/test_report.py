"""Benchmark report files and the ratios they state (bench.report)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from bench import report
from bench.report import knee_rate, ratio_table, summary_markdown, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RATES = (2.0, 4.0, 6.0)
PLOTS = ("p95_ttft_vs_rate.png", "p95_tbt_vs_rate.png", "slo_attainment_vs_rate.png")
CDF_PLOTS = ("ttft_cdf_knee.png", "tbt_cdf_knee.png")


def make_row(policy: str, rate: float, repeat: int = 0, *, speedup: float = 1.0, att: float = 0.95) -> dict:
    """A summarize()-like row whose latencies grow with rate and shrink by `speedup`."""
    return {
        "policy": policy, "rate_rps": rate, "repeat": repeat,
        "ttft_p95_s": 0.2 * rate / speedup, "max_gap_p95_s": 0.05 * rate / speedup,
        "itl_p95_s": 0.02 * rate / speedup, "ttft_slo_attainment": att, "tbt_slo_attainment": att,
        "slo_attainment": att, "goodput_rps": att * rate, "preemptions_per_1k": 10.0 * rate,
        "tpot_mean_s": math.nan,
    }


def make_rows(repeats: int = 1) -> list[dict]:
    """vllm passes at 2 and 4 req/s and fails at 6; cacheopt is 2x faster and passes all."""
    rows = []
    for k in range(repeats):
        for rate, att in zip(RATES, (0.99, 0.95, 0.5)):
            rows.append(make_row("vllm", rate, k, att=att - 0.01 * k))
            rows.append(make_row("cacheopt", rate, k, speedup=2.0 + k, att=0.97))
    return rows


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    samples = {p: {"ttft": [0.1, 0.2, 0.5, 1.0], "tbt": [0.01, 0.02, 0.3]} for p in ("vllm", "cacheopt")}
    write_report(out, make_rows(), title="Test sweep", cdf_samples=samples, extra_markdown="Data: test.")
    return out


def test_writes_all_files(report_dir):
    """CSV, JSON, summary and all five plots exist and are non-empty."""
    for name in ("results.csv", "results.json", "summary.md", *PLOTS, *CDF_PLOTS):
        assert (report_dir / name).stat().st_size > 0, name


def test_plots_are_png(report_dir):
    """Every plot starts with the PNG signature."""
    for name in (*PLOTS, *CDF_PLOTS):
        assert (report_dir / name).read_bytes()[:8] == PNG_SIGNATURE, name


def test_raw_rows_round_trip(report_dir):
    """results.csv and results.json hold every row; NaN becomes JSON null."""
    with (report_dir / "results.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 6 and list(csv_rows[0])[:3] == ["policy", "rate_rps", "repeat"]
    json_rows = json.loads((report_dir / "results.json").read_text())
    assert json_rows[1]["ttft_p95_s"] == pytest.approx(0.2)
    assert json_rows[0]["tpot_mean_s"] is None


def test_summary_states_ratio_against_baseline(report_dir):
    """The summary's TTFT ratio at a rate is baseline p95 / policy p95 from the rows."""
    rows = make_rows()
    base = next(r for r in rows if r["policy"] == "vllm" and r["rate_rps"] == 4.0)
    pol = next(r for r in rows if r["policy"] == "cacheopt" and r["rate_rps"] == 4.0)
    expected = f"{base['ttft_p95_s'] / pol['ttft_p95_s']:.2f}x"
    table = ratio_table(rows, "vllm", 4.0)
    cacheopt_line = next(line for line in table.splitlines() if line.startswith("| cacheopt"))
    assert expected == "2.00x" and expected in cacheopt_line
    assert "+2.0 pp" in cacheopt_line  # SLO attainment 0.97 - 0.95
    assert table in (report_dir / "summary.md").read_text()


def test_summary_has_sustainable_rate_and_knee(report_dir):
    """vllm sustains 4 + 0.05/0.45 * 2 req/s; the knee is the next swept rate, 6."""
    text = (report_dir / "summary.md").read_text()
    vllm_msr = 4.0 + (0.95 - 0.9) / (0.95 - 0.5) * 2.0
    # vLLM's attainment is monotone here, so its first-failure rate equals its sustainable rate.
    assert f"| vllm | {vllm_msr:.3g} | {vllm_msr:.3g} | 1.00x |" in text
    assert f"| cacheopt | >= 6 | 6 | >= {6.0 / vllm_msr:.2f}x |" in text  # passed the top rate
    assert knee_rate(make_rows(), "vllm") == 6.0
    assert "## 6 req/s (knee)" in text and text.rstrip().endswith("Data: test.")


def test_no_cdf_plots_without_samples(tmp_path, monkeypatch):
    """The knee CDFs are drawn only when samples are given."""
    drawn = []
    monkeypatch.setattr(report, "_plot_vs_rate", lambda path, *a, **kw: drawn.append(path.name))
    monkeypatch.setattr(report, "_plot_cdf", lambda path, *a, **kw: drawn.append(path.name))
    write_report(tmp_path, make_rows(), title="No CDF")
    assert drawn == list(PLOTS)


def test_repeats_give_mean_and_range():
    """With repeats a cell shows mean (min–max), the ratio range from paired repeats."""
    rows = make_rows(repeats=2)
    line = next(row for row in ratio_table(rows, "vllm", 2.0).splitlines() if row.startswith("| cacheopt"))
    assert "| 2 | 0.167 (0.133–0.2) |" in line  # runs, TTFT p95 mean (min–max)
    assert "2.40x (2.00x–3.00x)" in line  # ratio of means 0.4 / (0.2 + 0.133) * 2; paired 2 and 3


def test_missing_baseline_reports_na():
    """Without the baseline in the rows, ratios are n/a instead of an error."""
    rows = [r for r in make_rows() if r["policy"] == "cacheopt"]
    text = summary_markdown(rows, baseline="vllm", title="No baseline")
    assert "n/a" in text and "not in these runs" in text


def test_empty_rows_rejected(tmp_path):
    """A report of nothing is an input error."""
    with pytest.raises(ValueError, match="no rows"):
        write_report(tmp_path, [], title="x")


def test_per_class_table_lists_each_slo_class():
    """The per-class table has a TTFT and an attainment column per class, averaged over repeats."""
    from bench.report import per_class_table

    rows = [{"policy": "p", "rate_rps": 1.0, "repeat": k, "ttft_p95_s_chat": 1.0 + k, "slo_attainment_chat": 0.5,
             "ttft_p95_s_batch": 2.0, "slo_attainment_batch": 1.0} for k in (0, 1)]
    table = per_class_table(rows, ["p"], 1.0)
    assert "batch TTFT p95 (s)" in table and "chat SLO att." in table
    assert "1.5" in table  # mean of 1.0 and 2.0
