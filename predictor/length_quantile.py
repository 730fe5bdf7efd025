"""Length-only predictor: empirical output-length quantiles per prompt-length bucket and
SLO class.

For traces that carry token counts but no text. Fitted on a training split; the bound at
confidence p is the empirical p-quantile of the bucket's output lengths, and the
conditional bound for a request that already generated g tokens is the p-quantile of the
bucket's lengths that exceed g (the residual distribution of requests that reached g).
A (bucket, class) cell with too few samples falls back to the bucket over all classes.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from predictor.base import LengthPrediction, PredictionInput, check_confidence

# Prompt-length bucket edges in tokens, powers of two: [0, 128), [128, 256), ...
DEFAULT_EDGES = (128, 256, 512, 1024, 2048, 4096, 8192)


class LengthQuantilePredictor:
    name = "length"

    def __init__(self, lengths_by_bucket: Sequence[Sequence[int]], edges: Sequence[int] = DEFAULT_EDGES,
                 lengths_by_class: Mapping[tuple[int, str], Sequence[int]] | None = None):
        if len(lengths_by_bucket) != len(edges) + 1:
            raise ValueError(f"{len(lengths_by_bucket)} buckets for {len(edges)} edges; need edges + 1")
        self.edges = tuple(edges)
        self._sorted = [sorted(b) for b in lengths_by_bucket]
        self._by_class = {key: sorted(v) for key, v in (lengths_by_class or {}).items()}
        if not any(self._sorted):
            raise ValueError("no training samples")

    @classmethod
    def fit(cls, samples: Iterable[tuple[int, int] | tuple[int, int, str]], *,
            edges: Sequence[int] = DEFAULT_EDGES, min_samples: int = 50) -> LengthQuantilePredictor:
        """Fit on (prompt_tokens, output_tokens[, slo_class]) tuples. A bucket with fewer
        than `min_samples` borrows the samples of its nearest populated neighbours until it
        has enough, so sparse tails of the prompt distribution still get a sane quantile;
        a (bucket, class) cell is kept only if it has `min_samples` of its own."""
        buckets: list[list[int]] = [[] for _ in range(len(edges) + 1)]
        by_class: dict[tuple[int, str], list[int]] = {}
        total = 0
        for prompt_tokens, output_tokens, *slo_class in samples:
            index = bisect.bisect_right(edges, prompt_tokens)
            buckets[index].append(max(1, output_tokens))
            if slo_class:
                by_class.setdefault((index, slo_class[0]), []).append(max(1, output_tokens))
            total += 1
        if total == 0:
            raise ValueError("cannot fit a length predictor on zero samples")
        need = min(min_samples, total)
        pooled = []
        for i in range(len(buckets)):
            pool = list(buckets[i])
            radius = 1
            while len(pool) < need:
                for j in (i - radius, i + radius):
                    if 0 <= j < len(buckets):
                        pool.extend(buckets[j])
                radius += 1
            pooled.append(pool)
        kept = {key: lengths for key, lengths in by_class.items() if len(lengths) >= min_samples}
        return cls(pooled, edges, kept)

    def to_dict(self) -> dict:
        return {"kind": "length-quantile", "edges": list(self.edges), "buckets": self._sorted,
                "by_class": [[index, name, lengths] for (index, name), lengths in sorted(self._by_class.items())]}

    @classmethod
    def from_dict(cls, data: dict) -> LengthQuantilePredictor:
        if data.get("kind") != "length-quantile":
            raise ValueError(f"not a length-quantile table (kind={data.get('kind')!r})")
        by_class = {(index, name): lengths for index, name, lengths in data["by_class"]}
        return cls(data["buckets"], data["edges"], by_class)

    def save(self, path: Path) -> None:
        """A JSON table (no pickle): the vLLM adapter loads it in the engine process."""
        path.write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: Path) -> LengthQuantilePredictor:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"cannot load a length-quantile table from {path}: {error}") from None

    def _bucket(self, request: PredictionInput) -> list[int]:
        index = bisect.bisect_right(self.edges, request.prompt_tokens)
        return self._by_class.get((index, request.slo.name)) or self._sorted[index]

    def predict(self, request: PredictionInput, confidence: float) -> LengthPrediction:
        check_confidence(confidence)
        lengths = self._bucket(request)
        cap = request.max_tokens
        point = min(cap, _quantile(lengths, 0.5))
        bound = min(cap, max(point, _quantile(lengths, confidence)))
        return LengthPrediction(point_tokens=point, bound_tokens=bound)

    def conditional_bound(self, request: PredictionInput, generated_tokens: int, confidence: float) -> int:
        check_confidence(confidence)
        cap = request.max_tokens
        lengths = self._bucket(request)
        beyond = lengths[bisect.bisect_right(lengths, generated_tokens):]
        if beyond:
            bound = _quantile(beyond, confidence)
        else:
            # Longer than anything seen in training: grow geometrically, by a quarter.
            bound = generated_tokens + max(16, generated_tokens // 4)
        return max(min(cap, bound), min(cap, generated_tokens + 1))


def _quantile(sorted_values: Sequence[int], q: float) -> int:
    """The smallest sample value v with empirical CDF(v) >= q."""
    index = max(0, math.ceil(q * len(sorted_values)) - 1)
    return sorted_values[index]
