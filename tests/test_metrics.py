"""Run metrics with known answers (bench.metrics)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from bench.metrics import RequestOutcome, RunStats, max_sustainable_rate, summarize
from replicas.request import Slo

SLO = Slo("test", ttft_s=1.0, tbt_s=0.1)


def outcome(
    i: int = 0,
    *,
    arrival_s: float = 0.0,
    ttft_s: float | None = 0.5,
    gaps: list[float] | None = None,
    finished: bool = True,
    slo: Slo = SLO,
    bound_tokens: int = 0,
    true_output_tokens: int | None = None,
    num_preemptions: int = 0,
    num_recomputed_tokens: int = 0,
) -> RequestOutcome:
    """A request whose tokens come at first_token + cumulative gaps."""
    gaps = [0.05, 0.05] if gaps is None else gaps
    first = None if ttft_s is None else arrival_s + ttft_s
    output = 0 if first is None else len(gaps) + 1
    finish = first + sum(gaps) if finished and first is not None else None
    return RequestOutcome(
        request_id=f"r{i}", slo=slo, arrival_s=arrival_s, prompt_tokens=10, output_tokens=output,
        true_output_tokens=output if true_output_tokens is None else true_output_tokens,
        first_token_s=first, finish_s=finish, token_gaps_s=gaps, num_preemptions=num_preemptions,
        num_recomputed_tokens=num_recomputed_tokens, bound_tokens=bound_tokens,
    )


def stats(duration_s: float = 10.0, **kw) -> RunStats:
    return RunStats(duration_s=duration_s, preemptions_by_mode=kw.get("modes", {}),
                    kv_utilization_mean=kw.get("kv", 0.5), counters=kw.get("counters", {}))


def test_ttft_percentiles_are_numpy_linear():
    """TTFT p50/p95/p99 equal numpy's linear percentiles of first_token - arrival."""
    ttfts = [0.1, 0.2, 0.3, 0.4, 1.5]
    m = summarize([outcome(i, arrival_s=i, ttft_s=t) for i, t in enumerate(ttfts)], stats())
    for q in (50, 95, 99):
        assert m[f"ttft_p{q}_s"] == pytest.approx(np.percentile(ttfts, q))


def test_itl_is_over_all_gaps_and_max_gap_over_requests():
    """ITL percentiles pool every gap; max_gap percentiles take each request's largest gap."""
    gap_lists = [[0.01] * 9 + [2.0], [0.02] * 10, [0.03] * 10]
    m = summarize([outcome(i, gaps=g) for i, g in enumerate(gap_lists)], stats())
    pooled = np.concatenate(gap_lists)
    assert m["itl_p95_s"] == pytest.approx(np.percentile(pooled, 95))
    assert m["itl_p50_s"] == pytest.approx(0.02)
    assert m["max_gap_p95_s"] == pytest.approx(np.percentile([2.0, 0.02, 0.03], 95))
    assert m["max_gap_p95_s"] > 10 * m["itl_p95_s"]  # one stall dominates the headline


def test_tpot_and_e2e():
    """TPOT = (e2e - ttft) / (output - 1); E2E = finish - arrival."""
    m = summarize([outcome(gaps=[0.1, 0.3], ttft_s=0.5, arrival_s=2.0)], stats())
    assert m["tpot_mean_s"] == pytest.approx(0.2)
    assert m["e2e_p50_s"] == pytest.approx(0.9)


def test_tbt_attainment_uses_95_percent_of_gaps():
    """19 of 20 gaps within the TBT SLO meets it; 18 of 20 misses; 0 gaps meets trivially."""
    ok = outcome(0, gaps=[0.05] * 19 + [5.0])
    miss = outcome(1, gaps=[0.05] * 18 + [5.0, 5.0])
    single = outcome(2, gaps=[])
    m = summarize([ok, miss, single], stats())
    assert m["tbt_slo_attainment"] == pytest.approx(2 / 3)


def test_gap_equal_to_slo_is_within():
    """A gap exactly at tbt_s counts as within the SLO."""
    m = summarize([outcome(gaps=[0.1] * 5)], stats())
    assert m["tbt_slo_attainment"] == 1.0


def test_ttft_attainment_and_missing_first_token():
    """TTFT within SLO meets it; late TTFT and no first token miss; denominator is all."""
    m = summarize([outcome(0, ttft_s=0.9), outcome(1, ttft_s=1.1), outcome(2, ttft_s=None, gaps=[])], stats())
    assert m["ttft_slo_attainment"] == pytest.approx(1 / 3)
    assert m["ttft_p50_s"] == pytest.approx(1.0)  # only requests with a first token


def test_unfinished_request_misses_slo():
    """A request that started in time but never finished misses TBT and so both SLOs."""
    m = summarize([outcome(0), outcome(1, finished=False)], stats())
    assert m["ttft_slo_attainment"] == 1.0
    assert m["tbt_slo_attainment"] == 0.5
    assert m["slo_attainment"] == 0.5
    assert (m["num_requests"], m["num_finished"]) == (2.0, 1.0)


def test_goodput_counts_requests_meeting_both_per_second():
    """goodput = requests meeting both SLOs / duration; throughput counts finished ones."""
    outs = [outcome(0), outcome(1, ttft_s=3.0), outcome(2, gaps=[1.0, 1.0]), outcome(3)]
    m = summarize(outs, stats(duration_s=4.0))
    assert m["slo_attainment"] == 0.5
    assert m["goodput_rps"] == pytest.approx(0.5)
    assert m["throughput_rps"] == pytest.approx(1.0)
    assert m["output_tokens_per_s"] == pytest.approx(12 / 4)


