"""The projected peak (replicas/projection.py) against a brute-force walk over the future,
and the peak-admission policy built on it."""

from factories import CHAT, LOOSE, FixedPredictor, make_request, make_scheduler, run_step
from hypothesis import given, settings
from hypothesis import strategies as st

from replicas.projection import PeakProjection
from replicas.request import Status

# Offsets >= 1 with finish steps >= 0: every term a + T is a size, positive (projection.py).
entries = st.lists(st.tuples(st.integers(0, 60), st.integers(1, 200)), max_size=25)


def brute_peak(items: list[tuple[int, int]], now: int) -> int:
    """max over steps t >= now of sum over entries still running at t of (a + t)."""
    horizon = max((t for t, _ in items), default=now)
    return max((sum(a + t for T, a in items if T >= t) for t in range(now, horizon + 1)), default=0)


@settings(max_examples=300, deadline=None)
@given(items=entries, candidate=st.tuples(st.integers(0, 60), st.integers(1, 200)))
def test_peak_and_peak_with_match_a_walk_over_every_future_step(items, candidate):
    """peak_tokens is the largest usage at any step from the earliest finish on (entries
    already past are the caller's to extend), and peak_with equals the peak after adding."""
    projection = PeakProjection()
    for i, (finish, offset) in enumerate(items):
        projection.set(f"r{i}", finish, offset)
    now = min((t for t, _ in items + [candidate]), default=0)
    assert projection.peak_tokens() == brute_peak(items, min((t for t, _ in items), default=0))
    assert projection.peak_with(*candidate) == brute_peak(items + [candidate], now)


def test_moving_and_removing_entries_keeps_the_projection_exact():
    """set on a known id moves it; discard removes it; expired lists those before now."""
    projection = PeakProjection(slack_tokens=3)
    projection.set("a", 10, 100)
    projection.set("b", 5, 50)
    projection.set("a", 12, 99)  # one step without progress: T + 1 ... here moved by two
    assert projection.entry("a") == (12, 99)
    assert projection.peak_tokens() == brute_peak([(12, 102), (5, 53)], 5)
    assert projection.expired(6) == ["b"] and projection.expired(5) == []
    projection.discard("b")
    projection.discard("missing")
    assert len(projection) == 1 and projection.peak_tokens() == 102 + 12


def test_peak_admission_refuses_what_would_overflow_at_the_peak():
    """Two requests that fit now but would both grow past the blocks before either ends:
    the second waits, although vLLM's gate (its prompt fits) would admit it."""
    # 20 blocks of 4 tokens = 80; each: prompt 8 growing to 8 + 31 tokens (bound 32), plus
    # 3 tokens of block rounding: 2 x 42 > 80.
    s = make_scheduler("cacheopt", total_blocks=20, block_size=4, reserve=False,
                       predictor=FixedPredictor(point=32, bound=32), shedding=False)
    first, second = make_request(prompt=8, output=32, slo=CHAT), make_request(prompt=8, output=32, slo=CHAT)
    s.add_request(first, 0.0)
    s.add_request(second, 0.0)
    run_step(s)
    assert first.status is Status.RUNNING and second.status is Status.WAITING
    vllm = make_scheduler("vllm", total_blocks=20, block_size=4)
    a, b = make_request(prompt=8, output=30), make_request(prompt=8, output=30)
    vllm.add_request(a, 0.0)
    vllm.add_request(b, 0.0)
    run_step(vllm)
    assert b.status is Status.RUNNING


def test_peak_admission_uses_blocks_others_will_free_first():
    """A request predicted to finish soon leaves room a later-finishing newcomer can count
    on: the peak, not the sum of final sizes, decides (reuse of idle promises)."""
    # 20 blocks x 4 = 80 tokens. Runner: 40 prompt, bound 4 -> peak 44 + slack early on.
    s = make_scheduler("cacheopt", total_blocks=20, block_size=4, reserve=False, shedding=False,
                       predictor=FixedPredictor(point=4, bound=4))
    runner = make_request(prompt=40, output=4, slo=LOOSE)
    s.add_request(runner, 0.0)
    run_step(s)
    # Newcomer: 8 prompt, bound 4 at first; by the time it would be large, runner is gone.
    newcomer = make_request(prompt=8, output=4, slo=LOOSE)
    s.add_request(newcomer, 0.0)
    run_step(s)
    assert newcomer.status is Status.RUNNING
    # Sum of final sizes would be 44 + 12 = 56 < 80 here too; the projection agrees and no
    # one is preempted while both run to completion.
    while s.has_work:
        run_step(s)
    assert s.counters.get("preempt_recompute", 0) == 0


def test_outliving_a_bound_extends_it_in_the_projection():
    """A request still running after its predicted last step gets a conditional bound and
    a new entry; nothing is preempted while the blocks last."""
    s = make_scheduler("cacheopt", total_blocks=64, block_size=4, shedding=False,
                       predictor=FixedPredictor(point=2, bound=2, step=5))
    r = make_request(prompt=8, output=12)
    s.add_request(r, 0.0)
    waiting = make_request(prompt=4, output=2)
    for step in range(6):
        run_step(s, now_s=0.01 * step)
        if step == 3:
            s.add_request(waiting, 0.03)  # admission runs, and with it the expiry check
    assert s.counters["bound_extended"] >= 1
    assert r.bound_output_tokens > 2
    finish, _ = s.policy.projection.entry(r.request_id)
    assert finish >= s.step_index - 1


def test_a_prefill_chunk_moves_the_predicted_finish_later():
    """A request that got no token in a step (chunked prefill) finishes one step later."""
    s = make_scheduler("cacheopt", total_blocks=64, block_size=4, budget=8,
                       predictor=FixedPredictor(point=4, bound=4))
    r = make_request(prompt=20, output=4)
    s.add_request(r, 0.0)
    run_step(s)  # 8 of 20 prompt tokens
    first, _ = s.policy.projection.entry(r.request_id)
    run_step(s)  # 16 of 20
    second, _ = s.policy.projection.entry(r.request_id)
    assert second == first + 1


def test_an_idle_replica_admits_a_request_larger_than_its_projection_allows():
    """With nobody running, a request that fits the blocks now is admitted even if its
    bound (plus block rounding) projects past them: refusing would strand it until shed.
    vLLM's gate admits it too."""
    for policy in ("cacheopt", "past-future"):
        s = make_scheduler(policy, total_blocks=16, block_size=4, reserve=False, shedding=False,
                           predictor=FixedPredictor(point=60, bound=60))
        big = make_request(prompt=8, output=4, max_tokens=60)  # 8 + 59 + 3 > 64 tokens
        s.add_request(big, 0.0)
        run_step(s)
        assert big.status is Status.RUNNING, policy


def test_the_peak_is_compared_in_blocks():
    """Block rounding counts once per request: a request whose final size fills the last
    block exactly is admitted next to one that leaves room."""
    s = make_scheduler("cacheopt", total_blocks=20, block_size=4, reserve=False, shedding=False,
                       predictor=FixedPredictor(point=32, bound=32))
    first, second = make_request(prompt=8, output=32), make_request(prompt=9, output=1, max_tokens=3)
    s.add_request(first, 0.0)  # 8 + 31 = 39 tokens + 3 rounding: 42 -> 10 blocks
    s.add_request(second, 0.0)
    run_step(s)
    assert first.status is Status.RUNNING and second.first_token_s is not None
