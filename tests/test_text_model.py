"""The text length model: tokens, AlpacaEval loading and splitting, the model, its artifact."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from predictor.alpaca import ALPACA_FILES, AlpacaRecord, load_alpaca, split_by_prompt
from predictor.artifact import ArtifactError, describe_training, load_artifact, save_artifact
from predictor.text_model import TextLengthModel
from predictor.tokens import CHAT_TEMPLATE_OVERHEAD_TOKENS, chat_prompt_tokens, count_tokens, template_overhead_tokens

FILLER = "the a of to and in is it for on with as at by this that from be are or an".split()
GENERATORS = ("gen-a", "gen-b")


def _records(num_prompts: int = 60, seed: int = 0) -> list[AlpacaRecord]:
    """Synthetic records: an instruction containing "essay" gets a 400-token answer, any
    other 40 (gen-b answers 1.5x longer), with seeded filler words around it."""
    rng = random.Random(seed)
    out = []
    for pid in range(num_prompts):
        words = rng.choices(FILLER, k=rng.randint(3, 12))
        long = pid % 2 == 0
        if long:
            words.insert(rng.randint(0, len(words)), "essay")
        text = " ".join(words)
        for g, factor in zip(GENERATORS, (1.0, 1.5)):
            tokens = round((400 if long else 40) * factor * rng.uniform(0.9, 1.1))
            out.append(AlpacaRecord(pid, "synthetic", text, g, tokens))
    return out


@pytest.fixture(scope="module")
def model() -> TextLengthModel:
    return TextLengthModel.fit(_records())


# --- tokens ---


def test_hello_world_is_four_llama3_tokens():
    """count_tokens is the Llama-3 tokenizer with no BOS: "Hello", ",", " world", "!"."""
    assert count_tokens("Hello, world!") == 4


def test_template_overhead_is_the_documented_ten_tokens():
    """The chat template adds exactly CHAT_TEMPLATE_OVERHEAD_TOKENS = 10 tokens, recomputed
    from the template string, and chat_prompt_tokens adds it to the instruction's count."""
    assert CHAT_TEMPLATE_OVERHEAD_TOKENS == 10
    assert template_overhead_tokens() == CHAT_TEMPLATE_OVERHEAD_TOKENS
    assert chat_prompt_tokens("Hello, world!") == 4 + 10


# --- AlpacaEval loading and splitting ---


def test_alpaca_files_load_as_805_prompts_by_5_generators():
    """The shipped data are 5 x 805 records sharing prompt ids, with positive lengths."""
    records = load_alpaca()
    assert len(records) == 5 * 805
    assert len({r.generator for r in records}) == 5
    assert {r.prompt_id for r in records} == set(range(805))
    assert min(r.output_tokens for r in records) >= 1


def test_missing_alpaca_file_is_named(tmp_path: Path):
    """A missing data file raises ValueError naming it."""
    with pytest.raises(ValueError, match=ALPACA_FILES[0]):
        load_alpaca(tmp_path)


def test_malformed_alpaca_file_is_named(tmp_path: Path):
    """A record without the expected string fields raises ValueError naming the file."""
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "hi", "output": 3}]))
    with pytest.raises(ValueError, match=r"bad\.json.*record 0"):
        load_alpaca(tmp_path, files=["bad.json"])


def test_split_puts_each_prompt_in_exactly_one_part():
    """No prompt id is in two parts, and the parts together hold every record once."""
    records = _records(100)
    parts = split_by_prompt(records)
    ids = [{r.prompt_id for r in part} for part in parts]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert sorted(map(id, records)) == sorted(id(r) for part in parts for r in part)
    assert [len(i) for i in ids] == [60, 20, 20]


def test_split_is_deterministic_for_a_seed():
    """The same seed gives the same parts; another seed gives other parts."""
    records = _records(100)
    assert split_by_prompt(records, seed=3) == split_by_prompt(records, seed=3)
    assert split_by_prompt(records, seed=3) != split_by_prompt(records, seed=4)


@pytest.mark.parametrize("fractions", [(0.5, 0.5, 0.5), (0.7, 0.4, -0.1), (0.5, 0.5)])
def test_split_rejects_bad_fractions(fractions):
    """Fractions must be three numbers in [0, 1] summing to 1; the message shows them."""
    with pytest.raises(ValueError, match=r"fractions="):
        split_by_prompt(_records(10), fractions=fractions)


# --- the model ---


