"""One behaviour per test for each policy decision (DESIGN sections 4 and 5)."""

import pytest
from factories import CHAT, LOOSE, TIGHT, FakeCosts, FixedPredictor, held, make_request, make_scheduler, run_step

from replicas.plan import RECOMPUTE, SWAP
from replicas.request import Status

# --- vllm -------------------------------------------------------------------------------


def test_vllm_allocates_on_demand():
    """vLLM holds exactly the blocks its computed tokens need, and nothing in reserve."""
    s = make_scheduler("vllm", block_size=4)
    r = make_request(prompt=10, output=20)
    s.add_request(r, 0.0)
    run_step(s)
    assert held(s, r) == 3 and s.ledger.shares[r.request_id].reserved == 3
    for _ in range(3):
        run_step(s)
    assert r.num_computed_tokens == 13 and held(s, r) == 4


def test_vllm_preempts_last_admitted_and_recomputes():
    """Out of blocks, vLLM preempts the most recently admitted request and resets its progress."""
    s = make_scheduler("vllm", total_blocks=6, block_size=4)
    first, second = make_request(prompt=8, output=30), make_request(prompt=8, output=30)
    s.add_request(first, 0.0)
    s.add_request(second, 0.0)
    run_step(s)  # both prefill: 2 + 2 blocks
    for _ in range(8):
        plan = run_step(s)
        if plan.preempted:
            break
    assert plan.preempted == [(second, RECOMPUTE)]
    assert second.status is Status.PREEMPTED and second.num_computed_tokens == 0
    assert second.num_recomputed_tokens > 0 and s.waiting[0] is second


def test_vllm_admits_nothing_in_a_step_that_preempted():
    """A step with a preemption offers no admission, even to a request that would fit."""
    s = make_scheduler("vllm", total_blocks=5, block_size=4)
    a, b = make_request(prompt=8, output=30), make_request(prompt=7, output=30)
    s.add_request(a, 0.0)
    s.add_request(b, 0.0)
    run_step(s)
    tiny = make_request(prompt=1, output=1)
    s.add_request(tiny, 0.0)
    while True:
        plan = run_step(s)
        if plan.preempted:
            break
    assert tiny not in plan.scheduled


def test_vllm_fcfs_blocks_at_the_first_misfit():
    """vLLM stops admitting at the first waiting request that does not fit (head of line)."""
    s = make_scheduler("vllm", total_blocks=10, block_size=4)
    big, small = make_request(prompt=60, output=2), make_request(prompt=4, output=2)
    s.add_request(big, 0.0)
    s.add_request(small, 0.0)
    plan = run_step(s)
    assert not plan.scheduled


def test_lcf_preempts_least_computed():
    """lcf's victim is the running request with the fewest computed tokens."""
    s = make_scheduler("lcf", total_blocks=64)
    long, short = make_request(prompt=20), make_request(prompt=4)
    s.add_request(long, 0.0)
    s.add_request(short, 0.0)
    run_step(s)
    assert s.policy.choose_victim(long) is short


def test_sglang_ratio_decays_and_gates_admission():
    """SGLang's new-token ratio decays every step; it refuses a request whose estimated future need does not fit."""
    s = make_scheduler("sglang", total_blocks=20, block_size=4)
    start = s.policy.ratio
    running = make_request(prompt=8, output=60, max_tokens=64)
    s.add_request(running, 0.0)
    run_step(s)
    assert s.policy.ratio < start
    late = make_request(prompt=8, output=8, max_tokens=64)
    s.add_request(late, 0.0)
    run_step(s)
    # free is 80 tokens minus ~0.7 * 63 for `running`; `late` wants 8 + 0.7 * 64.
    assert late.status is Status.WAITING


def test_s3_reserves_unpadded_prediction_and_doubles_when_outgrown():
    """S3 reserves prompt + point prediction and, when outgrown, asks for double the prediction."""
    s = make_scheduler("s3", block_size=4, predictor=FixedPredictor(point=4, bound=40))
    r = make_request(prompt=8, output=10)
    s.add_request(r, 0.0)
    run_step(s)
    assert s.ledger.shares[r.request_id].reserved == 3  # (8 + 4) / 4
    while r.status is Status.RUNNING and r.num_output_tokens < 6:
        run_step(s)
    # Outgrown at g = 5 (the 3 blocks held 12 tokens): the new bound doubles max(4, g + 1).
    assert r.bound_output_tokens == 12 and s.counters["underpredicted"] == 1


