"""The OpenAI-compatible request models, errors, prompt rendering and incremental
detokenization of a serving replica's HTTP front.

A subset of OpenAI's `/v1/completions` and `/v1/chat/completions`: what a serving
benchmark and the `openai` client send. Every field is either honoured (sampling as vLLM
applies it, `stop` here) or refused with 400, never silently ignored; CacheOPT reads one
extension, `slo` (an SLO class name), and vLLM's `vllm_xargs` pass through except
CacheOPT's own keys. Errors use OpenAI's body: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from replicas.engine_settings import XARG_BOUND, XARG_POINT, XARG_SLO


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self):
        from fastapi.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# vLLM's `vllm_xargs` reach the engine's scheduler, so the keys CacheOPT reads there
# (p, the reserve lease, output bounds, the trace parent) are set by the serving replica
# alone: a client that sends one gets 400 (the SLO class has its own field, `slo`). A
# client holding a trusted key (a gateway that predicts output lengths from the prompt
# text) may forward its prediction and the SLO class; never p, the lease or the trace.
CLIENT_REFUSED_XARG_PREFIX = "cacheopt_"
TRUSTED_CLIENT_XARGS = frozenset({XARG_POINT, XARG_BOUND, XARG_SLO})
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_STOP_CHARS = 256


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Request(BaseModel):
    """The fields this server honours; any other field is refused (400), so nothing a
    client asks for is silently ignored. Fields OpenAI defines that this server cannot
    honour are declared only to be refused by name when set (`_UNSUPPORTED_DEFAULTS`)."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)  # vLLM's extension
    top_k: int | None = Field(None, ge=-1, le=1_000_000)  # vLLM's extension (0 or -1: off)
    min_p: float | None = Field(None, ge=0, le=1)  # vLLM's extension
    user: str | None = Field(None, max_length=512)  # OpenAI's end-user id: metadata, nothing to honour
    slo: str | None = None  # CacheOPT: the request's SLO class
    ignore_eos: bool | None = None  # vLLM's extension: generate max_tokens whatever the model says
    vllm_xargs: dict[str, str | int | float | bool] | None = None
    # OpenAI fields this server does not honour: refused when set to anything but their default.
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    logit_bias: dict | None = None
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, stop: str | list[str] | None) -> list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop
        if not stops:
            return None
        if len(stops) > MAX_STOP_SEQUENCES or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} non-empty stop sequences of at most "
                             f"{MAX_STOP_CHARS} characters")
        return stops

    @field_validator("vllm_xargs")
    @classmethod
    def _no_scheduler_internals(cls, xargs: dict | None, info: ValidationInfo) -> dict | None:
        allowed = TRUSTED_CLIENT_XARGS if (info.context or {}).get("trusted") else frozenset()
        refused = sorted(k for k in xargs or {} if k.startswith(CLIENT_REFUSED_XARG_PREFIX) and k not in allowed)
        if refused:
            raise ValueError(f"{', '.join(refused)}: cacheopt_* arguments are set by the server only "
                             "(send the SLO class as `slo`)")
        return xargs

    def sampling(self) -> dict:
        """vLLM `SamplingParams` fields the client set (the engine applies them)."""
        names = ("temperature", "top_p", "seed", "ignore_eos", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "top_k", "min_p")
        return {name: value for name in names if (value := getattr(self, name)) is not None}


_UNSUPPORTED_DEFAULTS = {"logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
                         "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "tools": (None, []),
                         "tool_choice": (None, "none"), "response_format": (None, {"type": "text"}),
                         "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,)}


class CompletionRequest(_Request):
    prompt: str | list[int] = Field(union_mode="left_to_right")
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or ())


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(None, ge=1)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
_LONE_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # any surrogate escape: paired ones pass the check


