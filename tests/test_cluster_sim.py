"""The cluster simulator: the real routing rule and global scheduler logic over N simulated
replicas, state reaching the router late, deterministic for a seed."""

import pytest

from bench.cluster_sim import ClusterSimSetup, _PublishedState, parse_variant, simulate_cluster
from bench.metrics import summarize
from bench.sessions import SessionWorkload, session_trace
from bench.simulate import ReplicaSim, SimSetup, simulate
from bench.traces import load_azure_trace, scale_to_rate
from cluster.cli import main
from global_scheduler.control import control_settings
from predictor.length_quantile import LengthQuantilePredictor
from replicas.engines.config import LLAMA3_8B_H100
from replicas.request import Request
from replicas.slo import SLO_CLASSES

SETUP = SimSetup(engine=LLAMA3_8B_H100.with_(kv_blocks=1024), check_invariants=True)


@pytest.fixture(scope="module")
def workload():
    trace = load_azure_trace("conv", limit=700)
    predictor = LengthQuantilePredictor.fit((r.prompt_tokens, r.output_tokens) for r in trace[:200])
    return trace[200:], predictor


def _key(result):
    return [(o.request_id, o.first_token_s, o.finish_s, o.shed) for o in result.outcomes]


def test_one_replica_is_the_plain_simulator(workload):
    """With one replica and p fixed, the cluster simulator is the single-replica simulator:
    same requests, same step times, same outcomes (the lease is the whole budget)."""
    trace, predictor = workload
    requests = scale_to_rate(trace, 6.0)
    alone = simulate(requests, "cacheopt", SETUP, predictor)
    clustered = simulate_cluster(requests, "cacheopt", SETUP, ClusterSimSetup(replicas=1), predictor)
    assert _key(clustered) == _key(alone)


@pytest.mark.parametrize("router", ["kv", "p2c", "least-loaded", "round-robin"])
def test_every_request_is_routed_once_and_served_or_shed(workload, router):
    """Four replicas under pressure, invariants checked after every step of every replica."""
    trace, predictor = workload
    result = simulate_cluster(scale_to_rate(trace, 40.0), "cacheopt", SETUP, ClusterSimSetup(replicas=4, router=router),
                              predictor, seed=3)
    assert sum(result.replica_requests) == len(result.outcomes) == len(trace) - result.num_dropped
    assert min(result.replica_requests) > 0
    assert all((o.finish_s is not None) != o.shed for o in result.outcomes)
    if router == "round-robin":
        assert max(result.replica_requests) - min(result.replica_requests) <= 1


def test_deterministic_for_a_seed_and_seeds_differ(workload):
    trace, predictor = workload
    requests = scale_to_rate(trace, 40.0)
    runs = [simulate_cluster(requests, "cacheopt", SETUP, ClusterSimSetup(replicas=4, router="p2c"), predictor, seed=s)
            for s in (1, 1, 2)]
    assert _key(runs[0]) == _key(runs[1])
    assert runs[0].replica_requests != runs[2].replica_requests


def test_the_router_sees_the_state_of_the_last_tick_before_the_delay():
    """A replica's published state: the snapshot of the state it was in at the last tick
    at least `delay` ago, stamped with that tick."""
    replica = ReplicaSim("vllm", SETUP, None)
    state = _PublishedState(replica, period=1.0, delay=0.25, phase=0.5)
    chat = SLO_CLASSES["chat"]

    def arrive(t: float, name: str) -> None:
        state.changing(t)
        replica.scheduler.add_request(Request(name, t, 100, 50, chat, true_output_tokens=50), t)

    assert state.seen_at(0.7) is None  # the first tick (0.5) is not 0.25 s old yet
    arrive(1.2, "a")  # between ticks 0.5 and 1.5
    arrive(1.7, "b")  # after tick 1.5
    assert state.seen_at(1.74).num_waiting == 0 and state.seen_at(1.74).taken_s == 0.5
    assert state.seen_at(1.75).num_waiting == 1 and state.seen_at(1.75).taken_s == 1.5
    assert state.seen_at(3.0).num_waiting == 2 and state.seen_at(3.0).taken_s == 2.5