# --- cacheopt-locked 2: reservation and reuse (the paper's literal design) -----------------------------------------------------


def test_locked_reserves_prompt_plus_padded_bound():
    """Admission reserves ceil((P + U_p) / block_size) blocks but holds only what is computed."""
    s = make_scheduler("cacheopt-locked", block_size=4, predictor=FixedPredictor(point=8, bound=12), reserve=False)
    r = make_request(prompt=8, output=5)
    s.add_request(r, 0.0)
    run_step(s)
    share = s.ledger.shares[r.request_id]
    assert share.reserved == 5 and share.held == 2


def _two_hosts_and_a_guest(spare_small_blocks, spare_large_blocks, guest_blocks, margin):
    """Hosts reserve a lot but are predicted to grow little while the guest lives."""
    s = make_scheduler("cacheopt-locked", total_blocks=200, block_size=4, reserve=False, embed_margin_blocks=margin,
                       predictor=FixedPredictor(point=4, bound=4))
    hosts = []
    for _ in range(2):
        host = make_request(prompt=4, output=50, max_tokens=200)
        s.add_request(host, 0.0)
        hosts.append(host)
    run_step(s)
    # Give each host a known spare: while a guest with a 4-token bound runs, a host grows
    # to at most its own bound, prompt 4 + bound 4 = 8 tokens = 2 blocks.
    for host, spare in zip(hosts, (spare_small_blocks, spare_large_blocks)):
        share = s.ledger.shares[host.request_id]
        s.ledger.try_top_up(host.request_id, 2 + spare - share.reserved, use_reserve=False)
    s.ledger.free = 0  # no free pool: the guest can only be embedded
    s.ledger.total_blocks = s.ledger.free + sum(sh.reserved for sh in s.ledger.shares.values())
    guest = make_request(prompt=guest_blocks * 4 - 4, output=2)
    s.add_request(guest, 0.0)
    return s, hosts, guest


def test_locked_embeds_guest_in_best_fitting_host():
    """A guest that fits no free pool is embedded in the feasible host with the least spare."""
    s, (small, large), guest = _two_hosts_and_a_guest(6, 20, guest_blocks=4, margin=2)
    run_step(s)
    assert s.ledger.shares[guest.request_id].host == small.request_id
    assert s.counters["embed"] == 1


def test_locked_embedding_respects_margin():
    """Host spare minus the guest's reservation must be at least the margin b."""
    s, (small, large), guest = _two_hosts_and_a_guest(5, 5, guest_blocks=4, margin=2)
    run_step(s)
    assert guest.status is Status.WAITING and s.counters["embed"] == 0


def test_locked_reuse_off_never_embeds():
    """With reuse switched off the same guest waits."""
    s, _, guest = _two_hosts_and_a_guest(6, 20, guest_blocks=4, margin=2)
    s.policy.config = s.policy.config.without("reuse")
    run_step(s)
    assert guest.status is Status.WAITING


def test_locked_host_takes_blocks_back_by_evicting_guest():
    """A host that needs more than its own room, with no free blocks to cover it, preempts its guest."""
    s, (small, large), guest = _two_hosts_and_a_guest(6, 20, guest_blocks=4, margin=2)
    run_step(s)
    host_share = s.ledger.shares[small.request_id]
    assert host_share.guests == {guest.request_id}
    need = host_share.reserved - host_share.lent + 1
    assert s.policy.try_grow(small, need)
    assert s.counters["guest_evict"] == 1 and guest.status is Status.PREEMPTED
    assert host_share.held == need and not host_share.guests
    s.ledger.check_invariants()


# --- cacheopt-locked 3: top-up and the reserve ------------------------------------------------------


def test_locked_tops_up_k_iterations_ahead():
    """The top-up happens when the reservation covers fewer than k more tokens, not earlier."""
    k = 3
    s = make_scheduler("cacheopt-locked", block_size=4, predictor=FixedPredictor(point=8, bound=8, step=8),
                       topup_lookahead_iters=k, reserve=False)
    r = make_request(prompt=8, output=30)
    s.add_request(r, 0.0)
    run_step(s)
    while s.counters["topup"] == 0:
        reserved = s.ledger.shares[r.request_id].reserved
        tokens_before = r.num_computed_tokens
        run_step(s)
    # Reservation of 4 blocks = 16 tokens; the step computing token `end` triggered it.
    assert reserved == 4
    assert tokens_before + 1 + k > 16 and tokens_before + k <= 16
    assert r.bound_output_tokens > 8 and s.ledger.shares[r.request_id].reserved > 4


