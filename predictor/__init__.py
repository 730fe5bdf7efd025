"""Output-length predictors with confidence bounds (DESIGN section 4.1)."""

from predictor.base import LengthPrediction, OutputLengthPredictor, PredictionInput
from predictor.length_quantile import LengthQuantilePredictor
from predictor.oracle import OraclePredictor

__all__ = [
    "LengthPrediction",
    "LengthQuantilePredictor",
    "OraclePredictor",
    "OutputLengthPredictor",
    "PredictionInput",
]