def test_stale_state_falls_back_and_fresh_state_routes_by_headroom(workload):
    """At 10 s staleness the KV rule has no fresh snapshot (older than 2 s) most of the
    time and routes as power of two choices; at 10 ms it routes by headroom, and the
    two differ."""
    trace, predictor = workload
    requests = scale_to_rate(trace, 40.0)

    def run(**kwargs):
        return simulate_cluster(requests, "cacheopt", SETUP, ClusterSimSetup(replicas=4, **kwargs), predictor, seed=5)

    fresh, stale, p2c = run(router="kv", state_period_s=0.01), run(router="kv", state_period_s=10.0), run(router="p2c")
    assert fresh.replica_requests != stale.replica_requests
    assert fresh.routing_us_per_request > p2c.routing_us_per_request  # it ranks every replica


@pytest.mark.parametrize("reserve", ["pressure", "static", "none"])
def test_reserve_splits(workload, reserve):
    """`none` leaves no reserve, `static` the same share everywhere, `pressure` the global
    scheduler's split of the same budget; p tuned from the cluster's or each replica's rate."""
    trace, predictor = workload
    settings = control_settings(replicas=4, p_range=(0.3, 0.9), rate_band_rps=(8.0, 16.5),
                                reserve_fraction=SETUP.cacheopt.reserve_fraction)
    for scope in ("cluster", "replica"):
        result = simulate_cluster(scale_to_rate(trace, 40.0), "cacheopt", SETUP,
                                  ClusterSimSetup(replicas=4, reserve=reserve, p_scope=scope), predictor, settings)
        assert summarize(result.outcomes, result.stats)["slo_attainment"] > 0.5


def test_variants_parse_and_bad_ones_are_clear():
    base = ClusterSimSetup(replicas=16)
    assert parse_variant("kv:state_period_s=1:reserve=static", base) == ClusterSimSetup(
        replicas=16, router="kv", state_period_s=1.0, reserve="static")
    assert parse_variant("least-loaded:prefix_slack=none", base).prefix_slack is None
    assert parse_variant("kv:prefix_slack=4", base).prefix_slack == 4.0
    assert parse_variant("kv:headroom=off", base).headroom == "off"
    for bad, message in (("kv:colour=red", "not FIELD=VALUE"), ("kv:state_period_s=soon", "takes seconds"),
                         ("kv:prefix_slack=some", "takes requests or none"),
                         ("random", "router='random'"), ("kv:reserve=half", "reserve='half'"),
                         ("kv:headroom=no", "headroom='no'")):
        with pytest.raises(ValueError, match=message):
            parse_variant(bad, base)


def test_cli_cluster_sweep_writes_a_report_per_router(tmp_path, capsys):
    out = tmp_path / "cluster"
    code = main(["sim", "--replicas", "3", "--routers", "kv,p2c", "--rates", "8,12", "--limit", "400",
                 "--kv-blocks", "1024", "--jobs", "1", "--no-progress", "--out", str(out)])
    assert code == 0
    summary = (out / "summary.md").read_text()
    assert "Cluster simulator: 3 replicas" in summary and "| kv |" in summary and "| p2c |" in summary
    assert main(["sim", "--replicas", "2", "--policies", "vllm,cacheopt"]) == 2
    assert "one replica policy" in capsys.readouterr().err


@pytest.mark.parametrize("router", ["kv", "least-loaded"])
def test_prefix_affinity_sends_sessions_where_their_history_is_cached(router):
    """On multi-turn sessions, routing by the prefix the router sent where raises the share
    of prompt tokens vLLM's prefix cache serves, against the same router without it."""
    trace = scale_to_rate(session_trace(SessionWorkload(num_sessions=120), seed=1), 40.0)
    predictor = LengthQuantilePredictor.fit((r.prompt_tokens, r.output_tokens) for r in trace[:100])
    hits = {}
    for slack in (None, 2.0):
        result = simulate_cluster(trace, "cacheopt", SETUP, ClusterSimSetup(replicas=4, router=router, prefix_slack=slack),
                                  predictor, seed=0)
        counters = result.stats.counters
        hits[slack] = counters["prefix_hit_tokens"] / counters["prefix_query_tokens"]
    assert hits[2.0] > hits[None] + 0.05, hits
