"""What the vLLM adapter needs to know, as plain JSON-able data, and the per-request keys.

The adapter runs inside vLLM's engine-core process, which vLLM starts itself (spawn), so
its configuration travels as `additional_config={"cacheopt": {...}}` (CLI:
`--additional-config`); this module turns that mapping into policy objects. Standard
library only: the bench and the cluster build settings without importing vllm.

Per-request data travels in `SamplingParams.extra_args` (OpenAI body: `vllm_xargs`), under
keys prefixed `cacheopt_` so that they never clash with vLLM's own.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from predictor.base import LengthPrediction, OutputLengthPredictor
from predictor.length_quantile import LengthQuantilePredictor
from replicas.config import CacheOptConfig, config_from_mapping
from replicas.latency import get_latency_model
from replicas.policies import make_policy
from replicas.policies.base import Policy
from replicas.request import Slo
from replicas.slo import SLO_CLASSES, slo_seconds

# extra_args keys read by the adapter.
XARG_SLO = "cacheopt_slo"  # SLO class name
XARG_MAX_TOKENS = "cacheopt_max_tokens"  # the cap the policy plans with (default: SamplingParams.max_tokens)
XARG_CONFIDENCE = "cacheopt_confidence"  # p, as last published by the global scheduler
XARG_POINT = "cacheopt_point_tokens"  # a prediction made upstream (e.g. from the prompt text) ...
XARG_BOUND = "cacheopt_bound_tokens"  # ... and its bound U_p; both or neither
XARG_RESERVE = "cacheopt_reserve_blocks"  # the replica's global-reserve lease, from the global scheduler
XARG_TRACEPARENT = "cacheopt_traceparent"  # W3C trace context: the engine's span joins the request's trace
XARG_LENGTH_TABLE = "cacheopt_length_table"  # version of the table at EngineSettings.length_table_path

log = logging.getLogger("cacheopt.engine_settings")

# stop_reason of a request the policy shed (refused after a bounded wait, before any token):
# finish_reason is `abort`; the serving layer answers 429 with Retry-After.
SHED_STOP_REASON = "cacheopt_shed"

# The H100 classes (replicas/slo.py); benchmarks pass classes scaled to their engine.
DEFAULT_SLO_CLASSES = slo_seconds(SLO_CLASSES)


@dataclass(frozen=True)
class EngineSettings:
    policy: str = "cacheopt"
    # A length-quantile table (LengthQuantilePredictor.save); None: bound = max_tokens.
    predictor_path: str | None = None
    latency_model: str = "tiny-llama-cpu"  # the policy's cost model (replicas.latency)
    slo_classes: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_SLO_CLASSES))
    default_slo: str = "chat"
    cacheopt: dict = field(default_factory=dict)  # CacheOptConfig overrides
    check_invariants: bool = False  # compare the ledger with vLLM's block pool every step
    step_log: str | None = None  # JSON-lines file: one row per step (shape, timing, decisions)
    snapshot_path: str | None = None  # JSON file the adapter keeps a fresh KVSnapshot in (the router reads it)
    # A length-quantile table the serving replica rewrites as online calibration refits it;
    # the engine loads it when a request carries a newer version (XARG_LENGTH_TABLE).
    length_table_path: str | None = None

    def __post_init__(self) -> None:
        if self.default_slo not in self.slo_classes:
            raise ValueError(f"default_slo={self.default_slo!r} is not among slo_classes {sorted(self.slo_classes)}")
        for name, (ttft_s, tbt_s) in self.slo_classes.items():
            if not (ttft_s > 0 and tbt_s > 0):
                raise ValueError(f"SLO class {name!r}: ttft_s={ttft_s} and tbt_s={tbt_s} must be > 0")
        config_from_mapping(CacheOptConfig, self.cacheopt)  # validates early, in the caller's process
        if self.predictor_path is not None and not Path(self.predictor_path).is_file():
            raise ValueError(f"predictor_path {self.predictor_path!r} is not a file")

    @classmethod
    def from_mapping(cls, values: dict | None) -> EngineSettings:
        values = dict(values or {})
        if "slo_classes" in values:
            values["slo_classes"] = {k: tuple(v) for k, v in values["slo_classes"].items()}
        return config_from_mapping(cls, values)

    def to_mapping(self) -> dict:
        return asdict(self)

    def as_additional_config(self) -> dict:
        return {"cacheopt": self.to_mapping()}

    def slo(self, name: str | None) -> Slo:
        name = name or self.default_slo
        try:
            ttft_s, tbt_s = self.slo_classes[name]
        except KeyError:
            raise ValueError(f"unknown SLO class {name!r}; known: {sorted(self.slo_classes)}") from None
        return Slo(name, ttft_s=ttft_s, tbt_s=tbt_s)

    def build_policy(self) -> Policy:
        predictor = ForwardedPredictor(self._base_predictor())
        return make_policy(self.policy, predictor=predictor, costs=get_latency_model(self.latency_model),
                           cacheopt_config=config_from_mapping(CacheOptConfig, self.cacheopt))

    def _base_predictor(self) -> OutputLengthPredictor:
        if self.predictor_path is None:
            return MaxTokensPredictor()
        return LengthQuantilePredictor.load(Path(self.predictor_path))


class MaxTokensPredictor:
    """No knowledge: the bound is the request's max_tokens (what vLLM V0 reserved)."""

    name = "max_tokens"

    def predict(self, request, confidence: float) -> LengthPrediction:
        return LengthPrediction(point_tokens=request.max_tokens, bound_tokens=request.max_tokens)

    def conditional_bound(self, request, generated_tokens: int, confidence: float) -> int:
        return request.max_tokens


