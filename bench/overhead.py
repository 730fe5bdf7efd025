"""The latency the ingress and the router add over calling a replica directly.

Against a running `cacheopt serve` on this machine: the same one-token completion, one at a
time, (a) over HTTP through the ingress and the router and (b) straight to a replica's
deployment handle from a Ray driver, alternating so that both see the same machine state.
The difference of the medians is the ingress's and router's cost (HTTP parsing,
tokenization, validation, routing, the proxy hop, SSE/JSON encoding).
"""

from __future__ import annotations

import statistics
import time


def measure_added_latency(base_url: str, model: str, *, requests: int = 200, app_name: str = "cacheopt") -> dict:
    import httpx
    import ray
    from ray import serve

    ray.init(address="auto", namespace="cacheopt", log_to_driver=False)
    try:
        handle = serve.get_deployment_handle("replica-0", app_name=app_name).options(stream=True)
        prompt = [5, 6, 7, 8]
        via_ingress, direct = [], []
        with httpx.Client(base_url=base_url, timeout=60) as client:
            for i in range(requests + 10):
                t0 = time.perf_counter()
                response = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 1})
                t1 = time.perf_counter()
                response.raise_for_status()
                for _ in handle.generate.remote(f"direct-{i}", prompt, 1, {}, {}):
                    pass
                t2 = time.perf_counter()
                if i >= 10:  # warm-up: connections, first snapshot polls
                    via_ingress.append(t1 - t0)
                    direct.append(t2 - t1)
    finally:
        ray.shutdown()
    p50_ingress, p50_direct = statistics.median(via_ingress), statistics.median(direct)
    q = lambda xs: statistics.quantiles(xs, n=20)[-1]  # noqa: E731 (p95)
    return {"requests": requests, "ingress_p50_ms": 1e3 * p50_ingress, "direct_p50_ms": 1e3 * p50_direct,
            "added_p50_ms": 1e3 * (p50_ingress - p50_direct), "ingress_p95_ms": 1e3 * q(via_ingress),
            "direct_p95_ms": 1e3 * q(direct)}
