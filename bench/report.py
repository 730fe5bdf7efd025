"""Benchmark reports: raw rows (CSV, JSON), a markdown summary of ratios against a baseline
measured in the same run, and plots of tail latency and SLO attainment against rate.

A row is one run: `policy`, `rate_rps`, `repeat` plus the flat metrics of
`bench.metrics.summarize`. Ablations (`cacheopt-no_topup`, ...) are just more policies.
Ratios are `baseline / policy` for latencies, so > 1 means the policy is better;
attainment deltas are `policy - baseline` in percentage points. With repeats, a cell is
the mean over repeats with the min-max range in parentheses; a ratio is the ratio of the
means, its range the min-max of the per-repeat ratios (repeat k of the policy against
repeat k of the baseline).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from bench.metrics import max_sustainable_rate

SLO_THRESHOLD = 0.9
ID_KEYS = ("policy", "rate_rps", "repeat")

# (column title, metric, kind): kind picks the number format.
KEY_METRICS: tuple[tuple[str, str, str], ...] = (
    ("TTFT p95 (s)", "ttft_p95_s", "latency"),
    ("TTFT p99 (s)", "ttft_p99_s", "latency"),
    ("TTFT max (s)", "ttft_max_s", "latency"),
    ("max-gap p95 (s)", "max_gap_p95_s", "latency"),
    ("ITL p95 (s)", "itl_p95_s", "latency"),
    ("TTFT att.", "ttft_slo_attainment", "fraction"),
    ("TBT att.", "tbt_slo_attainment", "fraction"),
    ("SLO att.", "slo_attainment", "fraction"),
    ("shed", "shed_share", "fraction"),
    ("goodput (req/s)", "goodput_rps", "number"),
    ("preempt/1k", "preemptions_per_1k", "number"),
    ("prefix hits", "prefix_hit_rate", "fraction"),
)
# Latencies compared as baseline / policy (> 1: the policy is faster).
RATIO_METRICS: tuple[tuple[str, str], ...] = (
    ("TTFT p95 ratio", "ttft_p95_s"),
    ("TTFT p99 ratio", "ttft_p99_s"),
    ("max-gap p95 ratio", "max_gap_p95_s"),
    ("ITL p95 ratio", "itl_p95_s"),
)
# Attainments compared as policy - baseline, in percentage points.
DELTA_METRICS: tuple[tuple[str, str], ...] = (
    ("Δ TTFT att.", "ttft_slo_attainment"),
    ("Δ TBT att.", "tbt_slo_attainment"),
    ("Δ SLO att.", "slo_attainment"),
)


def write_report(
    out_dir: Path,
    rows: list[dict],
    *,
    baseline: str = "vllm",
    title: str,
    cdf_samples: dict[str, dict[str, Sequence[float]]] | None = None,
    extra_markdown: str = "",
    slo_threshold: float = SLO_THRESHOLD,
) -> Path:
    """Write results.csv, results.json, summary.md and the PNG plots into `out_dir`.

    `cdf_samples` is `{policy: {"ttft": [...], "tbt": [...]}}` measured at the knee rate;
    when given, the CDF plots are drawn too. Returns the path of summary.md.
    """
    _check_rows(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(out_dir / "results.csv", rows)
    _write_json(out_dir / "results.json", rows)
    summary = out_dir / "summary.md"
    summary.write_text(summary_markdown(rows, baseline=baseline, title=title,
                                        extra_markdown=extra_markdown, slo_threshold=slo_threshold))
    _plot_all(out_dir, rows, baseline, cdf_samples, knee_rate(rows, baseline, slo_threshold), slo_threshold)
    return summary


def _check_rows(rows: Sequence[Mapping]) -> None:
    if not rows:
        raise ValueError("no rows to report")
    for i, row in enumerate(rows):
        missing = [key for key in ("policy", "rate_rps") if key not in row]
        if missing:
            raise ValueError(f"row {i} lacks {missing}: {dict(row)}")


def _repeat(row: Mapping) -> int:
    return int(row.get("repeat", 0))


def policies_in(rows: Sequence[Mapping], baseline: str) -> list[str]:
    """Policies in order of first appearance, the baseline first."""
    names = list(dict.fromkeys(str(row["policy"]) for row in rows))
    return sorted(names, key=lambda name: name != baseline)


def rates_in(rows: Sequence[Mapping]) -> list[float]:
    return sorted({float(row["rate_rps"]) for row in rows})


def _runs(rows: Sequence[Mapping], policy: str, rate: float) -> dict[int, Mapping]:
    return {_repeat(r): r for r in rows if r["policy"] == policy and float(r["rate_rps"]) == rate}


def _values(runs: Mapping[int, Mapping], metric: str) -> np.ndarray:
    values = np.array([_to_float(run.get(metric)) for run in runs.values()], dtype=float)
    return values[~np.isnan(values)]


def _to_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _stats(values: np.ndarray) -> tuple[float, float, float]:
    if not values.size:
        return math.nan, math.nan, math.nan
    return float(values.mean()), float(values.min()), float(values.max())


def _fmt(value: float, kind: str) -> str:
    if not math.isfinite(value):
        return "–"
    if kind == "fraction":
        return f"{100 * value:.1f}%"
    if kind == "ratio":
        return f"{value:.2f}x"
    if kind == "delta":
        return f"{100 * value:+.1f} pp"
    return f"{value:.3g}"


def _cell(mean: float, lo: float, hi: float, kind: str, show_range: bool) -> str:
    text = _fmt(mean, kind)
    if show_range and math.isfinite(lo) and math.isfinite(hi):
        text += f" ({_fmt(lo, kind)}–{_fmt(hi, kind)})"
    return text


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def _ratio(base: float, value: float) -> float:
    return base / value if value > 0 and math.isfinite(base) else math.nan


def compare(rows: Sequence[Mapping], baseline: str, policy: str, rate: float, metric: str, *,
            ratio: bool) -> tuple[float, float, float]:
    """(mean, min, max) of `baseline / policy` (ratio) or `policy - baseline` (delta) at
    `rate`: the mean compares the means over repeats; the range spans paired repeats."""
    base_runs, runs = _runs(rows, baseline, rate), _runs(rows, policy, rate)
    base_mean, pol_mean = _stats(_values(base_runs, metric))[0], _stats(_values(runs, metric))[0]
    combine = _ratio if ratio else (lambda b, p: p - b)
    paired = [combine(_to_float(base_runs[k].get(metric)), _to_float(runs[k].get(metric)))
              for k in sorted(base_runs.keys() & runs.keys())]
    paired = np.array([p for p in paired if math.isfinite(p)], dtype=float)
    lo, hi = (float(paired.min()), float(paired.max())) if paired.size else (math.nan, math.nan)
    return combine(base_mean, pol_mean), lo, hi


def ratio_table(rows: Sequence[Mapping], baseline: str, rate: float) -> str:
    """Markdown table at one rate: key metrics per policy, then ratios and attainment
    deltas against `baseline` (ratio columns are n/a when the baseline did not run)."""
    rate = float(rate)
    has_baseline = bool(_runs(rows, baseline, rate))
    header = ["policy", "runs"] + [title for title, _, _ in KEY_METRICS]
    header += [title for title, _ in RATIO_METRICS] + [title for title, _ in DELTA_METRICS]
    body = []
    for policy in policies_in(rows, baseline):
        runs = _runs(rows, policy, rate)
        if not runs:
            continue
        show_range = len(runs) > 1
        cells = [policy, str(len(runs))]
        cells += [_cell(*_stats(_values(runs, metric)), kind, show_range) for _, metric, kind in KEY_METRICS]
        for _, metric in RATIO_METRICS:
            cells.append(_cell(*compare(rows, baseline, policy, rate, metric, ratio=True), "ratio", show_range)
                         if has_baseline else "n/a")
        for _, metric in DELTA_METRICS:
            cells.append(_cell(*compare(rows, baseline, policy, rate, metric, ratio=False), "delta", show_range)
                         if has_baseline else "n/a")
        body.append(cells)
    return _md_table(header, body)


def sustainable_rates(rows: Sequence[Mapping], policy: str, slo_threshold: float = SLO_THRESHOLD, *,
                      first_failure: bool = False) -> tuple[float, float, float]:
    """(from mean attainment per rate, min, max over repeats) of the maximum sustainable
    rate, or with `first_failure` of the rate up to which every swept rate passes."""
    runs = [r for r in rows if r["policy"] == policy]
    if not runs:
        return math.nan, math.nan, math.nan

    def msr(part: Sequence[Mapping]) -> float:
        return max_sustainable_rate([float(r["rate_rps"]) for r in part],
                                    [_to_float(r.get("slo_attainment")) for r in part], slo_threshold,
                                    first_failure=first_failure)

    per_repeat = [msr([r for r in runs if _repeat(r) == k]) for k in sorted({_repeat(r) for r in runs})]
    return msr(runs), min(per_repeat), max(per_repeat)


def is_cacheopt(policy: str) -> bool:
    """CacheOPT, its designs and ablations, and the oracle (CacheOPT with true lengths)."""
    return policy.startswith("cacheopt") or policy == "oracle"


def strongest_baseline(rows: Sequence[Mapping], slo_threshold: float = SLO_THRESHOLD) -> str | None:
    """The baseline (any policy that is not CacheOPT) with the highest sustainable rate."""
    baselines = [p for p in dict.fromkeys(str(r["policy"]) for r in rows) if not is_cacheopt(p)]
    if not baselines:
        return None
    return max(baselines, key=lambda p: sustainable_rates(rows, p, slo_threshold)[0])


def knee_rate(rows: Sequence[Mapping], baseline: str, slo_threshold: float = SLO_THRESHOLD) -> float | None:
    """The baseline's maximum sustainable rate rounded up to the nearest swept rate (the
    highest swept rate when it sustains them all); None when the baseline did not run."""
    msr = sustainable_rates(rows, baseline, slo_threshold)[0]
    if math.isnan(msr):
        return None
    rates = rates_in(rows)
    return next((r for r in rates if r >= msr), rates[-1])


def summary_markdown(rows: Sequence[Mapping], *, baseline: str, title: str, extra_markdown: str = "",
                     slo_threshold: float = SLO_THRESHOLD) -> str:
    _check_rows(rows)
    policies, rates = policies_in(rows, baseline), rates_in(rows)
    num_repeats = len({_repeat(r) for r in rows})
    knee = knee_rate(rows, baseline, slo_threshold)
    parts = [
        f"# {title}",
        f"Policies: {', '.join(f'`{p}`' for p in policies)}. Baseline: `{baseline}`"
        + ("" if baseline in policies else " (**not in these runs: no ratios**)")
        + f". Rates (req/s): {', '.join(f'{r:g}' for r in rates)}. Repeats: {num_repeats}.",
        "Ratios are baseline / policy (> 1: the policy is better); Δ is policy - baseline in "
        "percentage points. max-gap p95 (the 95th percentile over requests of each request's "
        "largest token gap) is the headline tail TBT. With repeats: mean (min–max).",
        "## Maximum sustainable rate",
        f"Highest rate with SLO attainment >= {100 * slo_threshold:g}%, interpolated linearly "
        "between the last passing and the first failing swept rate (>=: it passed the highest "
        "rate swept, so the true value may be higher). First-failure rate: the same up to the "
        "first failing rate, so every rate below it passes. Ratios against the baseline and "
        "against the strongest policy that is not CacheOPT. With repeats: mean (min–max).",
        _msr_table(rows, policies, baseline, slo_threshold, num_repeats > 1),
        "Knee (the baseline's maximum sustainable rate rounded up to a swept rate): "
        + (f"**{knee:g} req/s**." if knee is not None else "n/a."),
    ]
    for rate in rates:
        parts += [f"## {rate:g} req/s" + (" (knee)" if rate == knee else ""), ratio_table(rows, baseline, rate)]
    if knee is not None:
        parts += [f"## Per SLO class at the knee ({knee:g} req/s)", per_class_table(rows, policies, knee)]
    if extra_markdown:
        parts.append(extra_markdown.strip())
    return "\n\n".join(parts) + "\n"


def per_class_table(rows: Sequence[Mapping], policies: Sequence[str], rate: float) -> str:
    """TTFT p95 and p99 and SLO attainment of each SLO class (`*_<class>` metrics), mean over repeats."""
    classes = sorted({key.removeprefix("slo_attainment_") for row in rows for key in row
                      if key.startswith("slo_attainment_")})
    if not classes:
        return "No per-class metrics in these rows."
    body = []
    for policy in policies:
        runs = _runs(rows, policy, rate)
        cells = [policy]
        for name in classes:
            for metric, kind in ((f"ttft_p95_s_{name}", "latency"), (f"ttft_p99_s_{name}", "latency"),
                                 (f"slo_attainment_{name}", "fraction")):
                values = _values(runs, metric)
                cells.append(_fmt(float(values.mean()) if values.size else math.nan, kind))
        body.append(cells)
    header = ["policy"] + [f"{name} {what}" for name in classes
                           for what in ("TTFT p95 (s)", "TTFT p99 (s)", "SLO att.")]
    return _md_table(header, body)


def _msr_table(rows: Sequence[Mapping], policies: Sequence[str], baseline: str, slo_threshold: float,
               show_range: bool) -> str:
    """A policy that sustains the highest swept rate may sustain more: its rate and its
    ratio are lower bounds, marked >=; with the reference also capped the ratio is
    unknown. Ratios against the baseline and against the strongest non-CacheOPT policy."""
    top_rate = rates_in(rows)[-1]
    strongest = strongest_baseline(rows, slo_threshold)
    references = [baseline] + ([strongest] if strongest not in (None, baseline) else [])
    reference_rates = {ref: sustainable_rates(rows, ref, slo_threshold)[0] for ref in references}

    def ratio_cell(value: float, policy: str, ref: str) -> str:
        base = reference_rates[ref]
        text = _fmt(value / base if base > 0 else math.nan, "ratio")
        if policy == ref:
            return text
        if base == top_rate and value == top_rate:
            return "n/a (both sustain every rate)"
        return (">= " + text) if value == top_rate and text != "–" else text

    body = []
    for policy in policies:
        msr = sustainable_rates(rows, policy, slo_threshold)
        first = sustainable_rates(rows, policy, slo_threshold, first_failure=True)
        capped = msr[0] == top_rate
        body.append([policy, (">= " if capped else "") + _cell(*msr, "number", show_range),
                     _cell(*first, "number", show_range)]
                    + [ratio_cell(msr[0], policy, ref) for ref in references])
    header = ["policy", "max sustainable rate (req/s)", "first-failure rate (req/s)"]
    header += [f"ratio vs `{ref}`" for ref in references]
    return _md_table(header, body)


def _write_csv(path: Path, rows: Sequence[Mapping]) -> None:
    columns = list(dict.fromkeys([*ID_KEYS, *(key for row in rows for key in row)]))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN and inf are not JSON
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def _write_json(path: Path, rows: Sequence[Mapping]) -> None:
    safe = [{key: _json_safe(value) for key, value in row.items()} for row in rows]
    path.write_text(json.dumps(safe, indent=1, allow_nan=False) + "\n")


def _plot_all(out_dir: Path, rows: Sequence[Mapping], baseline: str,
              cdf_samples: Mapping[str, Mapping[str, Sequence[float]]] | None, knee: float | None,
              slo_threshold: float) -> None:
    policies = policies_in(rows, baseline)
    _plot_vs_rate(out_dir / "p95_ttft_vs_rate.png", rows, policies, baseline,
                  [("ttft_p95_s", "p95 TTFT (s)")], log=True)
    _plot_vs_rate(out_dir / "p95_tbt_vs_rate.png", rows, policies, baseline,
                  [("max_gap_p95_s", "p95 of per-request max gap (s)"), ("itl_p95_s", "p95 ITL (s)")], log=True)
    _plot_vs_rate(out_dir / "slo_attainment_vs_rate.png", rows, policies, baseline,
                  [("slo_attainment", "SLO attainment (both)"), ("ttft_slo_attainment", "TTFT SLO attainment"),
                   ("tbt_slo_attainment", "TBT SLO attainment")], log=False, hline=slo_threshold)
    if cdf_samples:
        at = f" at {knee:g} req/s (knee)" if knee is not None else ""
        order = [p for p in policies if p in cdf_samples] + [p for p in cdf_samples if p not in policies]
        _plot_cdf(out_dir / "ttft_cdf_knee.png", cdf_samples, order, baseline, "ttft", f"TTFT (s){at}")
        _plot_cdf(out_dir / "tbt_cdf_knee.png", cdf_samples, order, baseline, "tbt", f"largest gap between tokens per request (s){at}")


def _figure(num_panels: int):
    # The object-oriented API with the Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width_in, height_in = 5.2 * num_panels, 4.0
    fig = Figure(figsize=(width_in, height_in))
    FigureCanvasAgg(fig)
    # Fixed margins in inches: a layout engine would triple the drawing time.
    fig.subplots_adjust(left=0.9 / width_in, right=1 - 0.2 / width_in, bottom=0.55 / height_in,
                        top=1 - 0.2 / height_in, wspace=0.35)
    return fig, [fig.add_subplot(1, num_panels, i + 1) for i in range(num_panels)]


def _style(policy: str, baseline: str) -> dict:
    return {"color": "black", "linestyle": "--"} if policy == baseline else {}


def _plot_vs_rate(path: Path, rows: Sequence[Mapping], policies: Sequence[str], baseline: str,
                  panels: Sequence[tuple[str, str]], *, log: bool, hline: float | None = None) -> None:
    fig, axes = _figure(len(panels))
    for ax, (metric, label) in zip(axes, panels):
        any_positive = False
        for policy in policies:
            points = []
            for rate in rates_in(rows):
                mean, lo, hi = _stats(_values(_runs(rows, policy, rate), metric))
                if math.isfinite(mean) and (mean > 0 or not log):
                    points.append((rate, mean, mean - lo, hi - mean))
            if not points:
                continue
            any_positive = True
            x, y, below, above = (np.array(col) for col in zip(*points))
            ax.errorbar(x, y, yerr=[below, above], marker="o", capsize=3, label=policy, **_style(policy, baseline))
        if hline is not None:
            ax.axhline(hline, color="grey", linewidth=0.8, linestyle=":")
            ax.set_ylim(0.0, 1.05)
        if log and any_positive:
            ax.set_yscale("log")
        ax.set_xlabel("arrival rate (req/s)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if any_positive:
            ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)


def _plot_cdf(path: Path, samples: Mapping[str, Mapping[str, Sequence[float]]], policies: Sequence[str],
              baseline: str, key: str, xlabel: str) -> None:
    fig, (ax,) = _figure(1)
    drawn = False
    for policy in policies:
        values = np.sort(np.asarray(samples[policy].get(key, ()), dtype=float))
        values = values[np.isfinite(values) & (values > 0)]  # log axis
        if not values.size:
            continue
        drawn = True
        ax.step(values, np.arange(1, values.size + 1) / values.size, where="post", label=policy,
                **_style(policy, baseline))
    if drawn:
        ax.set_xscale("log")
        ax.legend(fontsize="small")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("CDF")
    ax.set_ylim(0.0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=110)
