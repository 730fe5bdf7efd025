"""The baselines the cluster is measured against (bench/baselines.py): the same engine as a
cluster config's, behind a plain `vllm serve` and behind Ray Serve LLM, each started with
`cacheopt baseline` and answering the real `openai` client."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from bench.baselines import ray_serve_llm_config, vllm_serve_args
from cluster.serve import free_port
from replicas.engines.config import EngineConfig

ENGINES = [EngineConfig(kv_blocks=128), EngineConfig(kv_blocks=None, prefix_caching=False, max_num_seqs=8)]


@pytest.mark.parametrize("engine", ENGINES, ids=["cache-on", "cache-off"])
def test_vllm_serve_args_are_the_engine_of_the_config(engine):
    """vLLM's OpenAI server reads the command line back (with its own parser) into the
    engine arguments the cluster's replicas use, less CacheOPT's scheduler."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = vllm_serve_args(engine, "127.0.0.1", 8100)
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv[3:])  # as that module parses them
    parsed = AsyncEngineArgs.from_cli_args(args)
    for key, value in engine.stock_engine_kwargs().items():
        assert getattr(parsed, key) == value, key
    assert parsed.scheduler_cls is None or "cacheopt" not in str(parsed.scheduler_cls)
    assert (args.served_model_name, args.host, args.port) == ([engine.served_model_name], "127.0.0.1", 8100)


def test_ray_serve_llm_config_is_the_engine_of_the_config():
    engine = EngineConfig(kv_blocks=128, kv_cache_space_gib=2)
    config = ray_serve_llm_config(engine, replicas=3)
    kwargs = engine.stock_engine_kwargs()
    assert kwargs.pop("disable_log_stats") and "disable_log_stats" not in config.engine_kwargs  # its metrics on
    assert config.model_loading_config.model_id == engine.served_model_name
    assert config.model_loading_config.model_source == os.path.abspath(kwargs.pop("model"))
    assert {k: config.engine_kwargs[k] for k in kwargs} == kwargs
    assert config.deployment_config["num_replicas"] == 3
    assert config.placement_group_config == {"bundles": [{"CPU": 1}]}
    assert config.runtime_env["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] in ("2", os.environ.get("VLLM_CPU_KVCACHE_SPACE"))


@pytest.mark.integration
@pytest.mark.vllm
@pytest.mark.parametrize("kind", ["vllm", "ray-serve-llm"])
def test_a_baseline_serves_the_openai_client_and_stops_cleanly(kind, tmp_path):
    """`cacheopt baseline KIND` prints its ready line, answers a streamed and a plain
    completion from the `openai` client, and SIGTERM stops it and every process it started
    (the engine core; for Ray Serve LLM, its Ray)."""
    from openai import OpenAI

    port = free_port()
    with open(tmp_path / "baseline.log", "w+") as log:
        server = subprocess.Popen([sys.executable, "-m", "cluster.cli", "baseline", kind, "--replicas", "1",
                                   "--port", str(port)], stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            deadline = time.time() + 400
            ready = ""
            while time.time() < deadline and server.poll() is None and " ready: " not in ready:
                ready = server.stdout.readline()
            assert f"{kind} ready: tiny-llama at http://127.0.0.1:{port}/v1" in ready, (ready, tail(log))
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
            plain = client.completions.create(model="tiny-llama", prompt="Hello there", max_tokens=5,
                                              extra_body={"ignore_eos": True})
            assert plain.usage.completion_tokens == 5
            chunks = list(client.completions.create(model="tiny-llama", prompt="Hello there", max_tokens=5,
                                                    stream=True, extra_body={"ignore_eos": True}))
            assert "".join(c.choices[0].text for c in chunks if c.choices) != ""
            started = psutil.Process(server.pid).children(recursive=True)
            assert started, "no engine process"
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(120)
            except subprocess.TimeoutExpired:
                server.kill()
                raise
        assert server.returncode == 0, tail(log)
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not [p.pid for p in alive if not zombie(p)], "a process outlived the baseline"

def zombie(process: psutil.Process) -> bool:
    """Dead and not yet reaped (an orphan whose new parent in a container may never reap it)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def tail(log, lines: int = 30) -> str:
    log.flush()
    log.seek(0)
    return "".join(log.readlines()[-lines:])
