"""The adapter under async scheduling, tested at the scheduler level.

The CPU platform forces synchronous scheduling, so no engine here runs async. As vLLM's own
async scheduler tests do (tests/v1/core/utils.py, Apache-2.0), the schedulers are built
directly from a VllmConfig and driven with synthetic model-runner outputs, in the order of
vLLM's EngineCore.step_with_batch_queue with two batches in flight: step N+1 is planned
before step N's output arrives. Each request "samples" token 7 until its max_tokens.
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path

import pytest
import vllm  # noqa: F401 (a missing vLLM fails collection, never skips)

from replicas.engine_settings import EngineSettings

pytestmark = pytest.mark.vllm

MODEL = Path(__file__).resolve().parents[1] / "models" / "tiny-llama"
BLOCK = 32
KV_BLOCKS = 40
ENV = {"VLLM_HOST_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
PROMPTS = [100 + 20 * i for i in range(12)]
OUTPUTS = [40 + 5 * i for i in range(12)]
SHARED = 96  # a system prompt of three blocks in front of every prompt


@pytest.fixture(scope="module", autouse=True)
def environment():
    if not (MODEL / "config.json").is_file():
        pytest.fail(f"no local model at {MODEL}: scripts/setup.sh builds it")
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def build(scheduler_cls, settings: EngineSettings | None = None, *, async_scheduling: bool = True):
    import torch
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    scheduler_config = SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=512, max_model_len=1024,
                                       enable_chunked_prefill=True, async_scheduling=async_scheduling,
                                       is_encoder_decoder=False)
    model_config = ModelConfig(model=str(MODEL), dtype="float32", seed=0, skip_tokenizer_init=True, max_model_len=1024)
    cache_config = CacheConfig(block_size=BLOCK, enable_prefix_caching=True)
    vllm_config = VllmConfig(scheduler_config=scheduler_config, model_config=model_config, cache_config=cache_config,
                             additional_config=(settings or EngineSettings()).as_additional_config())
    # The CPU platform switches async scheduling off while the config is checked; set it
    # back as a GPU platform would leave it.
    vllm_config.scheduler_config.async_scheduling = async_scheduling
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=1, dtype=torch.float32)
    kv_cache_config = KVCacheConfig(num_blocks=KV_BLOCKS, kv_cache_tensors=[],
                                    kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)])
    cache_config.num_gpu_blocks = KV_BLOCKS
    return scheduler_cls(vllm_config=vllm_config, kv_cache_config=kv_cache_config, log_stats=False,
                         structured_output_manager=StructuredOutputManager(vllm_config), block_size=BLOCK)


def requests(shared: int = SHARED):
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    hash_fn = get_hash_fn_by_name("sha256")
    init_none_hash(hash_fn)
    hasher = get_request_block_hasher(BLOCK, hash_fn)
    system = [5 + (11 * j) % 3000 for j in range(shared)]
    return [Request(request_id=f"r{i}", prompt_token_ids=system + [3 + (7 * i + j) % 4000 for j in range(n - shared)],
                    sampling_params=SamplingParams(max_tokens=out, ignore_eos=True), pooling_params=None,
                    block_hasher=hasher)
            for i, (n, out) in enumerate(zip(PROMPTS, OUTPUTS))]


def model_output(scheduler, out, sampling: set[str]):
    from vllm.v1.outputs import ModelRunnerOutput

    ids = list(out.num_scheduled_tokens)
    return ModelRunnerOutput(req_ids=ids, req_id_to_index={rid: i for i, rid in enumerate(ids)},
                             sampled_token_ids=[[7] if rid in sampling else [] for rid in ids])


def drive(scheduler, *, abort_at: dict[int, str] | None = None, max_steps: int = 5000) -> list[tuple[dict, list]]:
    """Run to completion as EngineCore.step_with_batch_queue does with a queue of two.
    Returns each step's (tokens per request, preempted ids). `abort_at`: step -> request
    aborted right after that step was scheduled (a client gone while it is in flight)."""
    from vllm.v1.request import RequestStatus

    queue: deque = deque()
    steps = []
    for _ in range(max_steps):
        if not (scheduler.has_requests() or queue):
            return steps
        if scheduler.has_requests():
            out = scheduler.schedule()
            # Which requests sample this step: those whose chunk reaches their end (vLLM's own flag).
            sampling = {rid for rid in out.num_scheduled_tokens if not scheduler.requests[rid].is_prefill_chunk}
            queue.appendleft((out, sampling))
            steps.append((dict(out.num_scheduled_tokens), sorted(out.preempted_req_ids)))
            if abort_at and len(steps) - 1 in abort_at:
                scheduler.finish_requests([abort_at[len(steps) - 1]], RequestStatus.FINISHED_ABORTED)
            if len(queue) < 2 and (out.total_num_scheduled_tokens > 0 or scheduler.has_requests()):
                continue
        if queue:
            out, sampling = queue.pop()
            scheduler.update_from_output(out, model_output(scheduler, out, sampling))
    raise AssertionError("did not finish")


def test_the_adapter_becomes_async_where_vllm_schedules_asynchronously():
    from replicas.vllm_adapter import AsyncCacheOptScheduler, AsyncStepLogScheduler, CacheOptScheduler, StepLogScheduler

    adapter = build(CacheOptScheduler)
    assert type(adapter) is AsyncCacheOptScheduler and adapter.core.async_steps
    synchronous = build(CacheOptScheduler, async_scheduling=False)
    assert type(synchronous) is CacheOptScheduler and not synchronous.core.async_steps
    assert type(build(StepLogScheduler)) is AsyncStepLogScheduler  # the native baseline keeps vLLM's default too
    assert type(build(StepLogScheduler, async_scheduling=False)) is StepLogScheduler


@pytest.mark.parametrize("shared", [0, SHARED])
def test_vllm_policy_through_the_async_adapter_decides_exactly_as_vllms_async_scheduler(shared):
    """Step for step, under KV pressure (preemptions) and prefix caching; tolerance none.
    The books are checked after every schedule() and update_from_output()."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    from replicas.vllm_adapter import CacheOptScheduler

    native = build(AsyncScheduler)
    adapter = build(CacheOptScheduler, EngineSettings(policy="vllm", check_invariants=True))
    for scheduler in (native, adapter):
        for request in requests(shared):
            scheduler.add_request(request)
    expected = drive(native)
    assert sum(len(p) for _, p in expected) > 0  # the comparison covers preemptions
    assert drive(adapter) == expected
    assert adapter.num_invariant_checks == 2 * len(expected)
    assert not adapter.core.requests and adapter.core.ledger.held_total == 0
    if shared:
        assert adapter.core.counters["prefix_hit_tokens"] > 0


@pytest.mark.parametrize("policy", ["cacheopt", "edf"])
def test_async_adapter_keeps_the_books_with_aborts_in_flight(policy):
    """Aborts while a step is in flight, shared prefixes, under-predicted bounds: every
    request either finishes with all its tokens or is aborted, and the books agree at
    every step."""
    from replicas.vllm_adapter import CacheOptScheduler

    adapter = build(CacheOptScheduler, EngineSettings(policy=policy, check_invariants=True))
    batch = requests()
    for request in batch:
        request.sampling_params.extra_args = {"cacheopt_point_tokens": 8, "cacheopt_bound_tokens": 16,
                                              "cacheopt_slo": "batch"}
        adapter.add_request(request)
    steps = drive(adapter, abort_at={3: "r1", 10: "r5", 40: "r11"})
    assert adapter.num_invariant_checks == 2 * len(steps)
    assert adapter.core.counters["abort"] == 3
    assert sum(len(p) for _, p in steps) > 0
    assert not adapter.core.requests and adapter.core.ledger.held_total == 0
    assert adapter.kv_cache_manager.block_pool.get_num_free_blocks() == KV_BLOCKS - 1