class ForwardedPredictor:
    """Uses the prediction a request brought with it (`request.forwarded_prediction`, from
    extra_args) and asks `base` otherwise and for conditional bounds."""

    def __init__(self, base: OutputLengthPredictor):
        self.base = base
        self.name = f"forwarded+{base.name}"
        self.table_version = 0  # of the online-calibrated table in `base`; 0: the static one

    def use_table(self, base: OutputLengthPredictor, version: int) -> None:
        """Online calibration's refitted table replaces the base from now on."""
        self.base, self.table_version = base, version

    def predict(self, request, confidence: float) -> LengthPrediction:
        forwarded = getattr(request, "forwarded_prediction", None)
        if forwarded is None:
            return self.base.predict(request, confidence)
        point, bound = (min(request.max_tokens, max(1, t)) for t in forwarded)
        return LengthPrediction(point_tokens=point, bound_tokens=max(point, bound))

    def conditional_bound(self, request, generated_tokens: int, confidence: float) -> int:
        return self.base.conditional_bound(request, generated_tokens, confidence)


@dataclass(frozen=True)
class RequestHints:
    """What a request tells the policy through extra_args, parsed."""

    slo: Slo
    max_tokens: int
    confidence: float | None = None
    forwarded_prediction: tuple[int, int] | None = None
    reserve_blocks: int | None = None
    traceparent: str | None = None
    length_table: int | None = None  # the version of the calibrated table the replica has written

    @classmethod
    def parse(cls, extra_args: dict | None, settings: EngineSettings, *, max_tokens: int) -> tuple[RequestHints, list[str]]:
        """Hints and the problems found. Lenient: a bad hint is dropped (the default is
        used) and reported, because inside the engine an exception would stop serving
        everyone."""
        extra = extra_args or {}
        problems = []
        slo_name = extra.get(XARG_SLO)
        try:
            slo = settings.slo(slo_name if slo_name is None else str(slo_name))
        except ValueError as error:
            problems.append(str(error))
            slo = settings.slo(None)
        cap = extra.get(XARG_MAX_TOKENS, max_tokens)
        if not (isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1):
            problems.append(f"{XARG_MAX_TOKENS}={cap!r} must be an integer >= 1")
            cap = max_tokens
        confidence = extra.get(XARG_CONFIDENCE)
        if confidence is not None and not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
            problems.append(f"{XARG_CONFIDENCE}={confidence!r} must be a number in (0, 1)")
            confidence = None
        point, bound = extra.get(XARG_POINT), extra.get(XARG_BOUND)
        forwarded = None
        if point is not None or bound is not None:
            if (isinstance(point, int) and isinstance(bound, int) and not isinstance(point, bool)
                    and not isinstance(bound, bool) and 1 <= point <= bound):
                forwarded = (point, bound)
            else:
                problems.append(f"{XARG_POINT}={point!r} and {XARG_BOUND}={bound!r} must be integers with "
                                "1 <= point <= bound")
        reserve = extra.get(XARG_RESERVE)
        if reserve is not None and not (isinstance(reserve, int) and not isinstance(reserve, bool) and reserve >= 0):
            problems.append(f"{XARG_RESERVE}={reserve!r} must be an integer >= 0")
            reserve = None
        traceparent = extra.get(XARG_TRACEPARENT)
        if traceparent is not None and not isinstance(traceparent, str):
            problems.append(f"{XARG_TRACEPARENT} must be a string")
            traceparent = None
        table = extra.get(XARG_LENGTH_TABLE)
        if table is not None and not (isinstance(table, int) and not isinstance(table, bool) and table >= 1):
            problems.append(f"{XARG_LENGTH_TABLE}={table!r} must be an integer >= 1")
            table = None
        return cls(slo, cap, None if confidence is None else float(confidence), forwarded, reserve,
                   traceparent, table), problems


def apply_control(core, hints: RequestHints, settings: EngineSettings) -> None:
    """The global scheduler's knobs that a request carries: p, the reserve lease and the
    version of the online-calibrated length table."""
    if hints.confidence is not None and hasattr(core.policy, "set_confidence"):
        core.policy.set_confidence(hints.confidence)
    if hints.reserve_blocks is not None:
        core.ledger.set_reserve_target(min(hints.reserve_blocks, core.ledger.total_blocks - 1))
    predictor = getattr(core.policy, "predictor", None)
    if (hints.length_table is not None and settings.length_table_path and isinstance(predictor, ForwardedPredictor)
            and hints.length_table > predictor.table_version):
        try:
            table: OutputLengthPredictor = LengthQuantilePredictor.load(Path(settings.length_table_path))
        except ValueError as error:  # keep the table in use; inside the engine an exception would stop serving
            log.error("online calibration: %s", error)
            table = predictor.base
        switch_length_table(core, table, hints.length_table)


def switch_length_table(core, table: OutputLengthPredictor, version: int) -> None:
    """The policy predicts from online calibration's refitted `table` from now on (counted).
    A policy without a ForwardedPredictor predicts nothing and keeps what it has."""
    predictor = getattr(core.policy, "predictor", None)
    if isinstance(predictor, ForwardedPredictor):
        predictor.use_table(table, version)
        core.counters["length_table_switches"] += 1