def test_locked_admission_never_draws_the_reserve():
    """A non-critical admission is refused rather than dip into the global reserve."""
    s = make_scheduler("cacheopt-locked", total_blocks=20, block_size=4, reserve_fraction=0.2,
                       predictor=FixedPredictor(point=8, bound=60), slo_preemption=False)
    r = make_request(prompt=8, output=4, max_tokens=64)  # wants (8 + 60) / 4 = 17 > 16 free
    s.add_request(r, 0.0)
    run_step(s)
    assert r.status is Status.WAITING and s.ledger.reserve_free == 4


def test_locked_top_up_draws_the_reserve_when_free_is_gone():
    """Top-ups take free blocks first, then the reserve."""
    s = make_scheduler("cacheopt-locked", total_blocks=20, block_size=4, reserve_fraction=0.2,
                       predictor=FixedPredictor(point=4, bound=4, step=16), topup_lookahead_iters=2)
    r = make_request(prompt=8, output=40, max_tokens=64)
    s.add_request(r, 0.0)
    run_step(s)
    s.ledger.free = 0
    s.ledger.total_blocks = s.ledger.reserve_free + s.ledger.shares[r.request_id].reserved
    for _ in range(4):
        run_step(s)
    assert s.counters["reserve_draw_blocks"] > 0 and s.ledger.reserve_free < 4


# --- cacheopt 4: SLO-aware queueing and preemption ---------------------------------------------


def test_cacheopt_queues_by_deadline():
    """Waiting requests are offered admission earliest deadline first, across SLO classes."""
    s = make_scheduler(total_blocks=64)
    loose = make_request(slo=LOOSE, arrival_s=0.0)
    tight = make_request(slo=TIGHT, arrival_s=0.5)
    s.add_request(loose, 0.0)
    s.add_request(tight, 0.5)
    assert s.waiting == [tight, loose]


def test_cacheopt_offers_preempted_then_on_time_then_late():
    """Admission order: preempted requests, then new ones that can still make their deadline, then late ones."""
    s = make_scheduler(total_blocks=64)
    late = make_request(slo=TIGHT, arrival_s=0.0)  # deadline 1.0, passed at now = 2.0
    on_time = make_request(slo=LOOSE, arrival_s=0.0)  # deadline 15.0
    preempted = make_request(slo=LOOSE, arrival_s=0.0)
    preempted.last_token_s, preempted.status = 1.9, Status.PREEMPTED  # TBT deadline 2.9
    for r in (on_time, late, preempted):
        s.add_request(r, 0.0)
    s.now_s = 2.0
    assert list(s.policy.admission_order(s.waiting)) == [preempted, on_time, late]


def test_cacheopt_victim_order_is_lexicographic():
    """Victims: loosest TBT SLO, then longest predicted remaining time, then fewest blocks."""
    s = make_scheduler(total_blocks=200, block_size=4, protect_steps=0,
                       predictor=FixedPredictor(point=8, bound=20))
    tight = make_request(slo=TIGHT, prompt=4)
    loose_big = make_request(slo=LOOSE, prompt=40)
    loose_small = make_request(slo=LOOSE, prompt=4)
    for r in (tight, loose_big, loose_small):
        s.add_request(r, 0.0)
    run_step(s)
    assert s.policy.choose_victim(tight) is loose_small  # same remaining: fewer blocks wins
    loose_small.bound_output_tokens = 2  # now it is nearly done: the longer-remaining one goes
    assert s.policy.choose_victim(tight) is loose_big


def test_cacheopt_protects_just_resumed_requests():
    """A request resumed within protect_steps is not chosen while others are available."""
    s = make_scheduler(total_blocks=200, protect_steps=10)
    a, b = make_request(slo=LOOSE), make_request(slo=CHAT)
    s.add_request(a, 0.0)
    s.add_request(b, 0.0)
    run_step(s)
    a.resumed_step = s.step_index
    assert s.policy.choose_victim(b) is b