def parse_body(raw: bytes, model_cls: type[_Request], *, trusted: bool = False) -> _Request:
    """The validated request, or an ApiError (400) that names the field at fault; `trusted`:
    the client holds a trusted key (TRUSTED_CLIENT_XARGS)."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    except ValueError as error:  # not JSON, not UTF-8, or a number with too many digits
        raise ApiError(400, f"request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    if _LONE_SURROGATE_ESCAPE.search(raw):  # JSON allows "\ud800"; no tokenizer or UTF-8 response does
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "request body contains a lone UTF-16 surrogate (\\ud800-\\udfff)") from None
    try:
        request = model_cls.model_validate(data, context={"trusted": trusted})
    except ValidationError as error:
        # Of a union's alternatives, the one that got furthest says best what is wrong.
        first = max(error.errors(), key=lambda e: len(e["loc"]))
        # Union members show up in the location (`prompt.str`): keep field names and indices.
        param = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p)))
        message = first["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{param}: {message}" if param else message, param=param or None) from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    if request.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    if request.stream_options is not None and not request.stream:
        raise ApiError(400, "stream_options is only allowed with stream=true", param="stream_options")
    for name, defaults in _UNSUPPORTED_DEFAULTS.items():
        if getattr(request, name) not in defaults:
            raise ApiError(400, f"{name} is not supported by this server", param=name)
    return request


class PromptRenderer:
    """Tokenizes prompts with the model's own tokenizer (`tokenizer.json`) and renders chat
    requests with the model's chat template (`tokenizer_config.json`'s `chat_template`, or
    `chat_template.jinja`), in a sandboxed Jinja environment as transformers does. Message
    text may not contain the tokenizer's special tokens: they mark turns, so a user who
    could write them could forge a system turn."""

    def __init__(self, model_dir: Path):
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.special_tokens = sorted(t.content for t in self.tokenizer.get_added_tokens_decoder().values()
                                     if t.special)
        config = _read_json(model_dir / "tokenizer_config.json")
        template_file = model_dir / "chat_template.jinja"
        source = template_file.read_text() if template_file.is_file() else config.get("chat_template")
        self._template = _compile_chat_template(source) if isinstance(source, str) else None
        self._template_vars = {k: config.get(k) for k in ("bos_token", "eos_token")}

    def completion_ids(self, request: CompletionRequest) -> list[int]:
        if isinstance(request.prompt, list):
            bad = [t for t in request.prompt if not 0 <= t < self.vocab_size]
            if bad or not request.prompt:
                raise ApiError(400, f"prompt token ids must be non-empty and in [0, {self.vocab_size})", param="prompt")
            return list(request.prompt)
        ids = self.encode(request.prompt)
        if not ids:
            raise ApiError(400, "prompt is empty", param="prompt")
        return ids

    def chat_ids(self, request: ChatRequest) -> list[int]:
        if self._template is None:
            raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
        messages = []
        for i, m in enumerate(request.messages):
            text = m.text()
            if forged := next((t for t in self.special_tokens if t in text or t in (m.name or "")), None):
                raise ApiError(400, f"messages[{i}] contains the reserved token {forged!r}",
                               param=f"messages.{i}.content")
            messages.append({"role": m.role, "content": text, **({"name": m.name} if m.name else {})})
        try:
            prompt = self._template.render(messages=messages, add_generation_prompt=True, **self._template_vars)
        except Exception as error:  # noqa: BLE001 (a template may raise on what it does not accept)
            raise ApiError(400, f"the chat template refused these messages: {error}", param="messages") from None
        return self.encode(prompt, add_special_tokens=False)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        # encode_batch, not encode: only it releases the GIL, so that tokenizing a large
        # prompt in a worker thread does not stall the event loop (1.3 s for 2 MB of text).
        return self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self.tokenizer)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _compile_chat_template(source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


class StopMatcher:
    """Stop sequences over streamed text, as vLLM applies them: the text up to the first
    stop sequence is emitted, the sequence itself is not, and generation ends there. While
    streaming, the last len(longest stop) - 1 characters are held back, since they may be
    the start of a stop sequence that the next step completes."""

    def __init__(self, stops: list[str] | None):
        self.stops = stops or []
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """What of `text` (after earlier held-back text) may be emitted now; sets `stopped`
        when a stop sequence appeared."""
        if self.stopped or not self.stops:
            return "" if self.stopped else text
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self._pending = self._pending[:min(hits)], ""
            return out
        cut = max(0, len(self._pending) - self._hold)
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


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
