"""deploy/: the `ray up` YAMLs pass Ray's own cluster schema, offline; the Serve config
passes Serve's schema and builds our application's configuration."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import ray  # noqa: F401 (a missing Ray fails collection, never skips)
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml", "local.yaml"])
def test_cluster_yaml_passes_rays_schema(name):
    config = yaml.safe_load((DEPLOY / name).read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    # Ray's GCS must not take Redis's port.
    head = next(c for c in config["head_start_ray_commands"] if "ray start" in c)
    assert "--port=6380" in head and "--port=6379" not in head
    # Every node authenticates with Ray's token; the dashboard stays on the head's loopback;
    # the secrets come from the operator's ~/.cacheopt, and Redis requires its password.
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert all("RAY_AUTH_MODE=token" in c and "RAY_AUTH_TOKEN_PATH=" in c for c in starts)
    assert all("RAY_SERVE_ENABLE_HA_PROXY=1" in c for c in starts)  # the default ingress (cluster/ingress.py)
    assert all("RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY=1" in c for c in starts)  # router: kv reads prompts
    assert "--dashboard-host=127.0.0.1" in head
    assert "CACHEOPT_API_KEY=" in head and "CACHEOPT_REDIS_URL=$(cat ~/.cacheopt-redis-url)" in head
    assert "~/.cacheopt" in config["file_mounts"].values()
    # Redis on the head, with its password, at an address the workers' replicas reach.
    assert "bash ~/cacheopt/deploy/redis-on-head.sh" in config["head_setup_commands"]
    assert "127.0.0.1:6379" not in yaml.safe_dump(config)


def test_head_redis_listens_where_the_workers_reach_it():
    script = (DEPLOY / "redis-on-head.sh").read_text()
    assert "requirepass $PASSWORD" in script and 'bind 127.0.0.1 $IP' in script
    assert 'redis://:$PASSWORD@$IP:6379/0" > ~/.cacheopt-redis-url' in script


def test_a_loopback_redis_url_is_refused_for_a_cluster_of_several_machines():
    from cluster.app import loopback_redis_problem

    assert loopback_redis_problem("redis://:pw@127.0.0.1:6379/0", {"10.0.0.10"}) is None
    assert loopback_redis_problem("redis://:pw@127.0.0.1:6379/0", {"127.0.0.1"}) is None  # nodes on one machine
    assert loopback_redis_problem("redis://:pw@10.0.0.10:6379/0", {"10.0.0.10", "10.0.0.11"}) is None
    problem = loopback_redis_problem("redis://:pw@localhost:6379/0", {"10.0.0.10", "10.0.0.11"})
    assert problem and "10.0.0.10, 10.0.0.11" in problem and "pw" not in problem


def test_rays_schema_does_reject_a_broken_yaml():
    config = yaml.safe_load((DEPLOY / "aws.yaml").read_text())
    config["max_workers"] = "many"
    with pytest.raises(Exception, match="many"):
        validate_config(prepare_config(config))


def test_serve_config_is_valid_and_takes_its_secrets_from_the_environment(monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    from cluster.config import ClusterConfig, secrets_from_environment

    schema = ServeDeploySchema.model_validate(yaml.safe_load((DEPLOY / "serve-config.yaml").read_text()))
    (app,) = schema.applications
    assert app.import_path == "cluster.app:build_app"
    assert "api_keys" not in app.args["config_dict"] and "redis_url" not in app.args["config_dict"]
    monkeypatch.setenv("CACHEOPT_API_KEY", "k1,k2")
    monkeypatch.setenv("CACHEOPT_REDIS_URL", "redis://:pw@127.0.0.1:6379/0")
    config = ClusterConfig.model_validate(secrets_from_environment(app.args["config_dict"]))  # as build_app does
    assert config.engine.random_weights is False and config.api_keys == ("k1", "k2")
    assert config.ingress == "haproxy"
    assert config.redis_url == "redis://:pw@127.0.0.1:6379/0"
    # Without the key in the environment the deploy fails rather than serve every interface openly.
    from cluster.app import build_app
    from cluster.config import ConfigError

    monkeypatch.delenv("CACHEOPT_API_KEY")
    monkeypatch.delenv("CACHEOPT_REDIS_URL")
    with pytest.raises(ConfigError, match="require_api_keys"):
        build_app({"config_dict": app.args["config_dict"]})
