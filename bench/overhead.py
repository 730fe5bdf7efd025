"""The latency the HTTP path adds over calling a replica's engine directly.

Against a running `cacheopt serve` on this machine: the same one-token completion, one at a
time, (a) over HTTP (Serve's proxy, the request router, the replica's OpenAI front) and
(b) through a deployment handle to the replica's `generate` method from a Ray driver (the
same router and engine, no HTTP), alternating so that both see the same machine state. The
difference of the medians is the HTTP path's cost (the proxy hop, parsing, tokenization,
validation, JSON encoding).
"""

from __future__ import annotations

import statistics
import time

from bench.http_bench import Target


def measure_added_latency(target: Target, *, requests: int = 200, app_name: str = "cacheopt") -> dict:
    import httpx
    import ray
    from ray import serve

    ray.init(address="auto", namespace="cacheopt", log_to_driver=False)
    try:
        from cluster.app import DEPLOYMENT

        handle = serve.get_deployment_handle(DEPLOYMENT, app_name=app_name).options(stream=True)
        prompt = [5, 6, 7, 8]
        via_http, direct = [], []
        with httpx.Client(base_url=target.url, timeout=60, headers=target.headers) as client:
            for i in range(requests + 10):
                t0 = time.perf_counter()
                response = client.post("/v1/completions", json={"model": target.model, "prompt": prompt, "max_tokens": 1})
                t1 = time.perf_counter()
                response.raise_for_status()
                for _ in handle.generate.remote(f"direct-{i}", prompt, 1, {}):
                    pass
                t2 = time.perf_counter()
                if i >= 10:  # warm-up: connections, first snapshot polls
                    via_http.append(t1 - t0)
                    direct.append(t2 - t1)
    finally:
        ray.shutdown()
    p50_http, p50_direct = statistics.median(via_http), statistics.median(direct)
    q = lambda xs: statistics.quantiles(xs, n=20)[-1]  # noqa: E731 (p95)
    return {"requests": requests, "http_p50_ms": 1e3 * p50_http, "direct_p50_ms": 1e3 * p50_direct,
            "added_p50_ms": 1e3 * (p50_http - p50_direct), "http_p95_ms": 1e3 * q(via_http),
            "direct_p95_ms": 1e3 * q(direct)}