def test_per_class_slos_are_applied_per_request():
    """The same gaps meet a loose class and miss a strict one."""
    loose = Slo("loose", ttft_s=10.0, tbt_s=1.0)
    m = summarize([outcome(0, gaps=[0.5] * 4), outcome(1, gaps=[0.5] * 4, slo=loose)], stats())
    assert m["tbt_slo_attainment"] == 0.5


def test_preemptions_predictor_and_counters():
    """Preemptions by mode and per 1k, recomputed tokens, coverage/padding, count_* keys."""
    outs = [
        outcome(0, bound_tokens=10, true_output_tokens=4, num_preemptions=1, num_recomputed_tokens=30),
        outcome(1, bound_tokens=5, true_output_tokens=7),
        outcome(2, bound_tokens=0, true_output_tokens=100),
        outcome(3),
    ]
    m = summarize(outs, stats(modes={"recompute": 3, "swap": 1}, counters={"embed": 2, "topup": 5}, kv=0.7))
    assert (m["preemptions_recompute"], m["preemptions_swap"]) == (3.0, 1.0)
    assert m["preemptions_per_1k"] == pytest.approx(1000.0)
    assert m["recomputed_tokens"] == 30.0
    assert m["predictor_coverage"] == 0.5
    assert m["predictor_padding_mean_tokens"] == pytest.approx(((10 - 4) + (5 - 7)) / 2)
    assert (m["count_embed"], m["count_topup"], m["kv_utilization_mean"]) == (2.0, 5.0, 0.7)
    assert all(isinstance(v, float) for v in m.values())


def test_what_a_client_cannot_know_is_nan_not_zero():
    """Over HTTP: preemptions unknown (a server without the counters) are NaN, as are which
    requests were preempted; totals read from a server's /metrics still count."""
    outs = [outcome(0), outcome(1)]
    unknown = summarize(outs, RunStats(duration_s=1.0, preemptions_by_mode=None, kv_utilization_mean=math.nan,
                                       counters={}, per_request_preemptions=False))
    for key in ("preemptions_total", "preemptions_per_1k", "preemptions_recompute", "preempted_requests",
                "recomputed_tokens", "kv_utilization_mean"):
        assert math.isnan(unknown[key]), key
    scraped = summarize(outs, RunStats(duration_s=1.0, preemptions_by_mode={"recompute": 3}, kv_utilization_mean=0.0,
                                       counters={}, per_request_preemptions=False))
    assert (scraped["preemptions_total"], scraped["preemptions_per_1k"]) == (3.0, 1500.0)
    assert math.isnan(scraped["preempted_requests"])


def test_summarize_is_fast_for_large_runs():
    """20k requests x 200 gaps summarize well under a second (one numpy array)."""
    rng = np.random.default_rng(0)
    gaps = rng.uniform(0.0, 0.3, size=(20_000, 200)).tolist()
    outs = [
        RequestOutcome(f"r{i}", SLO, 0.1 * i, 100, 201, 201, 0.1 * i + 0.5, 0.1 * i + 30.0, g, 0, 0, 250)
        for i, g in enumerate(gaps)
    ]
    start = time.perf_counter()
    m = summarize(outs, stats(duration_s=3000.0))
    assert time.perf_counter() - start < 1.0  # ~0.3 s here; slack for slow CI machines
    assert m["num_requests"] == 20_000.0


def test_max_sustainable_rate_interpolates():
    """Between the last passing (0.95 at 4) and first failing (0.85 at 6) rate: 5.0."""
    assert max_sustainable_rate([6, 2, 4], [0.85, 0.99, 0.95]) == pytest.approx(5.0)


def test_max_sustainable_rate_edges():
    """None passing gives 0; all passing gives the highest rate; threshold is inclusive."""
    assert max_sustainable_rate([1, 2], [0.5, 0.1]) == 0.0
    assert max_sustainable_rate([1, 2], [0.95, 0.91]) == 2.0
    assert max_sustainable_rate([1, 2], [0.9, 0.5]) == 1.0
    assert max_sustainable_rate([], []) == 0.0


def test_max_sustainable_rate_averages_repeats():
    """Attainments at the same rate are averaged before searching."""
    assert max_sustainable_rate([1, 1, 2, 2], [1.0, 1.0, 0.9, 0.7]) == pytest.approx(1.5)


def test_max_sustainable_rate_rejects_mismatched_lengths():
    """Rates and attainments must pair up."""
    with pytest.raises(ValueError, match="3 rates but 2"):
        max_sustainable_rate([1, 2, 3], [0.9, 0.9])


def test_per_class_metrics_split_by_slo_name():
    """Each SLO class gets its own TTFT p95, max-gap p95 and attainment."""
    fast = Slo("fast", ttft_s=1.0, tbt_s=0.1)
    slow = Slo("slow", ttft_s=10.0, tbt_s=1.0)
    outcomes = [outcome(0, slo=fast, ttft_s=0.5, gaps=[0.05]), outcome(1, slo=slow, ttft_s=5.0, gaps=[0.5])]
    m = summarize(outcomes, stats())
    assert m["ttft_p95_s_fast"] == 0.5 and m["ttft_p95_s_slow"] == 5.0
    assert m["max_gap_p95_s_slow"] == 0.5 and m["slo_attainment_fast"] == 1.0
