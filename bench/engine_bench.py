"""`cacheopt bench --engine vllm`: one real trace, several rates, each scheduler on its own
real engine, side by side; plus the simulator on the same requests for fidelity.

Policy `vllm` is vLLM's own scheduler (timed by `StepLogScheduler`); any other policy
name runs in vLLM through the adapter (`CacheOptScheduler`). Every engine gets the same
forced KV pressure, the same token budget and the same requests (lengths divided by
`length_divisor` to suit the small model's context, outputs capped at `max_tokens`).
SLO classes are the usual multiples (bench/slo.py) of this engine's calibrated unloaded
per-token latency.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.engine import (
    ADAPTER_CLS,
    NATIVE_CLS,
    EngineConfig,
    outcomes_of,
    read_step_log,
    replay,
    run_stats,
    start_async_engine,
    stop_engine,
)
from bench.metrics import summarize
from bench.simulate import SimSetup, simulate
from bench.traces import NAMED_TRACES, TraceRequest, load_trace, scale_to_rate, scale_tokens, split_train_test
from predictor.length_quantile import LengthQuantilePredictor
from replicas.engine_settings import EngineSettings
from replicas.latency import get_latency_model
from replicas.policies import SIMULATOR_ONLY, check_policy_names
from replicas.slo import scaled_slo_classes

LATENCY_MODEL = "tiny-llama-cpu"
# Fidelity compares these, simulated against measured.
FIDELITY_METRICS = ("ttft_p50_s", "ttft_p95_s", "itl_p50_s", "itl_p95_s", "max_gap_p95_s", "preemptions_per_1k")


@dataclass(frozen=True)
class EngineBenchSpec:
    trace: str = "conv"
    policies: tuple[str, ...] = ("vllm", "cacheopt")
    rates: tuple[float, ...] = (4.0, 8.0, 12.0, 16.0)
    limit: int = 400  # requests per run, the first of the replayed split
    replay: str = "test"  # test for results; train to choose parameters
    length_divisor: float = 4.0
    max_tokens: int = 256  # the client's cap, after the division
    seed: int = 0
    repeats: int = 1  # the same requests again: the spread is the engine's own noise
    warmup: int = 50  # requests replayed on each engine before the first measured run (not reported)
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(kv_blocks=128))

    def __post_init__(self) -> None:
        check_policy_names(self.policies)
        if not self.policies or not self.rates:
            raise ValueError("a benchmark needs at least one policy and one rate")
        if any(not (r > 0 and math.isfinite(r)) for r in self.rates):
            raise ValueError(f"rates must be positive req/s, got {list(self.rates)}")
        if self.repeats < 1:
            raise ValueError(f"repeats={self.repeats} must be >= 1")
        if self.limit < 2:
            raise ValueError(f"limit={self.limit} must be >= 2 (a rate needs two arrivals)")
        if not 0 <= self.warmup <= self.limit:
            raise ValueError(f"warmup={self.warmup} must lie in [0, limit={self.limit}]")
        if not self.length_divisor > 0:
            raise ValueError(f"length_divisor={self.length_divisor} must be > 0")
        if not 1 <= self.max_tokens < self.engine.max_model_len:
            raise ValueError(f"max_tokens={self.max_tokens} must lie in [1, max_model_len={self.engine.max_model_len})")
        if self.trace not in NAMED_TRACES and not Path(self.trace).is_file():
            raise ValueError(f"trace={self.trace!r} is neither one of {', '.join(NAMED_TRACES)} nor a file")
        if self.engine.kv_blocks is None:
            raise ValueError("the benchmark forces KV pressure: give the engine a kv_blocks count")
        for name in self.policies:
            if name in SIMULATOR_ONLY:
                raise ValueError(f"policy {name!r} needs true output lengths, which a real engine does not reveal")


def workload(spec: EngineBenchSpec) -> tuple[list[TraceRequest], LengthQuantilePredictor, dict]:
    """The replayed requests, the length predictor fitted on the training split (scaled
    the same way), and the SLO classes."""
    unit_s = get_latency_model(LATENCY_MODEL).iteration_time_s(1, 1, 256)
    classes = scaled_slo_classes(unit_s)
    train, test = split_train_test(load_trace(spec.trace, seed=spec.seed, slo_classes=classes), seed=spec.seed)
    context = spec.engine.max_model_len

    def prepare(requests: Sequence[TraceRequest]) -> list[TraceRequest]:
        scaled = scale_tokens(requests, spec.length_divisor, max_context=context)
        return [dataclasses.replace(r, output_tokens=min(r.output_tokens, spec.max_tokens)) for r in scaled]

    predictor = LengthQuantilePredictor.fit((r.prompt_tokens, r.output_tokens, r.slo.name) for r in prepare(train))
    return prepare((train if spec.replay == "train" else test)[:spec.limit]), predictor, classes


def settings_for(policy: str, predictor_path: Path, classes: dict, step_log: Path) -> EngineSettings:
    return EngineSettings(policy=policy, predictor_path=str(predictor_path), latency_model=LATENCY_MODEL,
                          slo_classes={n: (s.ttft_s, s.tbt_s) for n, s in classes.items()},
                          default_slo="chat", step_log=str(step_log))


def sim_setup(spec: EngineBenchSpec) -> SimSetup:
    return SimSetup(engine=spec.engine.with_(latency_model=LATENCY_MODEL), policy_latency_model=LATENCY_MODEL,
                    max_tokens=spec.max_tokens, can_swap=False)


def run_engine_bench(spec: EngineBenchSpec, out_dir: Path, *,
                     on_progress: Callable[[str], None] | None = None,
                     on_request: Callable[[], None] | None = None) -> tuple[list[dict], list[dict], dict]:
    """Engine rows (one per policy, rate and repeat), simulator rows (one per policy and
    rate), and {"schedule_s": {policy: [seconds per schedule() call]}, "calibration": the
    in-run fit (calibrate_from_steps) or None}.

    Every policy gets its own engine, all started before the first measured run and each
    warmed up with `warmup` requests; then the runs are interleaved: for each repeat and
    rate, every policy once, in an order rotated by repeat, so that a drift of the machine
    (another process, thermal state) lands on every policy alike. Each run starts from an
    empty prefix cache, as the simulated side does. The simulated side uses
    a latency model fitted in this run to vLLM's own steps (when `vllm` is among the
    policies), so it does not depend on the machine the shipped fit came from."""
    out_dir.mkdir(parents=True, exist_ok=True)
    trace, predictor, classes = workload(spec)
    predictor_path = (out_dir / "predictor.json").resolve()
    predictor.save(predictor_path)
    vocab = json.loads((spec.engine.model_dir / "config.json").read_text())["vocab_size"]
    engine_rows: list[dict] = []
    schedule_s: dict[str, list[float]] = {policy: [] for policy in spec.policies}
    logs = {policy: (out_dir / f"steps-{policy}.jsonl").resolve() for policy in spec.policies}
    native_steps: list[dict] = []

    async def run_all() -> None:
        engines = {}
        try:
            for policy in spec.policies:
                if on_progress:
                    on_progress(f"starting and warming up the engine for {policy}")
                logs[policy].unlink(missing_ok=True)
                settings = settings_for(policy, predictor_path, classes, logs[policy])
                engines[policy] = start_async_engine(spec.engine, NATIVE_CLS if policy == "vllm" else ADAPTER_CLS,
                                                     settings)
                if spec.warmup:
                    await replay(engines[policy], scale_to_rate(trace[:spec.warmup], spec.rates[0]),
                                 max_tokens_cap=spec.max_tokens, vocab_size=vocab)
            for repeat in range(spec.repeats):
                for rate in spec.rates:
                    shift = repeat % len(spec.policies)
                    for policy in spec.policies[shift:] + spec.policies[:shift]:
                        if on_progress:
                            on_progress(f"{policy} @ {rate:g} req/s (repeat {repeat})")
                        requests = scale_to_rate(trace, rate)
                        if spec.engine.prefix_caching and not await engines[policy].reset_prefix_cache():
                            raise RuntimeError(f"{policy}: vLLM kept its prefix cache (blocks still in use)")
                        streams, start = await replay(engines[policy], requests, max_tokens_cap=spec.max_tokens,
                                                      vocab_size=vocab, on_finish=on_request)
                        end = max((s.token_times[-1] for s in streams if s.token_times), default=start) + 1.0
                        await asyncio.sleep(0.2)  # the engine flushes its step log when it goes idle
                        steps = read_step_log(logs[policy], start, end)
                        if policy == "vllm":
                            native_steps.extend(steps)
                        schedule_s[policy] += [row["schedule_s"] for row in steps]
                        stats = run_stats(streams, steps, start, spec.engine.kv_blocks)
                        engine_rows.append({"policy": policy, "rate_rps": rate, "repeat": repeat,
                                            **summarize(outcomes_of(streams, steps), stats),
                                            "schedule_us_mean": 1e6 * _mean([r["schedule_s"] for r in steps])})
        finally:
            for engine in engines.values():
                stop_engine(engine)

    asyncio.run(run_all())
    gc.collect()
    setup = sim_setup(spec)
    calibration = calibrate_from_steps(native_steps, out_dir)
    if calibration is not None:
        setup = dataclasses.replace(setup, latency_model=str(calibration["path"]))
    sim_rows = []
    for policy in spec.policies:
        for rate in spec.rates:
            result = simulate(scale_to_rate(trace, rate), policy, setup, predictor)
            sim_rows.append({"policy": policy, "rate_rps": rate, "repeat": 0, **summarize(result.outcomes, result.stats)})
    return engine_rows, sim_rows, {"schedule_s": schedule_s, "calibration": calibration}


def calibrate_from_steps(steps: Sequence[dict], out_dir: Path) -> dict | None:
    """Fit the step-time model to vLLM's own busy steps of this run and say how far the
    shipped fit (`tiny-llama-cpu`, fitted on another machine) is from them. None when
    there are too few steps (vLLM's scheduler was not in the run)."""
    from bench.calibrate import fit_errors, fit_linear, step_periods

    samples = step_periods(sorted(steps, key=lambda row: row["t"]))
    try:
        fitted = fit_linear(samples, name="tiny-llama-cpu-this-run", source="vLLM's steps in this engine benchmark",
                            stalls=True)
    except ValueError:
        return None
    path = out_dir / "latency-this-run.json"
    path.write_text(json.dumps(fitted.to_dict(), indent=1))
    return {"path": path.resolve(), "fitted": fit_errors(fitted, samples),
            "shipped": fit_errors(get_latency_model(LATENCY_MODEL), samples)}


def describe_calibration(calibration: dict | None) -> tuple[str, str | None]:
    """What the simulated side ran on, for the report, and a warning when the shipped fit
    is off for this machine (median step 30% off, or total time 15% off), else None."""
    if calibration is None:
        return ("the shipped `tiny-llama-cpu` fit (vLLM's own scheduler was not in the run, so there was nothing "
                "to calibrate on)"), None
    shipped, fitted = calibration["shipped"], calibration["fitted"]
    note = (f"a fit to vLLM's own {fitted['steps']:.0f} busy steps of this run (`{calibration['path'].name}`; "
            f"median error {fitted['median_abs_rel_error']:.0%}). The shipped `tiny-llama-cpu` fit is off by "
            f"{shipped['median_abs_rel_error']:.0%} at the median step here, total time x "
            f"{shipped['total_time_ratio']:.2f}")
    if shipped["median_abs_rel_error"] <= 0.3 and abs(shipped["total_time_ratio"] - 1) <= 0.15:
        return note, None
    return note, (f"the shipped tiny-llama-cpu latency fit is off on this machine (median step error "
                  f"{shipped['median_abs_rel_error']:.0%}, total time x {shipped['total_time_ratio']:.2f}); the "
                  "simulated side used this run's own fit; `cacheopt calibrate` refits the shipped one")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def fidelity_table(engine_rows: Sequence[dict], sim_rows: Sequence[dict]) -> tuple[str, float]:
    """Markdown: measured (mean over repeats) against simulated for each latency statistic
    and preemptions per 1k requests, with simulated / measured; and the share of latency
    cells within 15%."""
    sim = {(r["policy"], r["rate_rps"]): r for r in sim_rows}
    measured_runs: dict[tuple, list[dict]] = {}
    for row in engine_rows:
        measured_runs.setdefault((row["policy"], row["rate_rps"]), []).append(row)
    header = ["policy", "rate"] + [f"{m} meas / sim" for m in FIDELITY_METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    within = total = 0
    for (policy, rate), runs in measured_runs.items():
        cells = [policy, f"{rate:g}"]
        for m in FIDELITY_METRICS:
            measured, simulated = _mean([r[m] for r in runs]), sim[(policy, rate)][m]
            ratio = simulated / measured if measured > 0 else math.nan
            if m.endswith("_s"):
                total += 1
                within += abs(ratio - 1) <= 0.15
                cells.append(f"{measured * 1e3:.0f} / {simulated * 1e3:.0f} ms ({ratio:.2f})")
            else:
                cells.append(f"{measured:.0f} / {simulated:.0f} ({ratio:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), within / total if total else math.nan


def overhead_table(schedule_s: dict[str, list[float]]) -> str:
    lines = ["| scheduler | schedule() calls | mean (µs) | p50 (µs) | p95 (µs) |", "|---|---|---|---|---|"]
    for policy, values in schedule_s.items():
        ordered = sorted(values)
        if not ordered:
            continue
        p50, p95 = (ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in (0.5, 0.95))
        lines.append(f"| {policy} | {len(values)} | {1e6 * _mean(values):.0f} | {1e6 * p50:.0f} | {1e6 * p95:.0f} |")
    return "\n".join(lines)
