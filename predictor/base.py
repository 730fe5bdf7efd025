"""The predictor interface the replica policy calls. Stdlib only: it sits on the policy path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class SloLike(Protocol):
    @property
    def name(self) -> str: ...


class PredictionInput(Protocol):
    """What a predictor may read of a request (replicas.request.Request satisfies it)."""

    prompt_tokens: int
    max_tokens: int
    prompt_text: str | None  # None when the workload carries token counts only
    predicted_output_tokens: int  # the point estimate made at arrival (0 before)
    # Known only in simulation; only the oracle reads it.
    true_output_tokens: int | None

    @property
    def slo(self) -> SloLike: ...  # read-only here: a request's class is any object with a name


@dataclass(frozen=True, slots=True)
class LengthPrediction:
    point_tokens: int  # the estimate Ô
    bound_tokens: int  # U_p: Pr(O <= U_p) >= confidence, clamped to max_tokens


class OutputLengthPredictor(Protocol):
    """Predicts output length in tokens.

    Contract: 1 <= point_tokens <= bound_tokens <= max_tokens for `predict`; for
    `conditional_bound`, generated_tokens < result <= max_tokens whenever
    generated_tokens < max_tokens (a request that has generated g tokens and is still
    running needs room for at least one more)."""

    name: str

    def predict(self, request: PredictionInput, confidence: float) -> LengthPrediction: ...

    def conditional_bound(self, request: PredictionInput, generated_tokens: int, confidence: float) -> int: ...


def check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence} must lie in (0, 1)")
