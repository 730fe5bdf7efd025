"""A trained TextLengthModel on disk: a directory with `metadata.json` and `arrays.npz`.

    <dir>/metadata.json   format version, model kind and feature spec, tokenizer, training
                          data (file names and sha256), split sizes, seed, calibration
    <dir>/arrays.npz      the model's numpy arrays (np.savez, loaded with allow_pickle=False)

No pickle anywhere: loading an artifact runs no code from it. Every problem with an
artifact raises ArtifactError, which says what is wrong and how to make a good one.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from predictor.alpaca import ALPACA_FILES, DATA_DIR, AlpacaRecord, data_file_digests
from predictor.text_model import TextLengthModel
from predictor.tokens import TOKENIZER_NAME

ARTIFACT_FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
ARRAYS_FILE = "arrays.npz"
_FIX = "run `cacheopt predictor train` to write a fresh artifact"


class ArtifactError(ValueError):
    """A predictor artifact is missing, incomplete, corrupt or of another format version."""


def save_artifact(
    path: Path | str,
    model: TextLengthModel,
    calibration: Mapping[str, Any],
    extra_meta: Mapping[str, Any],
    *,
    clock: Callable[[], str] | None = None,
) -> Path:
    """Write `model` to the directory `path` (created if needed; its two files replaced).

    `calibration` is stored as is under "calibration" (the caller's bound data).
    `extra_meta` is merged in at the top level; the caller puts the training description
    there, e.g. {"training_data": {...}, "split": {"num_train_prompts": 483, ...}}.
    `clock` returns the creation time as a string (e.g. an ISO 8601 timestamp); without
    one "created_at" is omitted, so the same model writes byte-identical files.
    Both must be JSON-serialisable; keys of `extra_meta` may not shadow the fixed ones.
    """
    path = Path(path)
    arrays, model_meta = model.to_arrays()
    meta: dict[str, Any] = {
        "format_version": ARTIFACT_FORMAT_VERSION,
        "model_kind": model_meta["kind"],
        "model": model_meta,
        "tokenizer": TOKENIZER_NAME,
        "arrays": {name: list(a.shape) for name, a in arrays.items()},
        "calibration": dict(calibration),
    }
    clash = sorted(set(meta) & set(extra_meta))
    if clash:
        raise ValueError(f"extra_meta keys {clash} would overwrite the artifact's own fields")
    meta.update(extra_meta)
    if clock is not None:
        meta["created_at"] = clock()
    try:
        text = json.dumps(meta, indent=2, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"artifact metadata is not JSON-serialisable: {e}") from None
    path.mkdir(parents=True, exist_ok=True)
    (path / METADATA_FILE).write_text(text + "\n", encoding="utf-8")
    with open(path / ARRAYS_FILE, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub types the first keyword as allow_pickle
    return path


def describe_training(
    train: Sequence[AlpacaRecord],
    calibration: Sequence[AlpacaRecord],
    test: Sequence[AlpacaRecord],
    *,
    seed: int,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    data_dir: Path | str = DATA_DIR,
    files: Sequence[str] = ALPACA_FILES,
) -> dict[str, Any]:
    """The `extra_meta` that records what a model was trained on: the data files with
    their sha256, the split (prompt counts per part) and its seed."""
    return {
        "training_data": {
            "source": "AlpacaEval model outputs, tatsu-lab/alpaca_eval (CC BY-NC 4.0); see predictor/data/README.md",
            "files": data_file_digests(data_dir, files),
            "generators": sorted({r.generator for r in train}),
        },
        "split": {
            "by": "prompt_id",
            "fractions": list(fractions),
            "seed": seed,
            "num_train_prompts": len({r.prompt_id for r in train}),
            "num_calibration_prompts": len({r.prompt_id for r in calibration}),
            "num_test_prompts": len({r.prompt_id for r in test}),
        },
    }


def load_artifact(path: Path | str) -> tuple[TextLengthModel, dict[str, Any]]:
    """(model, metadata) from an artifact directory written by `save_artifact`."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"no predictor artifact at {path} (not a directory); {_FIX}")
    meta = _read_metadata(path / METADATA_FILE)
    arrays = _read_arrays(path / ARRAYS_FILE)
    expected = meta.get("arrays")
    if not isinstance(expected, dict):
        raise ArtifactError(f"{path / METADATA_FILE} lacks the 'arrays' shape table; {_FIX}")
    for name, shape in expected.items():
        if name not in arrays:
            raise ArtifactError(f"{path / ARRAYS_FILE} lacks array {name!r} listed in {METADATA_FILE}; {_FIX}")
        if list(arrays[name].shape) != list(shape):
            raise ArtifactError(
                f"{path / ARRAYS_FILE}: array {name!r} has shape {list(arrays[name].shape)}, "
                f"{METADATA_FILE} says {list(shape)}; the two files come from different runs; {_FIX}"
            )
    try:
        model = TextLengthModel.from_arrays(arrays, meta["model"])
    except (KeyError, ValueError) as e:
        raise ArtifactError(f"{path}: the model in the artifact does not load ({e}); {_FIX}") from None
    return model, meta


def _read_metadata(file: Path) -> dict[str, Any]:
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{file} is missing; {_FIX}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{file} is not valid JSON ({e}); {_FIX}") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{file} holds a {type(meta).__name__}, not a JSON object; {_FIX}")
    version = meta.get("format_version")
    if version != ARTIFACT_FORMAT_VERSION:
        raise ArtifactError(
            f"{file}: artifact format version {version!r}, this code reads version "
            f"{ARTIFACT_FORMAT_VERSION}; {_FIX}"
        )
    return meta


def _read_arrays(file: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(file, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except FileNotFoundError:
        raise ArtifactError(f"{file} is missing; {_FIX}") from None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise ArtifactError(f"{file} is not a readable .npz archive ({e}); {_FIX}") from None
