"""The policy core stays pure: importing it loads no framework and no numeric library."""

import subprocess
import sys

POLICY_CORE = ["replicas.request", "replicas.ledger", "replicas.config", "replicas.scheduler",
               "replicas.policies", "replicas.latency", "replicas.sim_engine", "predictor", "predictor.bounds",
               "predictor.point_bound", "predictor.tokens", "global_scheduler.confidence"]
HEAVY = ["ray", "vllm", "torch", "redis", "numpy", "matplotlib", "pydantic", "sklearn"]


def test_policy_core_imports_nothing_heavy():
    """A fresh interpreter importing the policy core has none of the heavy modules loaded."""
    code = (f"import sys\nfor m in {POLICY_CORE!r}: __import__(m)\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"policy core pulled in: {loaded}"


def test_only_the_adapter_and_the_engine_clients_import_vllm():
    """The scheduler seam lives in one module (replicas/vllm_adapter.py). The two places
    that drive an engine, replicas/engines/vllm.py (starting it, for the benchmark and the
    serving replicas) and the benchmark's replay (bench/engine.py), use vLLM's client API,
    lazily. Nothing else may."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"^\s*(from vllm[\s.]|import vllm\b)", re.MULTILINE)
    importers = sorted(str(p.relative_to(root)) for folder in ("replicas", "predictor", "global_scheduler", "bench",
                                                                "cluster")
                       for p in (root / folder).rglob("*.py") if pattern.search(p.read_text()))
    assert importers == ["bench/engine.py", "replicas/engines/vllm.py", "replicas/vllm_adapter.py"]


def test_serving_does_not_import_the_benchmark():
    """cluster/ reaches engines through replicas.engines; bench/ is for benchmarks."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"^\s*(from bench[\s.]|import bench\b)", re.MULTILINE)
    serving = ["cluster/server.py", "cluster/app.py", "cluster/router.py", "cluster/serve.py", "cluster/config.py"]
    assert [p for p in serving if pattern.search((root / p).read_text())] == []
    assert [str(p.relative_to(root)) for p in (root / "replicas").rglob("*.py") if pattern.search(p.read_text())] == []


def test_the_cluster_simulator_runs_the_real_rules_without_ray():
    """The routing rule and the global scheduler's logic are plain modules the serving
    cluster wraps in Ray and the cluster simulator calls directly: importing them (and the
    simulator) loads neither Ray nor vLLM."""
    code = ("import sys\nimport cluster.routing, global_scheduler.control, bench.cluster_sim\n"
            "print(','.join(m for m in ('ray', 'vllm', 'torch') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"pulled in: {loaded}"