def test_model_predicts_longer_answers_for_the_keyword(model):
    """On unseen instructions, one with "essay" is predicted far longer than one without,
    and the wordier generator longer than the terse one."""
    with_kw = model.predict_tokens("write an essay on the history of it", "gen-a")
    without = model.predict_tokens("write on the history of it", "gen-a")
    assert with_kw > 3 * without
    assert model.predict_tokens("write an essay on it", "gen-b") > model.predict_tokens("write an essay on it", "gen-a")


def test_fit_is_deterministic():
    """Two fits on the same records give bit-identical weights."""
    a = TextLengthModel.fit(_records())
    b = TextLengthModel.fit(_records())
    assert np.array_equal(a.weights, b.weights)


def test_array_round_trip_keeps_predictions(model):
    """from_arrays(*to_arrays()) predicts exactly what the original predicts."""
    copy = TextLengthModel.from_arrays(*model.to_arrays())
    for text, gen in [("an essay", "gen-a"), ("", "gen-b"), ("is it", "unknown-model")]:
        assert copy.predict_tokens(text, gen) == model.predict_tokens(text, gen)


def test_predictions_are_at_least_one_token():
    """Even a model trained on 1-token answers, asked about odd inputs, predicts >= 1."""
    tiny = [AlpacaRecord(i, "s", f"say {w}", "g", 1) for i, w in enumerate(FILLER)]
    m = TextLengthModel.fit(tiny)
    for text in ["", "say the", "\n\n", "unseen words entirely " * 50]:
        assert m.predict_tokens(text, "g") >= 1.0
        assert m.predict_tokens(text, "never-seen-generator") >= 1.0


# --- the artifact ---


def _save(tmp_path: Path, model: TextLengthModel) -> Path:
    records = _records()
    train, cal, test = split_by_prompt(records)
    extra = describe_training(train, cal, test, seed=0)
    return save_artifact(tmp_path / "art", model, {"kind": "test", "quantiles": [1, 2]}, extra,
                         clock=lambda: "2024-01-01T00:00:00Z")


def test_artifact_round_trip(tmp_path: Path, model):
    """A saved artifact loads to a model with the same predictions, and its metadata keeps
    the version, spec, tokenizer, data digests, split sizes, calibration and clock."""
    loaded, meta = load_artifact(_save(tmp_path, model))
    assert loaded.predict_tokens("an essay", "gen-b") == model.predict_tokens("an essay", "gen-b")
    assert meta["format_version"] == 1
    assert meta["model"]["feature_spec"]["hash_bits"] == model.spec.hash_bits
    assert meta["tokenizer"] == "quicktok-v1 llama3"
    assert len(meta["training_data"]["files"]["Meta-Llama-3-8B-Instruct.json"]) == 64
    assert meta["split"]["num_train_prompts"] == 36
    assert meta["calibration"] == {"kind": "test", "quantiles": [1, 2]}
    assert meta["created_at"] == "2024-01-01T00:00:00Z"


def _corrupt_metadata(path: Path, **changes) -> None:
    meta = json.loads((path / "metadata.json").read_text())
    meta.update(changes)
    (path / "metadata.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: None, "not a directory"),  # load a path that does not exist
        (lambda p: (p / "metadata.json").unlink(), r"metadata\.json is missing"),
        (lambda p: (p / "arrays.npz").unlink(), r"arrays\.npz is missing"),
        (lambda p: (p / "metadata.json").write_text("{not json"), "not valid JSON"),
        (lambda p: _corrupt_metadata(p, format_version=99), "format version 99"),
        (lambda p: _corrupt_metadata(p, arrays={"weights": [7]}), "has shape"),
        (lambda p: (p / "arrays.npz").write_bytes(b"garbage"), "not a readable .npz"),
    ],
    ids=["missing-dir", "no-metadata", "no-arrays", "corrupt-json", "wrong-version", "shape-mismatch", "corrupt-npz"],
)
def test_broken_artifacts_raise_artifact_error_with_a_fix(tmp_path: Path, model, damage, message):
    """Every way an artifact can be broken raises ArtifactError saying what is wrong and
    that `cacheopt predictor train` makes a good one."""
    path = _save(tmp_path, model)
    damage(path)
    target = tmp_path / "nowhere" if message == "not a directory" else path
    with pytest.raises(ArtifactError, match=message) as info:
        load_artifact(target)
    assert "cacheopt predictor train" in str(info.value)
