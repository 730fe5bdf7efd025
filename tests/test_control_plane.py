"""The control plane's cost, measured against a real redis-server: Redis's load grows with
the replicas (not with their square), and the router's decision is timed."""

import json

from cluster_support import RedisServer

from cluster.cli import main


def test_redis_load_is_linear_in_replicas(tmp_path, capsys):
    """Per replica and second of service: its snapshot, its lease (GET and PTTL) and a share
    of the global scheduler's split, written at most twice per report period. Writing the
    split on every report, as before, cost N + 5 commands per replica per period (42/s at
    16 replicas)."""
    redis = RedisServer()
    try:
        out = tmp_path / "control.json"
        assert main(["control-plane", "--replicas", "4,16", "--rounds", "4", "--redis-url", redis.url,
                     "--out", str(out)]) == 0
    finally:
        redis.kill()
    result = json.loads(out.read_text())
    per_replica = {int(n): load["commands_per_s_in_service"] / int(n) for n, load in result["redis"].items()}
    assert all(6 <= rate <= 14 for rate in per_replica.values()), per_replica
    assert per_replica[16] <= 1.2 * per_replica[4], per_replica
    assert set(result["redis"]["16"]["commands"]) >= {"set", "get", "pttl", "evalsha"}
    assert all(r["stats_unchanged"]["p50"] > 0 for r in result["router_us"].values())
    assert "router, 16 replicas" in capsys.readouterr().out