def test_locked_critical_request_gets_minimum_allocation_from_reserve():
    """A critical new request is admitted with prompt + B blocks, drawing on the reserve."""
    s = make_scheduler("cacheopt-locked", total_blocks=40, block_size=4, reserve_fraction=0.25, critical_extra_blocks=2,
                       critical_admission=True,
                       predictor=FixedPredictor(point=8, bound=60))
    hog = make_request(prompt=100, output=8, slo=TIGHT, max_tokens=8)  # reserves 27 of 30 free
    s.add_request(hog, 0.0)
    run_step(s, now_s=0.0, duration_s=0.5)
    crit = make_request(prompt=8, output=4, slo=TIGHT, arrival_s=0.0, max_tokens=64)  # deadline 1.0
    s.add_request(crit, 0.6)
    run_step(s, now_s=0.6, duration_s=0.5)  # slack 0.4 < largest recent iteration 0.5
    assert crit.status is Status.RUNNING and s.counters["critical_admit"] == 1
    assert s.ledger.shares[crit.request_id].reserved == 2 + 2  # prompt (2 blocks) + B
    assert s.ledger.reserve_free == 10 - 1  # 3 free blocks, then 1 from the reserve


def test_critical_request_preempts_only_looser_slos():
    """When nothing is free, a critical request preempts a looser-SLO request, never a tighter one."""
    s = make_scheduler("cacheopt-locked", total_blocks=12, block_size=4, reserve=False, critical_extra_blocks=1,
                       predictor=FixedPredictor(point=4, bound=4), protect_steps=0, critical_admission=True)
    tight_runner = make_request(prompt=16, output=40, slo=TIGHT, max_tokens=64)
    loose_runner = make_request(prompt=16, output=40, slo=LOOSE, max_tokens=64)
    s.add_request(tight_runner, 0.0)
    s.add_request(loose_runner, 0.0)
    run_step(s, now_s=0.0, duration_s=0.5)
    crit = make_request(prompt=4, output=4, slo=CHAT, arrival_s=0.0)  # deadline 3.0
    s.add_request(crit, 2.7)
    run_step(s, now_s=2.7, duration_s=0.1)
    assert loose_runner.status is Status.PREEMPTED and tight_runner.status is Status.RUNNING
    assert crit.status is Status.RUNNING


def test_late_request_is_not_critical():
    """A request whose deadline has already passed cannot be saved and preempts nobody."""
    s = make_scheduler(total_blocks=12, block_size=4, reserve=False, predictor=FixedPredictor(point=4, bound=4),
                       shedding=False, critical_admission=True)
    runner = make_request(prompt=16, output=40, slo=LOOSE, max_tokens=64)
    s.add_request(runner, 0.0)
    run_step(s, now_s=0.0, duration_s=0.5)
    late = make_request(prompt=32, output=4, slo=TIGHT, arrival_s=0.0)  # 8 blocks: more than are free
    s.add_request(late, 5.0)
    run_step(s, now_s=5.0)
    assert runner.status is Status.RUNNING and late.status is Status.WAITING


# --- cacheopt 5: swap or recompute -------------------------------------------------------------


@pytest.mark.parametrize("swap_s, recompute_s, expected", [(1.0, 2.0, SWAP), (3.0, 2.0, RECOMPUTE)])
def test_preemption_mode_is_the_faster(swap_s, recompute_s, expected):
    """Swap when the swap round trip is cheaper than recomputing the prefix, else recompute."""
    s = make_scheduler(can_swap=True, host_swap_blocks=100, costs=FakeCosts(swap_s, recompute_s))
    r = make_request(prompt=8)
    s.add_request(r, 0.0)
    run_step(s)
    assert s.policy.preemption_mode(r) == expected


def test_swap_needs_host_space_and_a_capable_engine():
    """Without host swap space, or on an engine that cannot swap, preemption recomputes."""
    no_space = make_scheduler(can_swap=True, host_swap_blocks=0, costs=FakeCosts(1.0, 2.0))
    no_engine = make_scheduler(can_swap=False, costs=FakeCosts(1.0, 2.0))
    for s in (no_space, no_engine):
        r = make_request(prompt=8)
        s.add_request(r, 0.0)
        run_step(s)
        assert s.policy.preemption_mode(r) == RECOMPUTE


