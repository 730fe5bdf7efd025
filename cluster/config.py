"""The cluster's configuration: pydantic models, loadable from YAML, with clear errors.

The defaults are the embedded cluster `cacheopt serve` starts with no arguments: local
Ray, two CPU vLLM replicas of the local tiny model, no Redis, HTTP on 127.0.0.1:8000.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from replicas.policies import SIMULATOR_ONLY, check_policy_names


class ConfigError(ValueError):
    """A configuration a user wrote is wrong; the message says where and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineConfig(_Strict):
    """One replica's engine."""

    kind: Literal["vllm", "sim"] = "vllm"  # sim: the simulated engine, stepping in real time
    model: str = "models/tiny-llama"
    served_model_name: str = "tiny-llama"
    random_weights: bool = True  # load_format=dummy: real compute, meaningless text (said in /v1/models)
    block_size: int = Field(32, ge=1)
    kv_blocks: int | None = Field(256, ge=2)  # num_gpu_blocks_override; None: sized by vLLM
    max_model_len: int = Field(2048, ge=16)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(512, ge=1)
    kv_cache_space_gib: float = Field(1.0, gt=0)  # VLLM_CPU_KVCACHE_SPACE
    num_gpus: float = Field(0.0, ge=0)  # per replica, asked of Ray (1 on GPU nodes)
    latency_model: str = "tiny-llama-cpu"  # the policy's cost model and the simulated engine's step times (replicas.latency)

    @model_validator(mode="after")
    def _fits(self) -> EngineConfig:
        if self.kv_blocks is not None and (self.kv_blocks - 1) * self.block_size < self.max_model_len:
            raise ValueError(f"kv_blocks={self.kv_blocks} of {self.block_size} tokens cannot hold one request of "
                             f"max_model_len={self.max_model_len}")
        return self


class PolicyConfig(_Strict):
    name: str = "cacheopt"
    predictor_path: str | None = None  # a length-quantile table; None: the shipped conv-trace table
    confidence: float = Field(0.7, gt=0, lt=1)  # until the global scheduler has a rate
    default_slo: str = "chat"
    reserve_fraction: float = Field(0.01, ge=0, lt=0.5)  # the cluster-wide reserve, a share of all blocks
    # The global scheduler maps the arrival rate per replica, from low to high, onto p from p_max to p_min.
    rate_band_rps: tuple[float, float] = (8.0, 16.5)
    p_range: tuple[float, float] = (0.3, 0.9)

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
    redis_url: str | None = None  # None: the in-process reserve store
    max_queued_requests: int = Field(256, ge=1)  # per replica; beyond it: 429 with Retry-After
    # kv: by the replicas' KV snapshots (p2c when they are stale); p2c: power of two choices
    # on requests in flight, like Ray Serve's default router (for comparisons).
    router: Literal["kv", "p2c"] = "kv"
    engine: EngineConfig = EngineConfig()
    policy: PolicyConfig = PolicyConfig()


def load_config(path: Path | None = None, **overrides) -> ClusterConfig:
    """The YAML file at `path` (or the defaults), then `overrides` on top (CLI flags)."""
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
        return ClusterConfig.model_validate(data)
    except ValidationError as error:
        where = f"{path}: " if path else ""
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in error.errors())
        raise ConfigError(f"{where}{problems}") from None


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
