"""Point model of output length from the request text: regularised median regression on
log(tokens).

Features, all computable in tens of microseconds per request (no model, no vocabulary
beyond the tokenizer the server already has):
- log1p(prompt tokens) and its square: long prompts (documents to summarise, code to fix)
  get short answers, bare questions get long ones;
- instruction-type indicators (INSTRUCTION_TYPES), chosen by looking at which words move
  the per-prompt length of AlpacaEval answers most (e.g. "rewrite ... sentence" is about
  3x shorter than average, "explain how" 1.5x longer);
- the generator as a one-hot, since models differ in verbosity (Llama-2-7B is terse,
  GPT-4 wordy) and the model is known at serving time;
- hashed lower-cased word unigrams and bigrams, `zlib.crc32` into 2**hash_bits buckets
  (crc32 rather than hash(): Python salts str hashes per process).
The AlpacaEval subset name is not a feature: a server never sees it.

The regressor is a linear model on log(output tokens) with a ridge penalty per feature
group, fitted with numpy only: least squares by conjugate gradients on the sparse design,
then a few iteratively reweighted steps that turn it into least absolute deviation. Why
LAD: the log lengths are skewed left (some answers are one line), so the least-squares
mean sits below the median, and exp(mean) lost to the per-generator median baseline
with prompt length alone; the median is what minimises absolute error in tokens, and it
is invariant under exp. On AlpacaEval (seed 0 split) LAD cut the calibration MAE from
160 to 154 tokens. Fitting is deterministic: no random state is involved (`seed` is only
recorded for the artifact). The prediction path is plain Python over a list of weights:
no numpy call per request, no pickle, no sklearn.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from predictor.alpaca import AlpacaRecord
from predictor.tokens import count_tokens

MODEL_KIND = "ridge-lad-log-hashed-ngrams"

_WORD = re.compile(r"[a-z0-9']+")

# name -> (words that trigger it anywhere, words that trigger it only as the first word).
INSTRUCTION_TYPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "how": ((), ("how",)),
    "explain": (("explain", "describe", "why", "explanation", "difference", "compare"), ()),
    "short_question": ((), ("who", "when", "where", "which", "is", "are", "does", "do", "did", "was")),
    "list": (("list", "ideas", "ways", "tips", "steps", "examples", "suggest", "recommend"), ()),
    "write": (("write", "create", "compose", "draft", "generate", "design"), ()),
    "long_form": (("essay", "story", "article", "blog", "post", "poem", "letter", "recipe", "plan", "guide"), ()),
    "code": (("code", "function", "program", "python", "javascript", "sql", "script", "implement"), ()),
    "rewrite": (("rewrite", "paraphrase", "rephrase", "correct", "edit", "translate", "convert"), ()),
    "summarize": (("summarize", "summarise", "summary", "brief", "briefly", "short", "concise"), ()),
    "classify": (("classify", "categorize", "identify", "extract", "given", "sentence", "word", "words"), ()),
    "greeting": ((), ("hi", "hello", "hey")),
}


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """Where each feature lives in the weight vector: dense features, then generators,
    then 2**hash_bits hashed n-gram buckets."""

    generators: tuple[str, ...]
    hash_bits: int = 16
    ngram_max: int = 2
    instruction_types: tuple[str, ...] = tuple(INSTRUCTION_TYPES)

    def __post_init__(self) -> None:
        if not 14 <= self.hash_bits <= 18:
            raise ValueError(f"hash_bits={self.hash_bits} must be in [14, 18]")
        if not 1 <= self.ngram_max <= 3:
            raise ValueError(f"ngram_max={self.ngram_max} must be 1, 2 or 3")
        if not self.generators or len(set(self.generators)) != len(self.generators):
            raise ValueError(f"generators={self.generators} must be non-empty and distinct")
        unknown = set(self.instruction_types) - set(INSTRUCTION_TYPES)
        if unknown:
            raise ValueError(f"unknown instruction types {sorted(unknown)}; known: {sorted(INSTRUCTION_TYPES)}")

    @property
    def num_dense(self) -> int:  # intercept, log prompt, its square, type indicators
        return 3 + len(self.instruction_types)

    @property
    def hash_offset(self) -> int:
        return self.num_dense + len(self.generators)

    @property
    def num_features(self) -> int:
        return self.hash_offset + (1 << self.hash_bits)

    def to_json(self) -> dict[str, Any]:
        return {
            "generators": list(self.generators),
            "hash_bits": self.hash_bits,
            "hash": "zlib.crc32 of the space-joined lower-case words, modulo 2**hash_bits",
            "ngram_max": self.ngram_max,
            "word_pattern": _WORD.pattern,
            # A list, not a dict: the order is the column order, and JSON writers may sort keys.
            "instruction_types": [{"name": t, "any": list(INSTRUCTION_TYPES[t][0]),
                                   "first": list(INSTRUCTION_TYPES[t][1])} for t in self.instruction_types],
            "dense": ["intercept", "log1p_prompt_tokens", "log1p_prompt_tokens_sq",
                      *(f"type_{t}" for t in self.instruction_types)],
        }

    @classmethod
    def from_json(cls, meta: dict[str, Any]) -> FeatureSpec:
        # The indicators' word lists live in code; a model trained with other lists would
        # silently read the wrong columns, so they must match exactly.
        types = meta["instruction_types"]
        for t in types:
            name = t["name"]
            if name not in INSTRUCTION_TYPES or [list(w) for w in INSTRUCTION_TYPES[name]] != [t["any"], t["first"]]:
                raise ValueError(f"instruction type {name!r} in the metadata differs from this code's definition")
        if meta.get("word_pattern") != _WORD.pattern:
            raise ValueError(f"word pattern {meta.get('word_pattern')!r} differs from this code's {_WORD.pattern!r}")
        return cls(generators=tuple(meta["generators"]), hash_bits=int(meta["hash_bits"]),
                   ngram_max=int(meta["ngram_max"]), instruction_types=tuple(t["name"] for t in types))


@dataclass(frozen=True, slots=True)
class Hyper:
    """Ridge penalties per feature group (the intercept is unpenalised) and the LAD steps.
    A larger penalty on the hashed n-grams than on the dense features keeps 483 training
    prompts from being memorised word by word. Defaults: the best calibration MAE of a
    small grid (alpha_hash 0.3..30, alpha_dense 0.3..30, 1..3-grams, 2**14..2**18
    buckets); the MAE was flat within ~1 token around them. `lad_iters=0` is plain ridge.
    `lad_delta` floors |residual| in the IRLS weights (log units, ~5% of the length)."""

    alpha_dense: float = 1.0
    alpha_generator: float = 1.0
    alpha_hash: float = 3.0
    lad_iters: int = 8
    lad_delta: float = 0.05
    max_iter: int = 500
    tol: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("alpha_dense", "alpha_generator", "alpha_hash", "tol", "lad_delta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.lad_iters < 0:
            raise ValueError(f"lad_iters={self.lad_iters} must be >= 0")
        if self.max_iter < 1:
            raise ValueError(f"max_iter={self.max_iter} must be >= 1")


def _features(spec: FeatureSpec, generator_index: dict[str, int], instruction: str,
              generator: str) -> tuple[list[int], list[float]]:
    """Sparse (column, value) pairs of one request. Unknown generators get no one-hot (the
    average generator); the model never raises at serving time for a new name."""
    log_prompt = math.log1p(count_tokens(instruction))
    cols = [0, 1, 2]
    vals = [1.0, log_prompt, log_prompt * log_prompt / 10.0]  # /10 keeps the scales alike
    words = _WORD.findall(instruction.lower())
    word_set = set(words)
    first = words[0] if words else ""
    for k, t in enumerate(spec.instruction_types):
        anywhere, as_first = INSTRUCTION_TYPES[t]
        if first in as_first or not word_set.isdisjoint(anywhere):
            cols.append(3 + k)
            vals.append(1.0)
    g = generator_index.get(generator)
    if g is not None:
        cols.append(spec.num_dense + g)
        vals.append(1.0)
    buckets: set[int] = set()
    mask = (1 << spec.hash_bits) - 1
    for n in range(1, spec.ngram_max + 1):
        for i in range(len(words) - n + 1):
            buckets.add(zlib.crc32(" ".join(words[i : i + n]).encode()) & mask)
    if buckets:
        # Presence, scaled so a long prompt's n-grams together weigh as much as a short
        # one's: a long prompt is not "more" of every word it contains.
        weight = 1.0 / math.sqrt(len(buckets))
        offset = spec.hash_offset
        for b in sorted(buckets):
            cols.append(offset + b)
            vals.append(weight)
    return cols, vals


@dataclass(slots=True)
class TextLengthModel:
    spec: FeatureSpec
    weights: np.ndarray  # float64, shape (spec.num_features,), on log(output tokens)
    hyper: Hyper = field(default_factory=Hyper)
    seed: int = 0
    _weights_list: list[float] = field(init=False, repr=False)
    _generator_index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.weights.shape != (self.spec.num_features,):
            raise ValueError(f"weights shape {self.weights.shape} != ({self.spec.num_features},) for {self.spec}")
        if not np.all(np.isfinite(self.weights)):
            raise ValueError("weights contain NaN or inf")
        # Python floats: indexing a list is ~10x faster than a numpy array per element.
        self._weights_list = self.weights.tolist()
        self._generator_index = {g: i for i, g in enumerate(self.spec.generators)}

    @classmethod
    def fit(cls, train_records: Sequence[AlpacaRecord], *, seed: int = 0, hash_bits: int = 16,
            ngram_max: int = 2, instruction_types: Sequence[str] = tuple(INSTRUCTION_TYPES),
            **hyper: Any) -> TextLengthModel:
        """Fit on `train_records`; `hyper` overrides the fields of `Hyper`."""
        if not train_records:
            raise ValueError("cannot fit a text length model on zero records")
        unknown = sorted(set(hyper) - {f.name for f in dataclasses.fields(Hyper)})
        if unknown:
            raise ValueError(f"unknown hyperparameters {unknown}; known: {[f.name for f in dataclasses.fields(Hyper)]}")
        h = Hyper(**hyper)
        spec = FeatureSpec(generators=tuple(sorted({r.generator for r in train_records})), hash_bits=hash_bits,
                           ngram_max=ngram_max, instruction_types=tuple(instruction_types))
        index = {g: i for i, g in enumerate(spec.generators)}
        rows: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        for i, r in enumerate(train_records):
            c, v = _features(spec, index, r.instruction, r.generator)
            rows.extend([i] * len(c))
            cols.extend(c)
            vals.extend(v)
        y = np.log(np.array([max(1, r.output_tokens) for r in train_records], dtype=np.float64))
        penalty = np.full(spec.num_features, h.alpha_hash)
        penalty[0] = 1e-8  # the intercept: unpenalised in effect, tiny only to keep CG definite
        penalty[1 : spec.num_dense] = h.alpha_dense
        penalty[spec.num_dense : spec.hash_offset] = h.alpha_generator
        rows_a, cols_a, vals_a = np.array(rows), np.array(cols), np.array(vals)
        w = _ridge_cg(rows_a, cols_a, vals_a, y, penalty, h.max_iter, h.tol)
        for _ in range(h.lad_iters):
            # IRLS for least absolute deviation: weight 1/|residual| turns squared error
            # into absolute error, so the fit targets the median of log(tokens).
            pred = np.bincount(rows_a, weights=vals_a * w[cols_a], minlength=len(y))
            sw = 1.0 / np.maximum(np.abs(y - pred), h.lad_delta)
            sw *= len(y) / sw.sum()  # keep the penalties' scale relative to the data
            w = _ridge_cg(rows_a, cols_a, vals_a, y, penalty, h.max_iter, h.tol, sw, w)
        return cls(spec=spec, weights=w, hyper=h, seed=seed)

    def predict_log(self, instruction: str, generator: str) -> float:
        """The linear predictor: estimated median of log(output tokens)."""
        cols, vals = _features(self.spec, self._generator_index, instruction, generator)
        w = self._weights_list
        return sum(w[c] * v for c, v in zip(cols, vals))

    def predict_tokens(self, instruction: str, generator: str) -> float:
        """Point estimate of the output length in tokens (about the median), >= 1."""
        return max(1.0, math.exp(min(self.predict_log(instruction, generator), 20.0)))

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays for np.savez, JSON-able metadata); from_arrays inverts it exactly."""
        meta = {"kind": MODEL_KIND, "feature_spec": self.spec.to_json(), "seed": self.seed,
                "hyper": dataclasses.asdict(self.hyper)}
        return {"weights": self.weights.copy()}, meta

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> TextLengthModel:
        """Inverse of to_arrays. Raises ValueError if the two do not describe one model."""
        if meta.get("kind") != MODEL_KIND:
            raise ValueError(f"model kind {meta.get('kind')!r} is not {MODEL_KIND!r}")
        if "weights" not in arrays:
            raise ValueError(f"no 'weights' array among {sorted(arrays)}")
        try:
            spec = FeatureSpec.from_json(meta["feature_spec"])
            hyper = Hyper(**meta.get("hyper", {}))
        except (KeyError, TypeError) as e:
            raise ValueError(f"model metadata incomplete or malformed: {e!r}") from None
        return cls(spec=spec, weights=np.asarray(arrays["weights"], dtype=np.float64), hyper=hyper,
                   seed=int(meta.get("seed", 0)))


