"""Per-run metrics (DESIGN.md section 7), named like `vllm bench serve` where they overlap.

Definitions:
- TTFT = first token - arrival; E2E = finish - arrival; TPOT = (E2E - TTFT) / (output - 1)
  for finished requests with >= 2 output tokens. Latency percentiles are over the requests
  that have the quantity (unfinished requests have no E2E); numpy's linear interpolation.
- ITL percentiles are over all token gaps of all requests. The headline tail TBT is
  `max_gap_p95_s`: the 95th percentile over requests (with >= 1 gap) of each request's
  largest gap, because a preemption is one long stall that gap percentiles dilute.
- A request meets its TTFT SLO when it got a first token within `slo.ttft_s`; it meets its
  TBT SLO when it finished and >= 95% of its gaps are <= `slo.tbt_s` (trivially with no
  gaps). Unfinished requests miss the TBT SLO, and so both. Attainments are fractions of
  all requests; goodput is requests meeting both per second of `duration_s`.
- A shed request (refused after a bounded wait, an error the client may retry) has no
  first token: it misses both SLOs and counts in `shed_share`. TTFT percentiles and
  `ttft_max_s` are over served requests only, so starvation shows there and shedding in
  `shed_share`; both stand next to attainment in every report.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from replicas.request import Slo

# A request meets its TBT SLO when at least this share of its gaps is within it (in %).
TBT_GAPS_WITHIN_PCT = 95
PREEMPTION_MODES = ("recompute", "swap")


@dataclass(frozen=True)
class RequestOutcome:
    request_id: str
    slo: Slo
    arrival_s: float
    prompt_tokens: int
    output_tokens: int  # tokens actually generated
    true_output_tokens: int  # what the trace says it should generate
    first_token_s: float | None  # None: never got a first token (run ended first)
    finish_s: float | None  # None: unfinished
    token_gaps_s: Sequence[float]  # gaps between consecutive output tokens
    num_preemptions: int
    num_recomputed_tokens: int
    bound_tokens: int  # predicted padded bound U_p at admission (0 = no prediction)
    shed: bool = False  # refused after a bounded wait, before any token (429 to a client)


@dataclass(frozen=True)
class RunStats:
    """Engine-level facts of one run."""

    duration_s: float  # first arrival to last finish (or cut-off)
    preemptions_by_mode: Mapping[str, int] | None  # "recompute", "swap"; None: not known (NaN in the metrics)
    kv_utilization_mean: float  # mean over steps of held blocks / total blocks (NaN: not known)
    counters: Mapping[str, int]  # free-form decision counters (admit, embed, topup, ...)
    # False where the outcomes cannot say which requests were preempted (a client over HTTP
    # sees only tokens): then preempted_requests and recomputed_tokens are NaN.
    per_request_preemptions: bool = True


def _latency_block(prefix: str, values: np.ndarray) -> dict[str, float]:
    if not values.size:
        return {f"{prefix}_{stat}_s": float("nan") for stat in ("mean", "p50", "p95", "p99", "max")}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])  # one partition for all three
    return {
        f"{prefix}_mean_s": float(values.mean()),
        f"{prefix}_p50_s": float(p50),
        f"{prefix}_p95_s": float(p95),
        f"{prefix}_p99_s": float(p99),
        f"{prefix}_max_s": float(values.max()),
    }


def _percentile(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else float("nan")


def _per_rate(count: float, duration_s: float) -> float:
    return count / duration_s if duration_s > 0 else float("nan")


def summarize(outcomes: Sequence[RequestOutcome], stats: RunStats) -> dict[str, float]:
    """Flat metrics of one run; every value is a float (NaN where undefined, e.g. a
    percentile of nothing)."""
    if stats.duration_s < 0:
        raise ValueError(f"duration_s={stats.duration_s} must be >= 0")
    n = len(outcomes)
    nan = float("nan")
    arrival = np.fromiter((o.arrival_s for o in outcomes), float, n)
    first = np.fromiter((nan if o.first_token_s is None else o.first_token_s for o in outcomes), float, n)
    finish = np.fromiter((nan if o.finish_s is None else o.finish_s for o in outcomes), float, n)
    output = np.fromiter((o.output_tokens for o in outcomes), np.int64, n)
    ttft_slo = np.fromiter((o.slo.ttft_s for o in outcomes), float, n)
    tbt_slo = np.fromiter((o.slo.tbt_s for o in outcomes), float, n)
    has_first, finished = ~np.isnan(first), ~np.isnan(finish)

    # All gaps in one array; request i owns gaps[offsets[i]:offsets[i] + num_gaps[i]].
    gap_lists = [o.token_gaps_s for o in outcomes]
    num_gaps = np.fromiter((len(g) for g in gap_lists), np.int64, n)
    gaps = np.fromiter(itertools.chain.from_iterable(gap_lists), float, int(num_gaps.sum()))
    offsets = np.concatenate(([0], np.cumsum(num_gaps)[:-1])) if n else np.empty(0, np.int64)
    has_gap = num_gaps > 0
    within = (gaps <= np.repeat(tbt_slo, num_gaps)).astype(np.int64)
    num_within = np.zeros(n, np.int64)
    max_gap = np.full(n, nan)
    if gaps.size:
        starts = offsets[has_gap]  # reduceat needs non-empty segments
        num_within[has_gap] = np.add.reduceat(within, starts)
        max_gap[has_gap] = np.maximum.reduceat(gaps, starts)

    ttft = first - arrival
    e2e = finish - arrival
    tpot_ok = finished & has_first & (output >= 2)
    tpot = (finish[tpot_ok] - first[tpot_ok]) / (output[tpot_ok] - 1)

    ttft_met = has_first & (ttft <= ttft_slo)  # NaN compares False: no first token misses
    tbt_met = finished & (num_within * 100 >= TBT_GAPS_WITHIN_PCT * num_gaps)
    both_met = ttft_met & tbt_met
    num_finished = int(finished.sum())

    metrics: dict[str, float] = {"num_requests": float(n), "num_finished": float(num_finished)}
    metrics |= _latency_block("ttft", ttft[has_first])
    metrics |= _latency_block("itl", gaps)
    metrics |= _latency_block("max_gap", max_gap[has_gap])
    metrics |= _latency_block("tpot", tpot)
    metrics |= _latency_block("e2e", e2e[finished])
    metrics |= {
        "ttft_slo_attainment": float(ttft_met.mean()) if n else nan,
        "tbt_slo_attainment": float(tbt_met.mean()) if n else nan,
        "slo_attainment": float(both_met.mean()) if n else nan,
        "shed_share": float(np.mean([o.shed for o in outcomes])) if n else nan,
        "goodput_rps": _per_rate(float(both_met.sum()), stats.duration_s),
        "throughput_rps": _per_rate(float(num_finished), stats.duration_s),
        "output_tokens_per_s": _per_rate(float(output.sum()), stats.duration_s),
    }
    # Per SLO class: an SLO-aware policy trades one class's latency for another's.
    class_names = np.array([o.slo.name for o in outcomes])
    for name in sorted(set(class_names.tolist())):
        mine = class_names == name
        metrics[f"ttft_p95_s_{name}"] = _percentile(ttft[mine & has_first], 95)
        metrics[f"ttft_p99_s_{name}"] = _percentile(ttft[mine & has_first], 99)
        metrics[f"max_gap_p95_s_{name}"] = _percentile(max_gap[mine & has_gap], 95)
        metrics[f"slo_attainment_{name}"] = float(both_met[mine].mean())
    metrics |= _preemption_metrics(outcomes, stats)
    metrics |= _predictor_metrics(outcomes)
    metrics["kv_utilization_mean"] = float(stats.kv_utilization_mean)
    # vLLM's prefix-cache hit rate: hit tokens over the tokens of every admission's lookup.
    queried = stats.counters.get("prefix_query_tokens", 0)
    metrics["prefix_hit_rate"] = stats.counters.get("prefix_hit_tokens", 0) / queried if queried else nan
    for name, count in stats.counters.items():
        metrics[f"count_{name}"] = float(count)
    return metrics


def _preemption_metrics(outcomes: Sequence[RequestOutcome], stats: RunStats) -> dict[str, float]:
    nan = float("nan")
    if stats.preemptions_by_mode is None:
        metrics = {f"preemptions_{mode}": nan for mode in PREEMPTION_MODES}
        metrics |= {"preemptions_total": nan, "preemptions_per_1k": nan}
    else:
        by_mode = {mode: 0 for mode in PREEMPTION_MODES} | dict(stats.preemptions_by_mode)
        total = sum(by_mode.values())
        n = len(outcomes)
        metrics = {f"preemptions_{mode}": float(count) for mode, count in by_mode.items()}
        metrics |= {"preemptions_total": float(total), "preemptions_per_1k": 1000.0 * total / n if n else nan}
    known = stats.per_request_preemptions
    metrics |= {
        "preempted_requests": float(sum(1 for o in outcomes if o.num_preemptions > 0)) if known else nan,
        "recomputed_tokens": float(sum(o.num_recomputed_tokens for o in outcomes)) if known else nan,
    }
    return metrics


def _predictor_metrics(outcomes: Sequence[RequestOutcome]) -> dict[str, float]:
    """Coverage: share of predicted requests (bound > 0) whose true length fits the bound.
    Padding: mean of bound - true over the same requests (signed: a short bound counts
    negative, so the mean is the net over-reservation per request)."""
    n = len(outcomes)
    bound = np.fromiter((o.bound_tokens for o in outcomes), np.int64, n)
    true = np.fromiter((o.true_output_tokens for o in outcomes), np.int64, n)
    predicted = bound > 0
    if not predicted.any():
        return {"predictor_coverage": float("nan"), "predictor_padding_mean_tokens": float("nan")}
    bound, true = bound[predicted], true[predicted]
    return {
        "predictor_coverage": float((true <= bound).mean()),
        "predictor_padding_mean_tokens": float((bound - true).mean()),
    }


def max_sustainable_rate(
    rates: Sequence[float], attainments: Sequence[float], threshold: float = 0.9, *, first_failure: bool = False
) -> float:
    """The highest arrival rate whose SLO attainment is >= `threshold`.

    Rates are sorted first; attainments at equal rates (repeats) are averaged. Let r_i be
    the highest passing rate. If a higher rate r_{i+1} was swept (it fails), the answer is
    interpolated linearly to where attainment crosses the threshold between them:
    r_i + (a_i - threshold) / (a_i - a_{i+1}) * (r_{i+1} - r_i). If r_i is the highest
    rate swept it is returned as is (no extrapolation). A failing rate below r_i (noise
    near saturation) does not stop the search, unless `first_failure`: then r_i is the
    last rate before the first failing one (every rate up to it passes), the honest
    figure when attainment is not monotone in rate. 0.0 if no rate passes (with
    `first_failure`: if the lowest rate fails). NaN attainment fails.
    """
    if len(rates) != len(attainments):
        raise ValueError(f"{len(rates)} rates but {len(attainments)} attainments")
    if not rates:
        return 0.0
    r = np.asarray(rates, dtype=float)
    a = np.nan_to_num(np.asarray(attainments, dtype=float), nan=-np.inf)
    uniq, inverse = np.unique(r, return_inverse=True)
    a_mean = np.bincount(inverse, weights=a) / np.bincount(inverse)
    passing = a_mean >= threshold
    if first_failure:
        failing = np.flatnonzero(~passing)
        if not failing.size:
            return float(uniq[-1])
        if failing[0] == 0:
            return 0.0
        i = failing[0] - 1
    else:
        if not passing.any():
            return 0.0
        i = np.flatnonzero(passing)[-1]
    if i == len(uniq) - 1:
        return float(uniq[i])
    a_lo, a_hi = a_mean[i], a_mean[i + 1]
    if not np.isfinite(a_hi):
        return float(uniq[i])
    frac = (a_lo - threshold) / (a_lo - a_hi)
    return float(uniq[i] + frac * (uniq[i + 1] - uniq[i]))
