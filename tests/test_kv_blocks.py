"""Prefix caching in the core: the pool model, charges of shared blocks, and what the
scheduler and ledger make of them (replicas/kv_blocks.py)."""

import pytest
from factories import LOOSE, TIGHT, finished_at_true_length, make_request, make_scheduler, run_step

from bench.traces import TraceRequest, scale_tokens
from replicas.kv_blocks import BlockTables, SimBlockPool
from replicas.request import Request

SYSTEM = tuple(("system", i) for i in range(8))  # a 32-token system prompt in blocks of 4


def prefill_all(s, now=0.0):
    """Step until every request has its first token."""
    while s.waiting or any(r.num_output_tokens == 0 for r in s.running):
        run_step(s, now)
        s.check_blocks()


def test_block_tables_charge_each_block_once_and_pass_it_on():
    tables = BlockTables()
    tables.extend("a", [1, 2, 3])
    tables.extend("b", [1, 2])
    tables.extend("b", [7])
    assert tables.tables["b"] == [1, 2, 7]
    assert tables.charged == {"a": 3, "b": 1} and tables.num_in_use == 4
    assert tables.num_held_by_others([1, 2, 9]) == 2
    assert tables.drop("a") == {"b": 2}
    assert tables.charged == {"b": 3} and tables.num_in_use == 3
    with pytest.raises(AssertionError, match="twice"):
        tables.extend("b", [2])


def test_pool_hits_whole_blocks_and_stops_short_of_the_last_token():
    pool = SimBlockPool(16, 4)
    a = make_request(prompt=32, prefix_keys=SYSTEM, rid="a")
    pool.allocate(a, [], 32)
    b = make_request(prompt=32, prefix_keys=SYSTEM, rid="b")
    assert len(pool.lookup(b)) == 7  # 8 blocks cached, but the last token is always computed
    c = make_request(prompt=40, prefix_keys=SYSTEM, rid="c")
    assert len(pool.lookup(c)) == 8
    assert pool.lookup(make_request(prompt=32, rid="d")) == []


def test_freed_blocks_stay_cached_until_their_space_is_needed_tail_first():
    pool = SimBlockPool(4, 4)
    first = make_request(prompt=8, prefix_keys=(("x", 0), ("x", 1)), rid="first")
    pool.allocate(first, [], 8)
    pool.free(first, preempted=False)
    assert pool.num_free == 4
    again = make_request(prompt=9, prefix_keys=(("x", 0), ("x", 1)), rid="again")
    assert len(pool.lookup(again)) == 2  # still cached
    other = make_request(prompt=12, rid="other")  # needs 3 of the 4 blocks: 2 never used first, then 1 cached
    pool.allocate(other, [], 12)
    assert len(pool.lookup(again)) == 1  # a request's blocks are freed tail first: the tail went
    pool.allocate(make_request(prompt=4, rid="last"), [], 4)
    assert pool.lookup(again) == [] and pool.num_free == 0


def test_a_shared_prefix_is_charged_once_and_counts_as_computed():
    s = make_scheduler("vllm", total_blocks=64, block_size=4, prefix_caching=True)
    a = make_request(prompt=36, output=20, prefix_keys=SYSTEM, slo=LOOSE)
    s.add_request(a, 0.0)
    prefill_all(s)
    b = make_request(prompt=40, output=20, prefix_keys=SYSTEM, slo=LOOSE)
    s.add_request(b, 0.0)
    plan = run_step(s)
    assert plan.scheduled[b] == 40 - 32  # only the uncached part is computed
    assert b.num_shared_blocks == 8
    assert s.ledger.shares[b.request_id].held == 2  # 10 blocks in its table, 8 of them a's
    assert s.counters["prefix_hit_tokens"] == 32
    assert s.pool.num_free == 64 - s.ledger.held_total
    s.check_blocks()