def test_swapped_request_resumes_with_its_progress():
    """A swapped-out request keeps its computed tokens and swaps its blocks back in."""
    s = make_scheduler(can_swap=True, host_swap_blocks=100, costs=FakeCosts(1.0, 2.0), block_size=4)
    r = make_request(prompt=8, output=10)
    s.add_request(r, 0.0)
    run_step(s)
    computed = r.num_computed_tokens
    s.preempt(r, SWAP)
    assert s.ledger.host_swap_used == 2 and r.status is Status.PREEMPTED
    plan = run_step(s)
    assert plan.swap_in_blocks == 2 and r.num_computed_tokens == computed + 1
    assert s.ledger.host_swap_used == 0


# --- chunked prefill under an SLO-derived token budget ----------------------------------------


def test_token_budget_follows_tightest_running_tbt():
    """With a 50 ms TBT request running, a step may last 25 ms: 2 ms + 1 ms per token -> about 23 tokens."""
    s = make_scheduler(costs=FakeCosts(), budget=512, total_blocks=256)
    assert s.policy.step_token_budget() == 512  # nobody running: vLLM's budget
    r = make_request(prompt=4, output=50, slo=TIGHT)
    s.add_request(r, 0.0)
    run_step(s)
    budget = s.policy.step_token_budget()
    assert 23 - 16 <= budget <= 23  # bisection stops within 16 tokens, on the safe side
    long_prompt = make_request(prompt=200, output=5, slo=LOOSE)
    s.add_request(long_prompt, 0.0)
    assert run_step(s).scheduled[long_prompt] == budget - 1  # the decode took one token


def test_token_budget_off_is_vllm_budget():
    """With slo_token_budget switched off the budget is max_num_batched_tokens."""
    s = make_scheduler(costs=FakeCosts(), budget=512, slo_token_budget=False)
    r = make_request(prompt=4, output=50, slo=TIGHT)
    s.add_request(r, 0.0)
    run_step(s)
    assert s.policy.step_token_budget() == 512


# --- shared mechanics -----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["vllm", "vllm-2048", "sglang", "s3", "lcf", "edf", "past-future", "cacheopt",
                                    "cacheopt-locked"])
def test_abort_frees_blocks_and_reservation(policy):
    """An aborted request gives back everything it held or was promised."""
    s = make_scheduler(policy, total_blocks=64)
    r = make_request(prompt=20, output=30)
    s.add_request(r, 0.0)
    run_step(s)
    assert s.abort(r.request_id)
    s.ledger.check_invariants()
    assert s.ledger.free + s.ledger.reserve_free == 64 and not s.running


def test_chunked_prefill_respects_token_budget():
    """A long prompt is computed in budget-sized chunks and samples its first token at the end."""
    s = make_scheduler("vllm", budget=16, total_blocks=64)
    r = make_request(prompt=40, output=3)
    s.add_request(r, 0.0)
    chunks = [run_step(s).scheduled[r] for _ in range(3)]
    assert chunks == [16, 16, 8] and r.num_output_tokens == 1


def test_confidence_is_validated():
    """set_confidence rejects values outside (0, 1)."""
    s = make_scheduler()
    with pytest.raises(ValueError, match="confidence"):
        s.policy.set_confidence(1.5)


def test_vllm_admits_only_if_the_whole_prompt_fits():
    """vLLM 0.32's full-sequence gate: a request whose first chunk fits but whole prompt does not waits."""
    s = make_scheduler("vllm", total_blocks=10, block_size=4, budget=8)  # 40 tokens of KV, 8-token chunks
    r = make_request(prompt=44, output=2)
    s.add_request(r, 0.0)
    assert not run_step(s).scheduled
    fits = make_scheduler("vllm", total_blocks=11, block_size=4, budget=8)
    r2 = make_request(prompt=44, output=2)
    fits.add_request(r2, 0.0)
    assert run_step(fits).scheduled == {r2: 8} and held(fits, r2) == 2


# --- no starvation: shedding after a bounded wait ---------------------------------------------


def test_a_request_that_never_starts_is_shed_after_its_bounded_wait():
    """A new request still waiting at shed_wait_ttft_multiple x its TTFT SLO is shed: it
    leaves the queue, the request table and the ledger, and counts once."""
    s = make_scheduler("edf", total_blocks=12, block_size=4, shed_wait_ttft_multiple=2.0)
    hog = make_request(prompt=40, output=40, slo=LOOSE, max_tokens=64)
    s.add_request(hog, 0.0)
    run_step(s, now_s=0.0)
    starved = make_request(prompt=20, output=4, slo=TIGHT, arrival_s=0.0)  # TTFT 1 s: shed at 2 s
    s.add_request(starved, 0.0)
    plan = run_step(s, now_s=1.9)
    assert starved.status is Status.WAITING and not plan.shed
    plan = run_step(s, now_s=2.0)
    assert plan.shed == [starved] and starved.status is Status.FINISHED and starved.shed_s == 2.0
    assert starved not in s.waiting and starved.request_id not in s.requests
    assert starved.request_id not in s.ledger.shares and s.counters["shed"] == 1


