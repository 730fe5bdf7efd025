"""A predictor made of a point model and a calibrated residual bound."""

from __future__ import annotations

import math
from collections.abc import Callable

from predictor.base import LengthPrediction, PredictionInput
from predictor.bounds import ResidualBound


class PointBoundPredictor:
    """Ô from `point_model`, U_p from `bound`, both clamped to [1, max_tokens]."""

    def __init__(self, name: str, point_model: Callable[[PredictionInput], float], bound: ResidualBound):
        self.name = name
        self.point_model = point_model
        self.bound = bound

    def predict(self, request: PredictionInput, confidence: float) -> LengthPrediction:
        cap = request.max_tokens
        point = min(cap, max(1, round(self.point_model(request))))
        upper = self.bound.upper(point, confidence)
        bound = cap if math.isinf(upper) else min(cap, max(point, math.ceil(upper)))
        return LengthPrediction(point_tokens=point, bound_tokens=bound)

    def conditional_bound(self, request: PredictionInput, generated_tokens: int, confidence: float) -> int:
        cap = request.max_tokens
        point = request.predicted_output_tokens or max(1, round(self.point_model(request)))
        upper = self.bound.conditional_upper(point, generated_tokens, confidence)
        if math.isinf(upper):
            # Longer than anything calibrated: grow geometrically, by a quarter.
            upper = generated_tokens + max(16, generated_tokens // 4)
        return max(min(cap, math.ceil(upper)), min(cap, generated_tokens + 1))