def test_when_the_first_holder_leaves_the_next_one_is_charged():
    s = make_scheduler("cacheopt", total_blocks=64, block_size=4, prefix_caching=True)
    a = make_request(prompt=36, output=2, prefix_keys=SYSTEM, slo=LOOSE)
    b = make_request(prompt=40, output=30, prefix_keys=SYSTEM, slo=LOOSE)
    s.add_request(a, 0.0)
    prefill_all(s)
    s.add_request(b, 0.0)
    while a.finish_s is None:
        run_step(s)
        s.check_blocks()
    assert b.num_shared_blocks == 0
    assert s.ledger.shares[b.request_id].held == len(s.tables.tables[b.request_id])
    assert s.pool.num_free == 64 - s.ledger.held_total


def test_a_recomputed_request_hits_its_own_cached_blocks():
    """vLLM with prefix caching: a preempted request's blocks stay cached while nobody
    needs their space, so its recompute starts from them."""
    s = make_scheduler("vllm", total_blocks=20, block_size=4, budget=64, prefix_caching=True)
    requests = [make_request(prompt=30, output=30, slo=LOOSE) for _ in range(2)]
    for r in requests:
        s.add_request(r, 0.0)
    now = 0.0
    while s.has_work:
        plan = s.schedule(now)
        now += 0.01
        s.on_step_done(plan, now, 0.01, finished_at_true_length)
        s.ledger.check_invariants()
        s.check_blocks()
    assert s.counters["preempt_recompute"] > 0
    assert s.counters["prefix_hit_tokens"] > 0
    assert all(r.num_output_tokens == 30 for r in requests)


def test_trace_hash_ids_become_block_keys_at_any_block_size():
    r = TraceRequest("t-0", 0.0, 40, 5, LOOSE, hash_ids=(7, 8, 9), hash_block_tokens=16)
    assert r.prefix_keys(8) == ((7, 7), (7, 15), (8, 7), (8, 15), (9, 7))  # 40 tokens: the last block is full
    assert r.prefix_keys(32) == ((8, 15),)
    other = TraceRequest("t-1", 0.0, 40, 5, LOOSE, hash_ids=(7, 8, 10), hash_block_tokens=16)
    assert other.prefix_keys(8)[:4] == r.prefix_keys(8)[:4] and other.prefix_keys(8)[4] != r.prefix_keys(8)[4]
    assert TraceRequest("t-2", 0.0, 40, 5, LOOSE).prefix_keys(8) is None
    halved = scale_tokens([r], 2.0)[0]
    assert (halved.prompt_tokens, halved.hash_block_tokens) == (20, 8)
    assert halved.prefix_keys(4)[:2] == ((7, 3), (7, 7))


def test_simulated_shared_prefixes_save_prefill_and_free_blocks():
    from bench.simulate import SimSetup, simulate
    from replicas.engines.config import LLAMA3_8B_H100

    trace = [TraceRequest(f"s-{i}", 0.05 * i, 600, 20, LOOSE, hash_ids=(100, 101, 102, 1000 + i),
                          hash_block_tokens=160) for i in range(40)]
    results = {}
    for caching in (False, True):
        setup = SimSetup(engine=LLAMA3_8B_H100.with_(kv_blocks=1024, prefix_caching=caching, block_size=16),
                         check_invariants=True)
        results[caching] = simulate(trace, "vllm", setup, predictor=None)
    on, off = results[True], results[False]
    assert on.stats.counters["prefix_hit_tokens"] >= 39 * 480
    assert "prefix_hit_tokens" not in off.stats.counters
    mean_ttft = {k: sum(o.first_token_s - o.arrival_s for o in r.outcomes) / len(r.outcomes) for k, r in results.items()}
    assert mean_ttft[True] < mean_ttft[False]


def test_request_without_keys_is_unique_to_itself():
    r = Request("x", 0.0, 10, 5, LOOSE)
    pool = SimBlockPool(8, 4)
    pool.allocate(r, [], 10)
    assert pool.lookup(Request("y", 0.0, 10, 5, LOOSE)) == []


