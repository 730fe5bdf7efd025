"""The code's own speed: a whole trace through the simulator, and the cost of one
scheduling step as the number of running requests grows (it must stay near-linear)."""

from __future__ import annotations

import time
from pathlib import Path

from bench.simulate import SimSetup, simulate
from bench.traces import load_azure_trace, scale_to_rate
from predictor.length_quantile import LengthQuantilePredictor
from replicas.config import SchedulerConfig
from replicas.engines.config import LLAMA3_8B_H100
from replicas.policies import make_policy
from replicas.request import Request
from replicas.scheduler import build_scheduler
from replicas.slo import SLO_CLASSES


def full_trace_seconds(policy: str, rate: float) -> tuple[float, int, int]:
    """Wall seconds to simulate the whole conv trace (predictor fitted on all of it)."""
    trace = load_azure_trace("conv")
    predictor = LengthQuantilePredictor.fit((r.prompt_tokens, r.output_tokens) for r in trace)
    result = simulate(scale_to_rate(trace, rate), policy, SimSetup(engine=LLAMA3_8B_H100.with_(kv_blocks=4096)), predictor)
    return result.wall_s, len(trace), result.num_steps


def step_microseconds(policy: str, num_running: int, *, num_steps: int = 300, num_waiting: int = 0) -> float:
    """Mean wall microseconds of schedule() + on_step_done() with `num_running` decoding
    requests (KV large enough that nobody is preempted; the policy still does its checks),
    and `num_waiting` requests that never fit, so that every step also tries admission."""
    prompt, block_size = 512, 16
    predictor = LengthQuantilePredictor.fit([(prompt, n) for n in range(50, 700)])
    total_blocks = num_running * ((prompt + 2048) // block_size + 1)  # + a block of rounding each
    scheduler = build_scheduler(
        make_policy(policy, predictor=predictor),
        total_blocks=total_blocks,
        config=SchedulerConfig(block_size=block_size, max_num_seqs=num_running,
                               max_num_batched_tokens=max(8192, num_running * prompt)))
    for i in range(num_running):
        scheduler.add_request(Request(f"r{i}", 0.0, prompt, 2048, SLO_CLASSES["chat"], true_output_tokens=2000), 0.0)

    def never_finished(_request):
        return False

    now = 0.0
    plan = scheduler.schedule(now)  # prefill everyone
    scheduler.on_step_done(plan, now + 0.01, 0.01, never_finished)
    if len(scheduler.running) != num_running:
        raise AssertionError(f"only {len(scheduler.running)} of {num_running} admitted")
    too_big = total_blocks * block_size  # more than the whole cache: refused at every step
    for i in range(num_waiting):
        scheduler.add_request(Request(f"w{i}", now, too_big, 16, SLO_CLASSES["batch"], true_output_tokens=16), now)
    started = time.perf_counter()
    for _ in range(num_steps):
        now += 0.01
        plan = scheduler.schedule(now)
        scheduler.on_step_done(plan, now + 0.01, 0.01, never_finished)
    return (time.perf_counter() - started) / num_steps * 1e6


def write_speed_report(path: Path, *, policy: str, rate: float, running_counts: tuple[int, ...]) -> Path:
    wall_s, num_requests, num_steps = full_trace_seconds(policy, rate)
    lines = [
        "# Simulator and policy speed",
        "",
        f"Full Azure conv trace ({num_requests} requests) at {rate:g} req/s with `{policy}`, "
        f"4096 KV blocks: **{wall_s:.2f} s** wall for {num_steps} engine steps (goal: <= 10 s).",
        "",
        "Microseconds per scheduling step (schedule + progress update), all requests decoding, "
        "with no waiting queue and with 64 waiting requests that never fit (admission is tried "
        "every step):",
        "",
        "| running | waiting | " + " | ".join(f"`{p}` us/step (us/request)" for p in ("vllm", policy))
        + f" | `{policy}` / `vllm` |",
        "|---:|---:|" + "---:|" * 3,
    ]
    for waiting in (0, 64):
        for n in running_counts:
            cells = []
            times = [step_microseconds(p, n, num_waiting=waiting) for p in ("vllm", policy)]
            cells = [f"{us:,.0f} ({us / n:.2f})" for us in times]
            lines.append(f"| {n} | {waiting} | " + " | ".join(cells) + f" | {times[1] / times[0]:.2f}x |")
    lines += ["", "Near-linear means the per-request column stays roughly flat as `running` grows.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path
