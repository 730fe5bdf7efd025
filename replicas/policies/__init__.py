"""Scheduling policies by name: `vllm`, `sglang`, `s3`, `lcf`, `cacheopt`, `oracle`, and the
CacheOPT ablations `cacheopt-no_<mechanism>`."""

from __future__ import annotations

from predictor.base import OutputLengthPredictor
from predictor.oracle import OraclePredictor
from replicas.config import CacheOptConfig
from replicas.policies.base import Policy
from replicas.policies.cacheopt import CacheOptPolicy, CostModel
from replicas.policies.lcf import LcfPolicy
from replicas.policies.s3 import S3Policy
from replicas.policies.sglang import SglangPolicy
from replicas.policies.vllm import VllmPolicy

POLICY_NAMES = ("vllm", "sglang", "s3", "lcf", "cacheopt", "oracle")
ABLATION_NAMES = tuple(f"cacheopt-no_{m}" for m in CacheOptConfig.MECHANISMS)


def make_policy(name: str, *, predictor: OutputLengthPredictor | None = None,
                costs: CostModel | None = None,
                cacheopt_config: CacheOptConfig = CacheOptConfig()) -> Policy:
    """A fresh policy object. `predictor` is required by `s3` and `cacheopt*`."""
    if name == "vllm":
        return VllmPolicy()
    if name == "lcf":
        return LcfPolicy()
    if name == "sglang":
        return SglangPolicy()
    if name == "oracle":
        return CacheOptPolicy(OraclePredictor(), cacheopt_config, costs, name="oracle")
    if name in ("s3", "cacheopt") or name in ABLATION_NAMES:
        if predictor is None:
            raise ValueError(f"policy {name!r} needs an output-length predictor")
        if name == "s3":
            return S3Policy(predictor)
        config = cacheopt_config
        if name != "cacheopt":
            config = config.without(name.removeprefix("cacheopt-no_"))
        return CacheOptPolicy(predictor, config, costs, name=name)
    known = ", ".join(POLICY_NAMES + ABLATION_NAMES)
    raise ValueError(f"unknown policy {name!r}; choose one of: {known}")


__all__ = ["ABLATION_NAMES", "POLICY_NAMES", "Policy", "make_policy"]
