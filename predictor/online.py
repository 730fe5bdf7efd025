"""Online calibration: the served model is rarely the one the predictor was trained on, so
the bound is refitted on the served model's own completions.

Both refitters keep the last `window` completions of one deployment and, from
`min_samples` of them on, refit every `refit_every` new ones; until then they have
nothing and the static predictor stays.

- `OnlineCalibration`, for a predictor with a point estimate (the text model): the same
  bound method (predictor.bounds.fit_bound) on (point estimate, true length) pairs.
- `OnlineLengthTable`, for the length-only table the serving engines use: the table
  itself, refitted on (prompt tokens, output tokens, SLO class). The global scheduler
  runs one per deployment and sends each new version to the replicas with p
  (global_scheduler/control.py); their engines switch to it.

Split conformal, and an empirical quantile, keep their guarantee here as long as the
recent requests are exchangeable with the next ones; a drifting workload is what the
window is for.

`leave_one_generator_out` measures it on AlpacaEval: the text model is trained and its
static bound calibrated without one generator's answers, then that generator is served.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from predictor.bounds import ResidualBound, fit_bound
from predictor.length_quantile import LengthQuantilePredictor

DEFAULT_WINDOW = 2000
DEFAULT_MIN_SAMPLES = 200
DEFAULT_REFIT_EVERY = 50  # completions between refits (a fit sorts the window)


class _RefitWindow:
    """The last `window` rows, and when a refit is due."""

    def __init__(self, *, window: int, min_samples: int, refit_every: int):
        if not 0 < min_samples <= window or refit_every < 1:
            raise ValueError(f"need 0 < min_samples={min_samples} <= window={window} and refit_every >= 1")
        self.min_samples, self.window, self.refit_every = min_samples, window, refit_every
        self._rows: deque[tuple] = deque(maxlen=window)
        self._since_fit = 0
        self.version = 0  # increases with every refit: replicas take a fit once per version

    @property
    def samples(self) -> int:
        return len(self._rows)

    def _add(self, row: tuple) -> None:
        self._rows.append(row)
        self._since_fit += 1

    def _refit_due(self) -> bool:
        """True, counting a new version, when the window should be fitted now."""
        if len(self._rows) < self.min_samples or (self.version and self._since_fit < self.refit_every):
            return False
        self._since_fit = 0
        self.version += 1
        return True


class OnlineCalibration(_RefitWindow):
    def __init__(self, method: str = "conformal", *, window: int = DEFAULT_WINDOW,
                 min_samples: int = DEFAULT_MIN_SAMPLES, refit_every: int = DEFAULT_REFIT_EVERY,
                 num_buckets: int = 4):
        super().__init__(window=window, min_samples=min_samples, refit_every=refit_every)
        self.method, self.num_buckets = method, num_buckets
        self._bound: ResidualBound | None = None

    def observe(self, point: float, true: float) -> None:
        if point >= 1 and true >= 1 and math.isfinite(point) and math.isfinite(true):
            self._add((point, true))

    def observe_many(self, pairs: Sequence[Sequence[float]]) -> None:
        for point, true in pairs:
            self.observe(point, true)

    def bound(self) -> ResidualBound | None:
        """The bound fitted on the recent completions; None before `min_samples`."""
        if self._refit_due():
            points, truths = zip(*self._rows, strict=True)
            buckets = max(1, min(self.num_buckets, len(self._rows) // 50))  # >= 50 per bucket: p = 0.95 certifiable
            self._bound = fit_bound(self.method, points, truths, num_buckets=buckets)
        return self._bound


class OnlineLengthTable(_RefitWindow):
    """The serving engines' length-only table (predictor/length_quantile.py), refitted on
    the served model's completions. A request cut off by its max_tokens counts at the
    length it was allowed: the table learns lengths as served, which is low for a later
    request allowed more (its conditional bound then grows it)."""

    def __init__(self, *, window: int = DEFAULT_WINDOW, min_samples: int = DEFAULT_MIN_SAMPLES,
                 refit_every: int = DEFAULT_REFIT_EVERY):
        super().__init__(window=window, min_samples=min_samples, refit_every=refit_every)
        self.latest: dict | None = None  # the last fit, without refitting

    def observe(self, prompt_tokens: int, output_tokens: int, slo: str) -> None:
        if isinstance(prompt_tokens, int) and isinstance(output_tokens, int) and output_tokens >= 1 \
                and prompt_tokens >= 0 and isinstance(slo, str):
            self._add((prompt_tokens, output_tokens, slo))

    def observe_many(self, rows: Sequence[Sequence]) -> None:
        for row in rows:
            if len(row) == 3:
                self.observe(*row)

    def table(self) -> dict | None:
        """The table fitted on the recent completions (LengthQuantilePredictor.to_dict),
        None before `min_samples`; `version` numbers it."""
        if self._refit_due():
            self.latest = LengthQuantilePredictor.fit(self._rows, min_samples=min(50, self.min_samples)).to_dict()
        return self.latest


@dataclass(frozen=True)
class CoverageFigures:
    confidence: float
    static_coverage: float
    online_coverage: float
    static_padding_tokens: float  # mean of bound - point
    online_padding_tokens: float


def bound_tokens(bound: ResidualBound, point: float, confidence: float, cap: int) -> int:
    upper = bound.upper(point, confidence)
    return cap if math.isinf(upper) else min(cap, max(round(point), math.ceil(upper)))


def leave_one_generator_out(held_out: str, *, confidences: Sequence[float] = (0.8, 0.9, 0.95),
                            after: int = DEFAULT_MIN_SAMPLES, orders: int = 20, seed: int = 0,
                            max_tokens: int = 2048, data_dir=None) -> dict:
    """Train on every generator but `held_out` (training prompts), calibrate the static
    conformal bound on their calibration prompts, then serve `held_out`'s answers to the
    prompts the model never saw (calibration and test prompts) in `orders` random orders:
    the online bound is fitted on the first `after` completions and both bounds are
    measured on the rest. Coverage and padding are means over the orders."""
    from predictor.alpaca import DATA_DIR, load_alpaca, split_by_prompt
    from predictor.text_model import TextLengthModel

    records = load_alpaca(data_dir or DATA_DIR)
    generators = sorted({r.generator for r in records})
    if held_out not in generators:
        raise ValueError(f"unknown generator {held_out!r}; AlpacaEval has {', '.join(generators)}")
    train, calibration, test = split_by_prompt(records, seed=seed)
    model = TextLengthModel.fit([r for r in train if r.generator != held_out], seed=seed)
    known = [r for r in calibration if r.generator != held_out]
    static = fit_bound("conformal", [model.predict_tokens(r.instruction, r.generator) for r in known],
                       [r.output_tokens for r in known])
    # The served model is new to the predictor: an unknown generator gets no one-hot, the
    # prediction of the average training generator (predictor/text_model.py).
    stream = [r for r in calibration + test if r.generator == held_out]
    if len(stream) <= after:
        raise ValueError(f"{held_out}: {len(stream)} completions, need more than {after}")
    served = [(max(1.0, model.predict_tokens(r.instruction, held_out)), min(r.output_tokens, max_tokens))
              for r in stream]
    rng = random.Random(seed)
    sums: dict[float, list[float]] = {p: [0.0, 0.0, 0.0, 0.0] for p in confidences}
    for _ in range(orders):
        rng.shuffle(served)
        online = OnlineCalibration(min_samples=after)
        online.observe_many(served[:after])
        fitted = online.bound()
        assert fitted is not None
        rest = served[after:]
        for p in confidences:
            s = sums[p]
            for point, true in rest:
                b_static, b_online = bound_tokens(static, point, p, max_tokens), bound_tokens(fitted, point, p, max_tokens)
                s[0] += true <= b_static
                s[1] += true <= b_online
                s[2] += b_static - point
                s[3] += b_online - point
    n = orders * (len(served) - after)
    figures = [CoverageFigures(p, s[0] / n, s[1] / n, s[2] / n, s[3] / n) for p, s in sums.items()]
    return {"held_out": held_out, "completions": len(served), "after": after,
            "orders": orders, "figures": [f.__dict__ for f in figures]}
