"""Where the cores go while a server is under load (docs/RESULTS.md 4.2).

    python docs/cpu-share.py URL LABEL     # against a server already running on this machine

Replays 150 conv requests at 12 req/s against URL with `cacheopt bench` and prints, for each
group of processes on this machine (the engine core, the replica's OpenAI front, Serve's
proxy and controller, the Ray daemons, vLLM's API server), the CPU seconds it used per
second of the replay: the cores each part of the serving path took.
"""

import json
import subprocess
import sys
import time

import psutil

GROUPS = [  # first match wins
    ("haproxy", ("bin/haproxy",)),
    ("serve proxy", ("ProxyActor", "HAProxyManager")),
    ("replica (OpenAI front)", ("ServeReplica",)),
    ("engine core", ("EngineCore", "VLLM::Worker", "multiprocessing.spawn")),
    ("serve controller", ("ServeController",)),
    ("global scheduler", ("GlobalScheduler",)),
    ("ray daemons", ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env", "ray::")),
    ("vllm api server", ("api_server",)),
]


def cpu_seconds() -> dict[str, float]:
    used: dict[str, float] = {}
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            text = (process.info["name"] or "") + " " + " ".join(process.info["cmdline"] or ())
            times = process.cpu_times()
        except psutil.Error:
            continue
        group = next((g for g, marks in GROUPS if any(m in text for m in marks)), None)
        if group is not None:
            used[group] = used.get(group, 0.0) + times.user + times.system
    return used


def main() -> None:
    url, label = sys.argv[1], sys.argv[2]
    before, started = cpu_seconds(), time.time()
    subprocess.run([".venv/bin/cacheopt", "bench", "--target", f"{label}={url}", "--rates", "12", "--limit", "150",
                    "--warmup", "0", "--no-progress", "--out", f"reports/cpu-share-{label}"],
                   check=True, capture_output=True)
    after, wall_s = cpu_seconds(), time.time() - started
    cores = {g: round((after.get(g, 0.0) - before.get(g, 0.0)) / wall_s, 3) for g in after}
    print(label, f"replay {wall_s:.1f} s, cores used:", json.dumps(dict(sorted(cores.items(), key=lambda kv: -kv[1]))))


if __name__ == "__main__":
    main()