def _ridge_cg(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, y: np.ndarray, penalty: np.ndarray,
              max_iter: int, tol: float, sample_weight: np.ndarray | None = None,
              w0: np.ndarray | None = None) -> np.ndarray:
    """argmin_w |Xw - y|^2 + sum_j penalty_j w_j^2, X given as COO triples, by conjugate
    gradients on (X^T X + diag(penalty)) w = X^T y. Only columns that occur in X are
    solved for; the others have weight 0 (their normal equation is penalty_j w_j = 0)."""
    used, local = np.unique(cols, return_inverse=True)
    n, d = len(y), len(used)
    pen = penalty[used]
    sw = np.ones(n) if sample_weight is None else sample_weight

    def normal(v: np.ndarray) -> np.ndarray:
        xv = np.bincount(rows, weights=vals * v[local], minlength=n) * sw
        return np.bincount(local, weights=vals * xv[rows], minlength=d) + pen * v

    b = np.bincount(local, weights=vals * (sw * y)[rows], minlength=d)
    # Jacobi preconditioner: the dense columns are far larger than the hashed ones.
    precond = 1.0 / (np.bincount(local, weights=vals * vals * sw[rows], minlength=d) + pen)
    w = np.zeros(d) if w0 is None else w0[used].copy()
    r = b - normal(w)
    z = precond * r
    p = z.copy()
    rz = r @ z
    b_norm = np.linalg.norm(b)
    for _ in range(max_iter):
        if np.linalg.norm(r) <= tol * b_norm:
            break
        ap = normal(p)
        step = rz / (p @ ap)
        w += step * p
        r -= step * ap
        z = precond * r
        rz_new = r @ z
        p = z + (rz_new / rz) * p
        rz = rz_new
    full = np.zeros(len(penalty))
    full[used] = w
    return full
