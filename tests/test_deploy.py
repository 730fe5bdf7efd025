"""deploy/: the `ray up` YAMLs pass Ray's own cluster schema, offline; the Serve config
passes Serve's schema and builds our application's configuration."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml", "local.yaml"])
def test_cluster_yaml_passes_rays_schema(name):
    config = yaml.safe_load((DEPLOY / name).read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    # Ray's GCS must not take Redis's port.
    head = " ".join(config["head_start_ray_commands"])
    assert "--port=6380" in head and "6379" not in head


def test_rays_schema_does_reject_a_broken_yaml():
    config = yaml.safe_load((DEPLOY / "aws.yaml").read_text())
    config["max_workers"] = "many"
    with pytest.raises(Exception, match="many"):
        validate_config(prepare_config(config))


def test_serve_config_is_valid_and_builds_a_cluster_config():
    from ray.serve.schema import ServeDeploySchema

    from cluster.config import ClusterConfig

    schema = ServeDeploySchema.model_validate(yaml.safe_load((DEPLOY / "serve-config.yaml").read_text()))
    (app,) = schema.applications
    assert app.import_path == "cluster.app:build_app"
    config = ClusterConfig.model_validate(app.args["config_dict"])
    assert config.engine.random_weights is False and config.redis_url.startswith("redis://")
