"""The cluster's configuration: pydantic models, loadable from YAML, with clear errors.

The defaults are the embedded cluster `cacheopt serve` starts with no arguments: local
Ray, two CPU vLLM replicas of the local tiny model, no Redis, HTTP on 127.0.0.1:8000.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cluster.routing import ROUTER_HEADROOM
from replicas.engines.config import EngineConfig
from replicas.policies import SIMULATOR_ONLY, check_policy_names

# Secrets from the environment (the `ray up` YAMLs set them on the head from files that
# never enter git), used where the flags and the YAML name none.
API_KEY_ENV = "CACHEOPT_API_KEY"  # comma-separated keys, as vLLM's VLLM_API_KEY (one key there)
REDIS_URL_ENV = "CACHEOPT_REDIS_URL"  # redis://[user:password@]host:port/db or rediss://
DEFAULT_PREDICTOR = Path(__file__).resolve().parents[1] / "predictor" / "data" / "length-conv.json"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ConfigError(ValueError):
    """A configuration a user wrote is wrong; the message says where and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PolicyConfig(_Strict):
    name: str = "cacheopt"
    predictor_path: str | None = None  # a length-quantile table; None: the shipped conv-trace table
    confidence: float = Field(0.7, gt=0, lt=1)  # until the global scheduler has a rate
    default_slo: str = "chat"
    reserve_fraction: float = Field(0.01, ge=0, lt=0.5)  # the cluster-wide reserve, a share of all blocks
    # The global scheduler maps the arrival rate per replica, from low to high, onto p from p_max to p_min.
    rate_band_rps: tuple[float, float] = (8.0, 16.5)
    p_range: tuple[float, float] = (0.3, 0.9)
    # Online calibration (predictor/online.py): once the deployment has finished this many
    # requests, the global scheduler refits the length table on the last calibration_window
    # of them and every engine switches to it. 0: the static table stays.
    calibration_min_samples: int = Field(200, ge=0)
    calibration_window: int = Field(2000, ge=1, le=100_000)

    @model_validator(mode="after")
    def _window_holds_the_samples(self) -> PolicyConfig:
        if self.calibration_min_samples > self.calibration_window:
            raise ValueError(f"calibration_min_samples={self.calibration_min_samples} exceeds "
                             f"calibration_window={self.calibration_window}")
        return self

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name in SIMULATOR_ONLY:
            raise ValueError(f"policy {name!r} needs true output lengths and runs in the simulator only")
        check_policy_names([name])
        return name


