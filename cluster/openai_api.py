"""The OpenAI-compatible request models, errors, prompt rendering and incremental
detokenization of a serving replica's HTTP front.

A subset of OpenAI's `/v1/completions` and `/v1/chat/completions`: what a serving
benchmark and the `openai` client send. Sampling fields are accepted as OpenAI defines
them; CacheOPT reads one extension, `slo` (an SLO class name), and vLLM's `vllm_xargs`
passes through. Errors use OpenAI's body: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are accepted and ignored

    model: str
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    slo: str | None = None  # CacheOPT: the request's SLO class
    ignore_eos: bool | None = None  # vLLM's extension: generate max_tokens whatever the model says
    vllm_xargs: dict[str, Any] | None = None


class CompletionRequest(_Request):
    prompt: str | list[int]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def parse_body(raw: bytes, model_cls: type[_Request]) -> _Request:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ApiError(400, f"request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        request = model_cls.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        # Union members show up in the location (`prompt.str`): keep field names and indices.
        param = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p)))
        raise ApiError(400, f"{param}: {first['msg']}", param=param) from None
    if request.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    if request.stream_options is not None and not request.stream:
        raise ApiError(400, "stream_options is only allowed with stream=true", param="stream_options")
    for unsupported in ("response_format", "tools", "guided_json", "guided_regex", "guided_choice"):
        if getattr(request, unsupported, None) not in (None, [], {"type": "text"}):
            raise ApiError(400, f"{unsupported} is not supported by this server", param=unsupported)
    return request


class PromptRenderer:
    """Tokenizes prompts with the model's own tokenizer (`tokenizer.json`). Chat messages
    are joined as `role: content` lines: the local model has no chat template."""

    def __init__(self, model_dir: Path):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        self.vocab_size = self.tokenizer.get_vocab_size()

    def completion_ids(self, request: CompletionRequest) -> list[int]:
        if isinstance(request.prompt, list):
            bad = [t for t in request.prompt if not 0 <= t < self.vocab_size]
            if bad or not request.prompt:
                raise ApiError(400, f"prompt token ids must be non-empty and in [0, {self.vocab_size})", param="prompt")
            return list(request.prompt)
        ids = self.tokenizer.encode(request.prompt).ids
        if not ids:
            raise ApiError(400, "prompt is empty", param="prompt")
        return ids

    def chat_ids(self, request: ChatRequest) -> list[int]:
        lines = []
        for m in request.messages:
            content = m.content if isinstance(m.content, str) else " ".join(
                part.get("text", "") for part in (m.content or []) if isinstance(part, dict))
            lines.append(f"{m.role}: {content}")
        return self.tokenizer.encode("\n".join(lines) + "\nassistant:").ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self.tokenizer)


class StreamDecoder:
    """Incremental detokenization of one stream, as vLLM does it: text is emitted once it
    does not end in an incomplete character, so a character split over several tokens (or
    engine steps) arrives whole instead of as U+FFFD pieces; `flush` emits what is left at
    the end. Decoding restarts from the last emitted chunk, so a step costs its own tokens."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # ids[prefix:read] decoded to the text emitted last
        self._read = 0

    def step(self, ids: list[int], *, final: bool = False) -> str:
        self._ids += ids
        emitted = self._tokenizer.decode(self._ids[self._prefix:self._read])
        text = self._tokenizer.decode(self._ids[self._prefix:])
        if len(text) <= len(emitted) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(emitted):]

    def flush(self) -> str:
        return self.step([], final=True)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_chunk(kind: str, rid: str, model: str, created: int, text: str, finish: str | None) -> dict:
    if kind == "chat":
        delta = {"content": text} if text else {}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}


def completion_body(kind: str, rid: str, model: str, text: str, finish: str, prompt_tokens: int,
                    completion_tokens: int) -> dict:
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    created = int(time.time())
    if kind == "chat":
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish}], "usage": usage}
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}], "usage": usage}


def usage_chunk(kind: str, rid: str, model: str, created: int, prompt_tokens: int, completion_tokens: int) -> dict:
    chunk = completion_chunk(kind, rid, model, created, "", None)
    chunk["choices"] = []
    chunk["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}
    return chunk
