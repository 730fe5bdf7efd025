"""What the HAProxy hop itself costs (docs/RESULTS.md 4.1).

    python docs/ingress-hop.py [URL] [REQUESTS] [PROMPT_TOKENS]   # a cluster with ingress: haproxy running here

Times one-token completions one at a time, alternately through the cluster's URL (HAProxy,
then a replica; with `router: kv`, HAProxy asks the route service first) and straight to a
replica's own HTTP port (Ray's direct-ingress range, found among the listening sockets of
this machine's serving replicas), and prints the p50 and p95 of each and their difference.
The prompt is "Hello", or PROMPT_TOKENS token ids (a body the route service reads with
`router: kv`).
"""

import json
import statistics
import sys
import time

import httpx
import psutil
from ray.serve._private.constants import RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT, RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT

from cluster.app import DEPLOYMENT


def replica_ports() -> list[int]:
    ports = set()
    for process in psutil.process_iter(["cmdline"]):
        try:
            command = " ".join(process.info["cmdline"] or ())
            if "ServeReplica" not in command or f":{DEPLOYMENT}" not in command:  # not the route service's
                continue
            ports |= {c.laddr.port for c in process.net_connections("tcp") if c.status == psutil.CONN_LISTEN
                      and RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT <= c.laddr.port <= RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT}
        except psutil.Error:
            continue
    return sorted(ports)


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
    requests = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    ports = replica_ports()
    if not ports:
        sys.exit("no replica HTTP port found: is a cluster with ingress: haproxy running here?")
    direct = f"http://127.0.0.1:{ports[0]}"
    times: dict[str, list[float]] = {"ingress": [], "replica": []}
    prompt_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    prompt = list(range(3, 3 + prompt_tokens)) if prompt_tokens else "Hello"
    body = {"model": httpx.get(f"{url}/v1/models").json()["data"][0]["id"], "prompt": prompt, "max_tokens": 1}
    with httpx.Client(timeout=30) as client:
        for i in range(requests + 20):  # the first 20 of each warm up
            for name, base in (("ingress", url), ("replica", direct))[:: 1 if i % 2 else -1]:
                started = time.perf_counter()
                client.post(f"{base}/v1/completions", json=body).raise_for_status()
                if i >= 20:
                    times[name].append(time.perf_counter() - started)
    p = {name: (1e3 * statistics.median(t), 1e3 * statistics.quantiles(t, n=20)[-1]) for name, t in times.items()}
    print(json.dumps({"replica_ports": ports, **{f"{n}_p50_ms": round(v[0], 2) for n, v in p.items()},
                      **{f"{n}_p95_ms": round(v[1], 2) for n, v in p.items()},
                      "haproxy_added_p50_ms": round(p["ingress"][0] - p["replica"][0], 2)}))


if __name__ == "__main__":
    main()
