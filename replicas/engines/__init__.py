"""The engine behind one serving replica, behind one small interface.

    generate(request_id, prompt_token_ids, max_tokens, extra_args, sampling)
        -> async iterator of new token ids, one list per engine step
    snapshot() -> KVSnapshot | None      the replica's KV state, for routing and the reserve
    check_health() -> None               raises EngineDead when the engine can serve no more
    use_length_table(version, table)     online calibration's refitted length table, from now on
    length_table_version: int            the version in use (0: the static table)
    shutdown()                           stops it and every process it started

Two implementations: `vllm` (a real vLLM engine with the CacheOPT adapter as its scheduler)
and `sim` (the simulated engine stepping in real time with the same policy objects). A
third engine is one new module, plus its name in `ENGINES` and `EngineConfig.kind`.
Serving (cluster/) reaches engines only through `make_engine`; the benchmark starts vLLM
through `engines.vllm`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from importlib import import_module
from typing import Protocol

from replicas.engine_settings import EngineSettings
from replicas.engines.config import EngineConfig
from replicas.snapshot import KVSnapshot

ENGINES = {"vllm": "replicas.engines.vllm:VllmServingEngine", "sim": "replicas.engines.sim:SimServingEngine"}


class RequestShed(Exception):
    """The replica's policy refused the request after a bounded wait, before its first
    token (it could no longer start in time). The server answers 429 with Retry-After."""

    def __init__(self, request_id: str):
        super().__init__(request_id)  # the only argument, so that it pickles back as it was
        self.request_id = request_id

    def __str__(self) -> str:
        return f"request {self.request_id} was shed: it waited past its bound without starting"


class EngineDead(Exception):
    """The engine can serve no more requests (its process died or it failed); the replica's
    health check raises it so that Ray Serve replaces the replica."""


class ServingEngine(Protocol):
    def generate(self, request_id: str, prompt_token_ids: list[int], max_tokens: int, extra_args: dict,
                 sampling: dict | None = None) -> AsyncIterator[list[int]]: ...

    def snapshot(self) -> KVSnapshot | None: ...

    def check_health(self) -> None: ...

    length_table_version: int

    def use_length_table(self, version: int, table: dict) -> None: ...

    async def shutdown(self) -> None: ...


def make_engine(config: EngineConfig, settings: EngineSettings) -> ServingEngine:
    module, _, name = ENGINES[config.kind].partition(":")
    return getattr(import_module(module), name)(config, settings)
