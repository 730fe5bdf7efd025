"""Train, calibrate, load and evaluate the learned output-length predictor.

    train:    fit the text model on the training prompts, calibrate both bound methods on
              the calibration prompts, save a versioned artifact
    evaluate: coverage, padding and MAE on the held-out test prompts, against no padding
              (S3's reservation) and against reserving max_tokens, and prediction cost
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from predictor.alpaca import DATA_DIR, AlpacaRecord, load_alpaca, split_by_prompt
from predictor.artifact import ArtifactError, describe_training, load_artifact, save_artifact
from predictor.bounds import METHODS, ResidualBound, fit_bound
from predictor.point_bound import PointBoundPredictor
from predictor.text_model import TextLengthModel

DEFAULT_ARTIFACT = Path("artifacts/text-length")
DEFAULT_GENERATOR = "Meta-Llama-3-8B-Instruct"
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)
EVAL_CONFIDENCES = (0.8, 0.9, 0.95, 0.99)


def train(out: Path = DEFAULT_ARTIFACT, *, data_dir: Path = DATA_DIR, seed: int = 0,
          fractions: Sequence[float] = DEFAULT_FRACTIONS) -> dict:
    """Fit, calibrate and save; returns a summary (split sizes, calibration MAE)."""
    records = load_alpaca(data_dir)
    train_part, calibration, test = split_by_prompt(records, tuple(fractions), seed=seed)
    model = TextLengthModel.fit(train_part, seed=seed)
    points = [model.predict_tokens(r.instruction, r.generator) for r in calibration]
    truths = [r.output_tokens for r in calibration]
    bounds = {method: fit_bound(method, points, truths).to_dict() for method in METHODS}
    meta = describe_training(train_part, calibration, test, seed=seed, fractions=tuple(fractions), data_dir=data_dir)
    path = save_artifact(out, model, bounds, meta)
    return {"artifact": str(path), "train_records": len(train_part), "calibration_records": len(calibration),
            "test_records": len(test), "calibration_mae_tokens": _mae(points, truths)}


def load_learned_predictor(path: Path = DEFAULT_ARTIFACT, *, method: str = "conformal",
                           generator: str = DEFAULT_GENERATOR) -> PointBoundPredictor:
    """The serving-time predictor: the artifact's model, bounded by `method`'s calibration.
    `generator` names the model being served (one of the training generators)."""
    model, meta = load_artifact(path)
    calibration = meta.get("calibration", {})
    if method not in calibration:
        raise ArtifactError(f"artifact {path} has no {method!r} calibration (has: {sorted(calibration)}); "
                            "run `cacheopt predictor train`")
    bound = ResidualBound.from_dict(calibration[method])

    def point(request) -> float:
        if request.prompt_text is None:
            raise ValueError(f"the learned predictor needs the prompt text of request {request.request_id!r}")
        return model.predict_tokens(request.prompt_text, generator)

    return PointBoundPredictor(f"learned-{method}", point, bound)


def split_of(path: Path = DEFAULT_ARTIFACT) -> tuple[tuple[float, ...], int]:
    """(fractions, seed) of the split by prompt the artifact was trained on."""
    _, meta = load_artifact(path)
    return tuple(meta["split"]["fractions"]), meta["split"]["seed"]


def held_out_records(path: Path = DEFAULT_ARTIFACT, *, data_dir: Path = DATA_DIR) -> list[AlpacaRecord]:
    """The artifact's held-out test prompts, re-derived from the split it records."""
    fractions, seed = split_of(path)
    return split_by_prompt(load_alpaca(data_dir), fractions, seed=seed)[2]


@dataclass(frozen=True)
class CoverageRow:
    method: str  # conformal, hoeffding, no padding (point), max_tokens
    confidence: float | None
    coverage: float  # share of requests with true length <= bound
    padding_mean_tokens: float  # mean over requests of max(0, bound - true): reserved, never used
    shortfall_mean_tokens: float  # mean over requests of max(0, true - bound): to top up later


def evaluate(path: Path = DEFAULT_ARTIFACT, *, data_dir: Path = DATA_DIR, max_tokens: int = 2048) -> dict:
    """Held-out evaluation of the artifact: MAE, coverage rows, prediction cost."""
    model, meta = load_artifact(path)
    records = held_out_records(path, data_dir=data_dir)
    points = [model.predict_tokens(r.instruction, r.generator) for r in records]
    truths = [min(r.output_tokens, max_tokens) for r in records]
    rows = [_coverage_row("no padding (S3)", None, [min(max_tokens, max(1, round(p))) for p in points], truths),
            _coverage_row("max_tokens", None, [max_tokens] * len(truths), truths)]
    for method in METHODS:
        bound = ResidualBound.from_dict(meta["calibration"][method])
        for p in EVAL_CONFIDENCES:
            uppers = [_clamp(bound.upper(max(1, round(point)), p), max_tokens) for point in points]
            rows.append(_coverage_row(method, p, uppers, truths))
    return {"artifact": str(path), "test_records": len(records),
            "test_prompts": len({r.prompt_id for r in records}),
            "mae_tokens": _mae(points, truths),
            "baseline_mae_tokens": _median_baseline_mae(path, data_dir, records, max_tokens),
            "coverage": [row.__dict__ for row in rows],
            "predict_cost_us": prediction_cost_us(load_learned_predictor(path), records)}