def test_a_started_request_is_never_shed():
    """Shedding refuses only requests without a first token: a stalled stream is finished."""
    s = make_scheduler("edf", total_blocks=64, block_size=4)
    r = make_request(prompt=8, output=40, slo=TIGHT)
    s.add_request(r, 0.0)
    run_step(s, now_s=0.0)
    s.preempt(r, RECOMPUTE)
    for step in range(3):
        assert not run_step(s, now_s=5.0 + step).shed
    assert r.status is Status.RUNNING


def test_shedding_off_lets_a_request_wait():
    """cacheopt-no_shedding keeps the old behaviour: late requests wait behind on-time ones."""
    s = make_scheduler("edf", total_blocks=12, block_size=4, shedding=False)
    s.add_request(make_request(prompt=40, output=40, slo=LOOSE, max_tokens=64), 0.0)
    run_step(s)
    late = make_request(prompt=20, output=4, slo=TIGHT)
    s.add_request(late, 0.0)
    assert not run_step(s, now_s=100.0).shed and late.status is Status.WAITING


# --- decision bugs found in review -----------------------------------------------------------------


def test_a_preemption_inside_a_policy_hook_gives_its_tokens_back_to_the_step():
    """Whoever preempts (the running loop, a guest eviction, a critical admission), the
    victim's tokens scheduled this step return to the step's budget."""
    s = make_scheduler("edf", total_blocks=64, block_size=4, budget=16)
    runner = make_request(prompt=28, output=4, slo=LOOSE)
    s.add_request(runner, 0.0)
    run_step(s)  # 16 of 28 prompt tokens; the next step schedules its last 12 and leaves 4
    policy = s.policy
    original = policy.try_admit

    def admit_after_evicting_runner(request, n):
        if runner.status is Status.RUNNING:
            s.preempt(runner, RECOMPUTE)  # as _admit_critical or _evict_guest would
        return original(request, n)

    policy.try_admit = admit_after_evicting_runner
    first, second = make_request(prompt=4, output=2, slo=CHAT), make_request(prompt=12, output=2, slo=CHAT)
    s.add_request(first, 0.0)
    s.add_request(second, 0.0)
    plan = run_step(s)
    # runner's 12 tokens came back: first took the 4 left, second the 12 refunded.
    assert runner.status is Status.PREEMPTED
    assert plan.scheduled.get(first) == 4 and plan.scheduled.get(second) == 12


def test_victims_exclude_guests_of_other_hosts():
    """Preempting another host's guest frees nothing for the requester: only its own guests qualify."""
    s, (small, large), guest = _two_hosts_and_a_guest(6, 20, guest_blocks=4, margin=2)
    run_step(s)
    assert s.ledger.shares[guest.request_id].host == small.request_id
    guest.slo = LOOSE  # the loosest: the first victim if guests were eligible
    assert s.policy.choose_victim(large) is not guest
    assert s.policy.choose_victim(small) is guest


def test_a_request_admitted_this_step_is_not_a_critical_victim():
    """A critical admission never evicts a request admitted earlier in the same step (it
    would count as preempted without ever running, and be exempt for good)."""
    s = make_scheduler("cacheopt-locked", total_blocks=12, block_size=4, reserve=False, critical_admission=True,
                       critical_extra_blocks=1, protect_steps=0, predictor=FixedPredictor(point=4, bound=4))
    s.recent_iteration_s.append(0.5)
    s.max_recent_iteration_s = 0.5
    early_loose = make_request(prompt=24, output=4, slo=LOOSE, arrival_s=0.0)  # deadline 15.0
    critical = make_request(prompt=20, output=4, slo=TIGHT, arrival_s=14.3)  # deadline 15.3, slack 0.3
    s.add_request(early_loose, 14.3)
    s.add_request(critical, 14.3)
    plan = run_step(s, now_s=14.8)
    assert early_loose in plan.admitted and early_loose.status is Status.RUNNING
    assert early_loose.num_preemptions == 0


