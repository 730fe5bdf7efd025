"""The `cacheopt` command.

    cacheopt sim     rate sweep of scheduling policies on the simulated engine, with a report
    cacheopt speed   the simulator's and the policies' own speed
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_RATES = "6,8,10,11,12,13,14,15,16,17,18"


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _option(text: str) -> tuple[str, object]:
    """NAME=VALUE with VALUE read as a bool, int or float where it looks like one."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--cacheopt-option takes NAME=VALUE, got {text!r}")
    if value.lower() in ("true", "false"):
        return name, value.lower() == "true"
    for kind in (int, float):
        try:
            return name, kind(value)
        except ValueError:
            pass
    raise ValueError(f"--cacheopt-option {name}: {value!r} is not a number or true/false")


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    from replicas.latency import LATENCY_MODELS
    from replicas.policies import POLICY_NAMES

    parser = argparse.ArgumentParser(prog="cacheopt", description="CacheOPT serving: simulator and benchmarks.")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("sim", help="sweep arrival rates over policies on the simulated engine",
                         description="Replay a real trace at several arrival rates for each policy on the "
                                     "simulated engine; write results.csv/json, summary.md and plots.")
    sim.add_argument("--trace", default="conv", choices=["conv", "code"], help="Azure LLM 2023 trace (default conv)")
    sim.add_argument("--policies", type=_names, default=",".join(POLICY_NAMES),
                     help="comma-separated policies (default: %(default)s)")
    sim.add_argument("--ablation", action="store_true",
                     help="add CacheOPT with each mechanism switched off (cacheopt-no_<mechanism>)")
    sim.add_argument("--rates", type=_floats, default=DEFAULT_RATES, help="arrival rates in req/s (default %(default)s)")
    sim.add_argument("--seeds", type=_ints, default="0",
                     help="repeats: each seed re-draws the predictor's training split and the SLO classes")
    sim.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    sim.add_argument("--replay", choices=["test", "train"], default="test",
                     help="which split to replay: test for results, train to choose parameters (default test)")
    sim.add_argument("--latency-model", default="llama3-8b-h100", choices=sorted(LATENCY_MODELS))
    sim.add_argument("--kv-blocks", type=int, default=4096,
                     help="KV cache blocks per replica, forcing KV pressure like vLLM's num_gpu_blocks_override; "
                          "0 sizes it from GPU memory (default %(default)s)")
    sim.add_argument("--block-size", type=int, default=16)
    sim.add_argument("--max-num-batched-tokens", type=int, default=8192,
                     help="per-step token budget of chunked prefill, vLLM's option (default %(default)s)")
    sim.add_argument("--max-tokens", type=int, default=1024, help="per-request output cap (default %(default)s)")
    sim.add_argument("--confidence", type=float, default=None, help="CacheOPT's confidence p (default 0.7)")
    sim.add_argument("--cacheopt-option", action="append", default=[], metavar="NAME=VALUE",
                     help="set any CacheOptConfig field, e.g. reserve_fraction=0.02 (repeatable)")
    sim.add_argument("--jobs", type=int, default=None, help="parallel processes (default: CPU count)")
    sim.add_argument("--out", type=Path, default=None, help="report folder (default reports/sim-<trace>-<model>)")
    sim.add_argument("--no-progress", action="store_true", help="no progress bar")

    speed = sub.add_parser("speed", help="measure the simulator's and the policies' own speed",
                           description="Time the full conversation trace for one policy at one rate, and "
                                       "microseconds per scheduling step at several running-request counts.")
    speed.add_argument("--policy", default="cacheopt")
    speed.add_argument("--rate", type=float, default=6.0)
    speed.add_argument("--running", type=_ints, default="64,256,1024")
    speed.add_argument("--out", type=Path, default=Path("reports/speed.md"))
    return parser


def cmd_sim(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from bench.report import knee_rate, write_report
    from bench.simulate import SimSetup
    from bench.sweep import SweepSpec, knee_samples, run_sweep
    from replicas.config import CacheOptConfig, SchedulerConfig, config_from_mapping
    from replicas.policies import ABLATION_NAMES

    policies = args.policies + (tuple(p for p in ABLATION_NAMES if p not in args.policies) if args.ablation else ())
    options = dict(_option(text) for text in args.cacheopt_option)
    if args.confidence is not None:
        options["confidence"] = args.confidence
    cacheopt = config_from_mapping(CacheOptConfig, options)
    setup = SimSetup(latency_model=args.latency_model, kv_blocks=args.kv_blocks or None,
                     max_tokens=args.max_tokens,
                     scheduler=SchedulerConfig(block_size=args.block_size,
                                               max_num_batched_tokens=args.max_num_batched_tokens),
                     cacheopt=cacheopt)
    spec = SweepSpec(trace=args.trace, policies=policies, rates=args.rates, seeds=args.seeds, limit=args.limit,
                     replay=args.replay, setup=setup)
    out = args.out or Path("reports") / f"sim-{args.trace}-{args.latency_model}"
    total = len(spec.policies) * len(spec.rates) * len(spec.seeds)
    print(f"simulating {total} runs: {len(spec.policies)} policies x {len(spec.rates)} rates x "
          f"{len(spec.seeds)} seeds, {setup.total_blocks()} KV blocks of {args.block_size} tokens")
    with tqdm(total=total, unit="run", disable=args.no_progress) as bar:
        def done(output):
            bar.set_postfix_str(f"{output.row['policy']} @ {output.row['rate_rps']:g}")
            bar.update()
        outputs = run_sweep(spec, jobs=args.jobs, on_done=done)
    rows = [o.row for o in outputs]
    baseline = "vllm" if "vllm" in spec.policies else spec.policies[0]
    knee = knee_rate(rows, baseline)
    samples = knee_samples(outputs, knee, spec.seeds[0]) if knee is not None else None
    setup_md = (f"## Setup\n\nTrace `{args.trace}` (Azure LLM inference 2023, {args.replay} split; the length "
                f"predictor is fitted on the {spec.train_fraction:.0%} train split), latency model `{args.latency_model}`, "
                f"{setup.total_blocks()} KV blocks of {args.block_size} tokens, max_tokens {args.max_tokens}, "
                f"max_num_batched_tokens {args.max_num_batched_tokens}, "
                f"CacheOPT {cacheopt}. Command: `cacheopt {' '.join(sys.argv[1:])}`")
    summary = write_report(out, rows, baseline=baseline, title=f"Simulated sweep: {args.trace} trace on "
                           f"{args.latency_model}", cdf_samples=samples, extra_markdown=setup_md)
    print(f"report: {summary}")
    return 0


def cmd_speed(args: argparse.Namespace) -> int:
    from bench.speed import write_speed_report

    path = write_speed_report(args.out, policy=args.policy, rate=args.rate, running_counts=args.running)
    print(path.read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return {"sim": cmd_sim, "speed": cmd_speed}[args.command](args)
    except ValueError as error:
        print(f"cacheopt {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
