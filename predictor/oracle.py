"""The oracle: knows the true output length. An upper bound for what prediction can give."""

from __future__ import annotations

from predictor.base import LengthPrediction, PredictionInput


class OraclePredictor:
    name = "oracle"

    def predict(self, request: PredictionInput, confidence: float) -> LengthPrediction:
        true = _true_length(request)
        return LengthPrediction(point_tokens=true, bound_tokens=true)

    def conditional_bound(self, request: PredictionInput, generated_tokens: int, confidence: float) -> int:
        return max(_true_length(request), min(generated_tokens + 1, request.max_tokens))


def _true_length(request: PredictionInput) -> int:
    if request.true_output_tokens is None:
        raise ValueError("the oracle predictor needs true_output_tokens (simulation only)")
    return max(1, min(request.true_output_tokens, request.max_tokens))
