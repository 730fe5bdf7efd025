"""Scheduling policies by name, from one registry.

Baselines: `vllm` (vLLM V1's scheduler), `vllm-2048` (the same with a 2,048-token step
budget, Sarathi-style), `sglang`, `s3`, `lcf`, `edf` (CacheOPT's SLO queue, step budget and
victims with vLLM's KV handling), `past-future` (LightLLM's projected-peak admission from
the history of output lengths). CacheOPT: `cacheopt` (the default design), the two designs
by name (`cacheopt-peak`, `cacheopt-locked`), `oracle` (CacheOPT with the true lengths,
simulator only), and the ablations `cacheopt-no_<mechanism>` of the default design.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from predictor.base import OutputLengthPredictor
from predictor.oracle import OraclePredictor
from replicas.config import CacheOptConfig
from replicas.latency import LatencyModel
from replicas.policies.base import Policy
from replicas.policies.cacheopt import CacheOptPolicy
from replicas.policies.cacheopt_locked import LockedCacheOptPolicy
from replicas.policies.edf import EdfPolicy
from replicas.policies.lcf import LcfPolicy
from replicas.policies.past_future import PastFuturePolicy
from replicas.policies.s3 import S3Policy
from replicas.policies.sglang import SglangPolicy
from replicas.policies.vllm import Vllm2048Policy, VllmPolicy


@dataclass(frozen=True)
class PolicyContext:
    """What a policy may be built from; each factory takes only what it needs."""

    name: str
    predictor: OutputLengthPredictor | None
    costs: LatencyModel | None
    config: CacheOptConfig


def _cacheopt(ctx: PolicyContext, config: CacheOptConfig, predictor: OutputLengthPredictor | None = None) -> Policy:
    predictor = predictor or ctx.predictor
    if predictor is None:
        raise ValueError(f"policy {ctx.name!r} needs an output-length predictor")
    cls = LockedCacheOptPolicy if config.design == "locked" else CacheOptPolicy
    return cls(predictor, config, ctx.costs, name=ctx.name)


def _s3(ctx: PolicyContext) -> Policy:
    if ctx.predictor is None:
        raise ValueError("policy 's3' needs an output-length predictor")
    return S3Policy(ctx.predictor)


REGISTRY: dict[str, Callable[[PolicyContext], Policy]] = {
    "vllm": lambda ctx: VllmPolicy(),
    "vllm-2048": lambda ctx: Vllm2048Policy(),
    "sglang": lambda ctx: SglangPolicy(),
    "s3": _s3,
    "lcf": lambda ctx: LcfPolicy(),
    "edf": lambda ctx: EdfPolicy(ctx.config, ctx.costs, name=ctx.name),
    "past-future": lambda ctx: PastFuturePolicy(),
    "cacheopt": lambda ctx: _cacheopt(ctx, ctx.config),
    "cacheopt-peak": lambda ctx: _cacheopt(ctx, replace(ctx.config, design="peak")),
    "cacheopt-locked": lambda ctx: _cacheopt(ctx, replace(ctx.config, design="locked")),
    "oracle": lambda ctx: _cacheopt(ctx, ctx.config, OraclePredictor()),
}
# The policies a sweep runs by default, baselines first.
POLICY_NAMES = ("vllm", "vllm-2048", "sglang", "s3", "lcf", "edf", "past-future", "cacheopt", "oracle")
# Real engines do not reveal true lengths.
SIMULATOR_ONLY = ("oracle",)


def ablation_names(config: CacheOptConfig = CacheOptConfig()) -> tuple[str, ...]:
    """The other design, then each mechanism of the default design switched off."""
    other = "cacheopt-locked" if config.design == "peak" else "cacheopt-peak"
    return (other, *(f"cacheopt-no_{m}" for m in config.mechanisms()))


# The ablations of the default configuration and of the locked design.
ABLATION_NAMES = tuple(dict.fromkeys(ablation_names(CacheOptConfig(design="peak"))
                                     + ablation_names(CacheOptConfig(design="locked"))))


def known_policy(name: str) -> bool:
    """A registered policy, or `cacheopt-no_<mechanism>` for any mechanism (whether the
    configuration at hand has it on is checked when the policy is built)."""
    return name in REGISTRY or name.removeprefix("cacheopt-no_") in CacheOptConfig.MECHANISMS


def check_policy_names(names, *, allowed_extra: tuple[str, ...] = ()) -> None:
    """ValueError naming the first unknown policy and the known ones."""
    for name in names:
        if not (known_policy(name) or name in allowed_extra):
            known = ", ".join(sorted(set(REGISTRY) | set(ABLATION_NAMES)))
            raise ValueError(f"unknown policy {name!r}; choose from: {known}")


def make_policy(name: str, *, predictor: OutputLengthPredictor | None = None,
                costs: LatencyModel | None = None,
                cacheopt_config: CacheOptConfig = CacheOptConfig()) -> Policy:
    """A fresh policy object. `predictor` is required by `s3` and `cacheopt*`."""
    if name.startswith("cacheopt-no_"):
        check_policy_names([name])
        mechanism = name.removeprefix("cacheopt-no_")
        config = cacheopt_config
        if mechanism in CacheOptConfig.LOCKED_ONLY:
            config = replace(config, design="locked")  # reuse and top-up exist in the locked design only
        return _cacheopt(PolicyContext(name, predictor, costs, cacheopt_config), config.without(mechanism))
    check_policy_names([name])
    return REGISTRY[name](PolicyContext(name, predictor, costs, cacheopt_config))


__all__ = ["ABLATION_NAMES", "POLICY_NAMES", "REGISTRY", "SIMULATOR_ONLY", "Policy", "ablation_names",
           "check_policy_names", "known_policy", "make_policy"]
