"""The local model: a tiny Llama config and a BPE tokenizer built here, no download."""

import json

import pytest
from tokenizers import Tokenizer

from replicas.local_model import TinyLlamaSpec, build_local_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_local_model(tmp_path_factory.mktemp("model") / "tiny-llama")


def test_config_is_a_llama_vllm_can_build(model_dir):
    """config.json names the Llama architecture, matches the tokenizer's vocabulary and says the weights are random."""
    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["vocab_size"] == tokenizer.get_vocab_size() == TinyLlamaSpec().vocab_size
    assert config["hidden_size"] % config["num_attention_heads"] == 0
    assert "meaningless" in config["_cacheopt_notice"] and "meaningless" in (model_dir / "README.md").read_text()


def test_tokenizer_round_trips_text_and_knows_its_specials(model_dir):
    """Decoding an encoding gives the text back; <s> and </s> are ids 1 and 2, as config.json says."""
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = "Hello, world! The KV cache holds 16 tokens per block."
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert (tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")) == (1, 2)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "chat_template" in config


def test_build_is_deterministic(model_dir, tmp_path):
    """The same spec and corpus give byte-identical files."""
    again = build_local_model(tmp_path / "again")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (model_dir / name).read_bytes()


@pytest.mark.parametrize("kwargs, message", [
    (dict(hidden_size=250), "not a multiple of num_attention_heads"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads"),
    (dict(vocab_size=100), "too small"),
])
def test_bad_spec_is_a_clear_error(kwargs, message):
    """Impossible shapes raise ValueError naming the numbers."""
    with pytest.raises(ValueError, match=message):
        TinyLlamaSpec(**kwargs)


def test_missing_corpus_is_a_clear_error(tmp_path):
    """A missing tokenizer corpus is a ValueError naming the file."""
    with pytest.raises(ValueError, match="corpus not found"):
        build_local_model(tmp_path / "m", corpus=tmp_path / "nothing.json")