def prediction_cost_us(predictor: PointBoundPredictor, records: Sequence[AlpacaRecord]) -> dict:
    """Wall microseconds per predict() call, tokenization included (warm tokenizer)."""
    from replicas.request import Request, Slo

    slo = Slo("chat", 3.0, 0.2)
    requests = [Request(f"r{i}", 0.0, 1, 2048, slo, prompt_text=r.instruction) for i, r in enumerate(records)]
    predictor.predict(requests[0], 0.9)  # loads the tokenizer
    times = []
    for request in requests:
        start = time.perf_counter()
        predictor.predict(request, 0.9)
        times.append((time.perf_counter() - start) * 1e6)
    times.sort()
    return {"median": times[len(times) // 2], "p99": times[min(len(times) - 1, math.ceil(0.99 * len(times)) - 1)],
            "max": times[-1], "calls": len(times)}


def evaluate_length_only(samples_train: Sequence[tuple[int, int]], samples_test: Sequence[tuple[int, int]], *,
                         max_tokens: int) -> list[dict]:
    """Coverage rows of the length-only quantile model on (prompt_tokens, output_tokens)
    pairs, for traces that carry no text (the Azure traces)."""
    from predictor.length_quantile import LengthQuantilePredictor
    from replicas.request import Request, Slo

    model = LengthQuantilePredictor.fit(samples_train)
    slo = Slo("any", 1.0, 1.0)
    requests = [Request(f"r{i}", 0.0, max(1, prompt), max_tokens, slo) for i, (prompt, _) in enumerate(samples_test)]
    truths = [min(max_tokens, max(1, out)) for _, out in samples_test]
    rows = [_coverage_row("length-only median (no padding)", None,
                          [model.predict(r, 0.5).point_tokens for r in requests], truths)]
    for p in EVAL_CONFIDENCES:
        rows.append(_coverage_row("length-only quantile", p, [model.predict(r, p).bound_tokens for r in requests],
                                  truths))
    return [row.__dict__ for row in rows]


def write_eval_report(result: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Output-length predictor: held-out evaluation", "",
        f"Artifact `{result['artifact']}`; {result['test_records']} test responses to "
        f"{result['test_prompts']} prompts that neither training nor calibration saw.", "",
        f"MAE of the point estimate: **{result['mae_tokens']:.1f} tokens** (per-generator median of the "
        f"training part: {result['baseline_mae_tokens']:.1f}).", "",
        "Padding: mean over requests of tokens reserved beyond the true length. Shortfall: mean over requests "
        "of tokens the bound missed (to be topped up).", "",
        "| bound | p | coverage | mean padding (tokens) | mean shortfall (tokens) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in result["coverage"]:
        p = "" if row["confidence"] is None else f"{row['confidence']:g}"
        lines.append(f"| {row['method']} | {p} | {row['coverage']:.1%} | {row['padding_mean_tokens']:.0f} | "
                     f"{row['shortfall_mean_tokens']:.0f} |")
    if result.get("length_only"):
        lines += ["", f"Length-only model on the Azure {result['length_only_trace']} trace (fitted on its 20% "
                      "training split, evaluated on the rest; no text, so no learned model):", "",
                  "| bound | p | coverage | mean padding (tokens) | mean shortfall (tokens) |", "|---|---:|---:|---:|---:|"]
        for row in result["length_only"]:
            p = "" if row["confidence"] is None else f"{row['confidence']:g}"
            lines.append(f"| {row['method']} | {p} | {row['coverage']:.1%} | {row['padding_mean_tokens']:.0f} | "
                         f"{row['shortfall_mean_tokens']:.0f} |")
    cost = result["predict_cost_us"]
    lines += ["", f"Prediction cost per request, tokenization included: median {cost['median']:.0f} us, "
                  f"p99 {cost['p99']:.0f} us, max {cost['max']:.0f} us over {cost['calls']} calls (goal: p99 < 1 ms).", ""]
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines))
    _plot_coverage(result, out_dir / "coverage.png")
    return path


def _plot_coverage(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0.78, 1.0], [0.78, 1.0], color="grey", linestyle=":", label="coverage = p")
    for method in METHODS:
        rows = [r for r in result["coverage"] if r["method"] == method]
        ax.plot([r["confidence"] for r in rows], [r["coverage"] for r in rows], marker="o", label=method)
    ax.set_xlabel("confidence p")
    ax.set_ylabel("held-out coverage")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110)


def _coverage_row(method: str, confidence: float | None, uppers: Sequence[int], truths: Sequence[int]) -> CoverageRow:
    n = len(truths)
    return CoverageRow(method, confidence, sum(t <= u for u, t in zip(uppers, truths)) / n,
                       sum(max(0, u - t) for u, t in zip(uppers, truths)) / n,
                       sum(max(0, t - u) for u, t in zip(uppers, truths)) / n)


def _clamp(upper: float, max_tokens: int) -> int:
    return max_tokens if math.isinf(upper) else min(max_tokens, math.ceil(upper))


def _mae(points: Sequence[float], truths: Sequence[float]) -> float:
    return sum(abs(p - t) for p, t in zip(points, truths)) / len(truths)


def _median_baseline_mae(path: Path, data_dir: Path, records: Sequence[AlpacaRecord], max_tokens: int) -> float:
    fractions, seed = split_of(path)
    train_part = split_by_prompt(load_alpaca(data_dir), fractions, seed=seed)[0]
    medians = {}
    for generator in {r.generator for r in train_part}:
        lengths = sorted(r.output_tokens for r in train_part if r.generator == generator)
        medians[generator] = lengths[len(lengths) // 2]
    overall = sorted(r.output_tokens for r in train_part)[len(train_part) // 2]
    return _mae([min(max_tokens, medians.get(r.generator, overall)) for r in records],
                [min(max_tokens, r.output_tokens) for r in records])