def test_locked_refusal_memo_is_forgotten_when_a_preemption_frees_blocks():
    """Within a step a refused reservation marks larger ones hopeless, until a critical
    preemption gives blocks back."""
    s = make_scheduler("cacheopt-locked", total_blocks=64)
    s.policy.begin_admission()
    s.policy._refused_target = 3
    s.policy._on_blocks_freed()
    assert s.policy._refused_target is None


def test_scheduler_config_refuses_more_sequences_than_tokens():
    """vLLM refuses max_num_seqs > max_num_batched_tokens: a step could not decode them all."""
    from replicas.config import SchedulerConfig

    with pytest.raises(ValueError, match="max_num_seqs=64 must be <= max_num_batched_tokens=32"):
        SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=32)


def test_token_budget_follows_the_tightest_not_the_loosest_slo():
    """With a realtime (50 ms TBT: ~23 tokens) and a batch request (1 s: ~500) running, the
    budget is the realtime one's."""
    loose_only = make_scheduler("edf", costs=FakeCosts(), budget=512, total_blocks=256)
    mixed = make_scheduler("edf", costs=FakeCosts(), budget=512, total_blocks=256)
    loose_only.add_request(make_request(prompt=4, output=50, slo=LOOSE), 0.0)
    for r in (make_request(prompt=4, output=50, slo=LOOSE), make_request(prompt=4, output=50, slo=TIGHT)):
        mixed.add_request(r, 0.0)
    run_step(loose_only)
    run_step(mixed)
    assert mixed.policy.step_token_budget() <= 23 and loose_only.policy.step_token_budget() >= 256


# --- the stronger baselines -------------------------------------------------------------------------


def test_vllm_2048_caps_the_step_budget_at_2048():
    """vllm-2048 is vLLM with Sarathi's budget: min(2048, max_num_batched_tokens)."""
    assert make_scheduler("vllm-2048", budget=8192, total_blocks=64).policy.step_token_budget() == 2048
    assert make_scheduler("vllm-2048", budget=512, total_blocks=64).policy.step_token_budget() == 512


def test_past_future_learns_output_lengths_from_finished_requests():
    """The EMA starts at 2,048 tokens and moves toward finished lengths (floored at 64)."""
    s = make_scheduler("past-future", total_blocks=400, block_size=4)
    assert s.policy.ema_tokens == 2048
    for _ in range(3):
        s.add_request(make_request(prompt=4, output=100, max_tokens=200), 0.0)
    while s.has_work:
        run_step(s)
    assert 100 < s.policy.ema_tokens < 2048


def test_past_future_admits_by_the_projected_peak_not_by_what_is_free():
    """A newcomer whose prompt fits now waits when everyone's expected growth would overflow."""
    s = make_scheduler("past-future", total_blocks=40, block_size=4)  # 160 tokens; EMA 2048 -> max_tokens 64
    first, second = make_request(prompt=40, output=60, max_tokens=64), make_request(prompt=40, output=60, max_tokens=64)
    s.add_request(first, 0.0)
    s.add_request(second, 0.0)
    run_step(s)
    assert first.status is Status.RUNNING and second.status is Status.WAITING  # 2 x (40 + 63 + 3) > 160


def test_edf_keeps_vllms_kv_handling():
    """edf admits when the whole sequence fits and holds only computed blocks (no reservation)."""
    s = make_scheduler("edf", total_blocks=64, block_size=4)
    r = make_request(prompt=10, output=20)
    s.add_request(r, 0.0)
    run_step(s)
    share = s.ledger.shares[r.request_id]
    assert share.held == share.reserved == 3 and s.ledger.reserve_target == 0


def test_ablation_names_follow_the_configuration():
    """A mechanism switched on by option can be ablated; one that is off is a clear error."""
    from replicas.config import CacheOptConfig
    from replicas.policies import ablation_names, make_policy

    on = CacheOptConfig(critical_admission=True)
    assert "cacheopt-no_critical_admission" in ablation_names(on)
    assert "cacheopt-no_critical_admission" not in ablation_names(CacheOptConfig())
    assert make_policy("cacheopt-no_critical_admission", predictor=FixedPredictor(), cacheopt_config=on)
    with pytest.raises(ValueError, match="critical_admission"):
        make_policy("cacheopt-no_critical_admission", predictor=FixedPredictor())