def test_a_key_computed_twice_stays_findable_while_one_of_its_blocks_is_cached():
    """vLLM keeps every block of a key (BlockHashToBlockMap): evicting one leaves the other."""
    pool = SimBlockPool(6, 4)
    keys = (("k", 0), ("k", 1))
    first = make_request(prompt=9, prefix_keys=keys, rid="first")
    second = make_request(prompt=9, prefix_keys=keys, rid="second")
    pool.allocate(first, [], 9)
    pool.allocate(second, [], 9)  # computed the same prefix itself (it was not looked up)
    pool.free(first, preempted=False)
    pool.allocate(make_request(prompt=8, rid="filler"), [], 8)  # the 1 free block, then first's two
    assert len(pool.lookup(make_request(prompt=9, prefix_keys=keys, rid="third"))) == 2  # second's


def test_a_critical_admission_never_preempts_the_holder_of_its_own_prefix():
    """Preempting the only other holder of the newcomer's hit blocks would free nothing it
    can use (and the newcomer would owe blocks it was promised free): EDF's critical
    admission picks another victim or none."""
    s = make_scheduler("edf", total_blocks=16, block_size=4, prefix_caching=True, critical_admission=True)
    keys = tuple(("p", i) for i in range(10))
    holder = make_request(prompt=40, output=50, slo=LOOSE, prefix_keys=keys, rid="holder")
    tight = make_request(prompt=17, output=50, slo=TIGHT, rid="tight")
    s.add_request(holder, 0.0)
    s.add_request(tight, 0.0)
    plan = s.schedule(0.0)
    s.on_step_done(plan, 0.01, 0.6, lambda r: False)  # a slow step: a waiting tight request turns critical
    newcomer = make_request(prompt=60, output=5, slo=TIGHT, prefix_keys=keys + tuple(("n", i) for i in range(5)),
                            arrival_s=-0.49, rid="newcomer")
    s.add_request(newcomer, 0.01)
    plan = s.schedule(0.01)
    assert s.policy._is_critical(newcomer) and not plan.preempted and newcomer not in plan.scheduled
    s.ledger.check_invariants()
    s.check_blocks()


@pytest.mark.parametrize("policy", ["edf", "cacheopt"])
def test_skipping_hopeless_lookups_changes_no_decision(policy, monkeypatch):
    """A policy may refuse before the prefix lookup only what it would refuse after it:
    shared-prefix sessions under KV pressure, with and without the shortcut."""
    from bench.sessions import SessionWorkload, session_trace
    from bench.simulate import SimSetup, simulate
    from bench.traces import scale_to_rate
    from replicas.config import CacheOptConfig
    from replicas.engines.config import LLAMA3_8B_H100
    from replicas.policies.base import Policy
    from replicas.policies.cacheopt import CacheOptPolicy
    from replicas.policies.edf import EdfPolicy

    requests = scale_to_rate(session_trace(SessionWorkload(num_sessions=80), seed=1), 12.0)
    setup = SimSetup(engine=LLAMA3_8B_H100.with_(kv_blocks=1024), cacheopt=CacheOptConfig(critical_admission=True))

    def outcomes():
        result = simulate(requests, policy, setup, predictor=None if policy == "edf" else _FixedBound())
        return [(o.request_id, o.first_token_s, o.finish_s, o.shed) for o in result.outcomes], result.stats.counters

    with_shortcut, counters = outcomes()
    assert counters["shed"] > 0  # under pressure: refusals happened
    for cls in (EdfPolicy, CacheOptPolicy):
        monkeypatch.setattr(cls, "admission_hopeless", Policy.admission_hopeless)
    assert outcomes()[0] == with_shortcut


class _FixedBound:
    name = "fixed"

    def predict(self, request, confidence):
        from predictor.base import LengthPrediction

        return LengthPrediction(point_tokens=60, bound_tokens=min(request.max_tokens, 120))

    def conditional_bound(self, request, generated_tokens, confidence):
        return min(request.max_tokens, generated_tokens + 60)
