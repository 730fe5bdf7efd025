"""Every policy, driven by random arrivals, steps and aborts, keeps the ledger balanced and
finishes every request it is given (no deadlock, no lost request)."""

from factories import (
    CHAT,
    LOOSE,
    TIGHT,
    FakeCosts,
    VariedPredictor,
    finished_at_true_length,
    make_request,
    make_scheduler,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from replicas.policies import ABLATION_NAMES
from replicas.request import Status

POLICIES = ["vllm", "sglang", "s3", "lcf", "cacheopt", "oracle", *ABLATION_NAMES]

arrival = st.tuples(st.just("arrive"), st.integers(1, 40), st.integers(1, 60), st.sampled_from([TIGHT, CHAT, LOOSE]),
                    st.integers(0, 3))  # the shared prefix (system prompt) it starts with; 0: none
step = st.tuples(st.just("step"), st.floats(0.001, 0.3), st.just(0), st.just(None), st.just(0))
abort = st.tuples(st.just("abort"), st.integers(0, 30), st.just(0), st.just(None), st.just(0))
events = st.lists(st.one_of(arrival, arrival, step, step, abort), min_size=10, max_size=80)


@settings(max_examples=300, deadline=None)
@given(policy=st.sampled_from(POLICIES), sequence=events, point=st.integers(1, 30), pad=st.integers(0, 30),
       can_swap=st.booleans(), swap_cheaper=st.booleans(), block_size=st.sampled_from([1, 4, 16]),
       prefix_caching=st.booleans())
def test_random_workloads_keep_invariants_and_finish(policy, sequence, point, pad, can_swap, swap_cheaper,
                                                     block_size, prefix_caching):
    """Outputs shorter than, equal to and longer than the bound; invariants hold after every
    step. With prefix caching, requests share prefixes, and the ledger's charges are the
    pool's tables and free count at every step."""
    total_tokens = 128  # a prompt of 40 plus max_tokens 64 fits; a handful of requests contend
    total_blocks = total_tokens // block_size
    s = make_scheduler(policy, total_blocks=total_blocks, block_size=block_size, budget=48,
                       max_num_seqs=8, predictor=VariedPredictor(point=point, bound=point + pad, step=5),
                       can_swap=can_swap, host_swap_blocks=total_tokens // block_size // 2,
                       costs=FakeCosts(1.0, 2.0) if swap_cheaper else FakeCosts(2.0, 1.0),
                       prefix_caching=prefix_caching)

    def check_books():
        s.ledger.check_invariants()
        s.check_blocks()
        if prefix_caching:
            assert s.pool.num_free == total_blocks - s.ledger.held_total
    now = 0.0
    submitted = []

    def step_once(duration):
        nonlocal now
        plan = s.schedule(now)
        now += duration
        s.on_step_done(plan, now, duration, finished_at_true_length)
        check_books()
        for r in plan.scheduled:
            assert r.num_computed_tokens <= r.num_tokens

    for kind, a, b, slo, prefix in sequence:
        if kind == "arrive":
            keys = tuple((prefix, i) for i in range(a // block_size)) if prefix else None
            r = make_request(prompt=a, output=b, slo=slo, arrival_s=now, max_tokens=64, prefix_keys=keys)
            s.add_request(r, now)
            submitted.append(r)
        elif kind == "step":
            step_once(a)
        elif submitted:
            s.abort(submitted[a % len(submitted)].request_id)
            check_books()

    for _ in range(5000):
        if not s.has_work:
            break
        step_once(0.05)
    assert not s.has_work, f"{policy} left {len(s.waiting)} waiting and {len(s.running)} running"
    for r in submitted:
        assert r.status is Status.FINISHED
        if r.finish_s is not None:
            assert r.num_output_tokens == r.true_output_tokens
            assert len(r.token_gaps_s) == r.num_output_tokens - 1
    assert s.ledger.free + s.ledger.reserve_free == s.ledger.total_blocks
    assert s.ledger.host_swap_used == 0