class ClusterConfig(_Strict):
    replicas: int = Field(2, ge=1, le=64)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    ray_address: str | None = None  # None: start a local Ray
    redis_url: str | None = None  # None: leases reach replicas only from the global scheduler
    max_queued_requests: int = Field(256, ge=1)  # per replica; beyond it: 429 with Retry-After
    # haproxy: Ray Serve's HAProxy in front of replicas that serve HTTP themselves;
    # serve-proxy: Serve's own Python proxy (cluster/ingress.py; docs/RESULTS.md 4.1-4.3).
    ingress: Literal["haproxy", "serve-proxy"] = "haproxy"
    # p2c: the ingress's own balancing (HAProxy: least connections; Serve's proxy: its
    # default router, power of two choices on queue length); kv: our router, load and
    # prefix affinity behind HAProxy (cluster.router; through cluster.route_service), opt-in
    # because it has not been shown to beat HAProxy's least connections on a real engine
    # (docs/RESULTS.md 4.3, 4.6, 4.7).
    router: Literal["kv", "p2c"] = "p2c"
    # router: kv ranks by load and cached prefix; true adds the rule's KV part, replicas with
    # KV room first (cluster.routing.rank_by_headroom), which did worse in the simulator
    # (docs/RESULTS.md 4.6, 4.7).
    router_headroom: bool = ROUTER_HEADROOM
    # Clients must send `Authorization: Bearer <one of these>` to /v1/* (vLLM's --api-key);
    # empty: no authentication (the embedded default binds loopback only). /health is always
    # open; /metrics is open unless metrics_require_key.
    api_keys: tuple[str, ...] = ()
    # Keys of trusted clients (a gateway): accepted wherever api_keys are, and they may send
    # an upstream output-length prediction in vllm_xargs (cluster.openai_api.TRUSTED_CLIENT_XARGS).
    trusted_api_keys: tuple[str, ...] = ()
    metrics_require_key: bool = False
    # Refuse to deploy without API keys (deploy/serve-config.yaml sets it: its proxy listens
    # on every interface, and a missing $CACHEOPT_API_KEY must not leave the cluster open).
    require_api_keys: bool = False
    # A larger body gets 413 before it is read (a prompt of 128k tokens is about 0.5 MiB).
    max_request_body_bytes: int = Field(2 * 1024 * 1024, ge=1024)
    # Ray resources each replica asks for besides its GPUs, e.g. {"gpu_node": 1} to place
    # replicas only on nodes started with `ray start --resources='{"gpu_node": 8}'`.
    replica_resources: dict[str, float] = {}
    # Where Serve runs its HTTP proxies: on every node (Ray's default: a load balancer may
    # send clients to any node) or on the head only (several nodes on one machine share a port).
    proxy_location: Literal["EveryNode", "HeadOnly"] = "EveryNode"
    engine: EngineConfig = EngineConfig()
    policy: PolicyConfig = PolicyConfig()

    @model_validator(mode="after")
    def _headroom_needs_the_kv_router(self) -> ClusterConfig:
        if self.router_headroom != ROUTER_HEADROOM and self.router != "kv":
            raise ValueError(f"router_headroom: {str(self.router_headroom).lower()} changes router: kv only; "
                             "set router: kv or drop it")
        return self

    @field_validator("api_keys", "trusted_api_keys")
    @classmethod
    def _usable_keys(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        if any(not k or k != k.strip() or not k.isprintable() for k in keys):
            raise ValueError("API keys must be non-empty printable strings without surrounding spaces")
        return keys

    def engine_settings(self):
        """What each replica's engine is told about the policy (replicas.engine_settings)."""
        from replicas.engine_settings import EngineSettings

        predictor = self.policy.predictor_path or (str(DEFAULT_PREDICTOR) if DEFAULT_PREDICTOR.is_file() else None)
        return EngineSettings(policy=self.policy.name, predictor_path=predictor,
                              latency_model=self.engine.latency_model, default_slo=self.policy.default_slo,
                              cacheopt={"confidence": self.policy.confidence})


def load_config(path: Path | None = None, **overrides) -> ClusterConfig:
    """The YAML file at `path` (or the defaults), then `overrides` on top (CLI flags), then
    the secrets neither names from the environment (`secrets_from_environment`)."""
    import yaml

    data: dict = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as error:
            raise ConfigError(f"cannot read {path}: {error.strerror}") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, not {type(loaded).__name__}")
        data = loaded or {}
    _merge(data, overrides)
    try:
        return ClusterConfig.model_validate(secrets_from_environment(data))
    except ValidationError as error:
        where = f"{path}: " if path else ""
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in error.errors())
        raise ConfigError(f"{where}{problems}") from None


def secrets_from_environment(data: dict) -> dict:
    """`data` with the API keys from $CACHEOPT_API_KEY and the Redis URL from
    $CACHEOPT_REDIS_URL where it names none."""
    data = dict(data)
    if not data.get("api_keys") and os.environ.get(API_KEY_ENV):
        data["api_keys"] = [k.strip() for k in os.environ[API_KEY_ENV].split(",") if k.strip()]
    if not data.get("redis_url") and os.environ.get(REDIS_URL_ENV):
        data["redis_url"] = os.environ[REDIS_URL_ENV]
    return data


def _merge(base: dict, overrides: dict) -> None:
    """Nested overrides on top of `base`; None means "not given"."""
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict):
            current = base.get(key)
            base[key] = current = dict(current) if isinstance(current, dict) else {}
            _merge(current, value)
        else:
            base[key] = value
