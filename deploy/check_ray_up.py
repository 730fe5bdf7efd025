"""`ray up` for real, on this machine: deploy/local.yaml over SSH to 127.0.0.1, the Serve
app deployed with `serve deploy` of deploy/serve-config.yaml on the head, one request
served through the OpenAI API with the API key, then `ray down`.

    .venv/bin/python deploy/check_ray_up.py [--keep]

No SSH daemon is started and no system configuration is changed: the SSH client reaches
the machine through `ProxyCommand sshd -i` (OpenSSH's inetd mode) with a key, a host key
and an sshd_config of a temporary directory (run it as root: sshd -i switches to the user;
`ray up` itself leaves ~/ray_bootstrap_config.yaml and ~/ray_bootstrap_key.pem, as on any
head node). What differs from a real deployment, and why:

- the IPs: the head is 127.0.0.1 and there are no workers (one machine);
- setup_commands: this checkout is already installed (a real node clones and installs);
- Redis: started directly with its password (no systemd here) instead of
  deploy/redis-on-head.sh; the URL file it writes is the same;
- `ray stop` is left out of the start commands: on a shared machine it would stop every
  Ray (a real node belongs to the cluster alone). `ray down` still stops this one;
- the secrets directory lives in the temporary directory, not in ~/.cacheopt;
- the Serve config runs the simulated engine on a free port (no GPU, no model download);
- HAProxy's stats page and exporter get free ports (Ray's fixed 8404 and 9101 may be taken).

Prints one JSON line with what happened; exit status 0 when a request was served.
Needs openssh-server (sshd) and rsync, which scripts/setup.sh installs.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from cluster.serve import free_port, stop_ray_cluster

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _ssh_through_sshd_i(work: Path) -> dict:
    """Keys and an sshd_config for `ProxyCommand sshd -i`; the `auth:` section."""
    for name in ("id", "host"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / name)], check=True)
    shutil.copy(work / "id.pub", work / "authorized_keys")
    (work / "sshd_config").write_text(
        f"HostKey {work}/host\nAuthorizedKeysFile {work}/authorized_keys\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n")
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation directory
    return {"ssh_user": os.environ.get("USER", "root"), "ssh_private_key": str(work / "id"),
            "ssh_proxy_command": f"{SSHD} -i -f {work}/sshd_config"}


def cluster_yaml(work: Path, secrets_dir: Path, redis_port: int, gcs_port: int, dashboard_port: int) -> dict:
    """deploy/local.yaml, pointed at this machine (see the module docstring for each change)."""
    config = yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text())
    config["cluster_name"] = f"cacheopt-check-{secrets.token_hex(3)}"
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["max_workers"] = 0
    config["auth"] = _ssh_through_sshd_i(work)
    config["file_mounts"] = {}
    config["setup_commands"] = []
    url_file = secrets_dir / "redis-url"
    config["head_setup_commands"] = [
        f"redis-server --port {redis_port} --bind 127.0.0.1 --save '' --appendonly no --daemonize yes "
        f"--requirepass $(cat {secrets_dir}/redis-password) --pidfile {work}/redis.pid",
        f"echo redis://:$(cat {secrets_dir}/redis-password)@127.0.0.1:{redis_port}/0 > {url_file}"]

    def adapt(command: str) -> str:
        return (command.replace("$HOME/.cacheopt", str(secrets_dir)).replace("~/.cacheopt-redis-url", str(url_file))
                .replace("~/.cacheopt", str(secrets_dir)).replace("--port=6380", f"--port={gcs_port}")
                .replace(" ray start ", f" RAY_SERVE_HAPROXY_STATS_PORT={free_port()} RAY_SERVE_HAPROXY_METRICS_PORT="
                                       f"{free_port()} {BIN}/ray start --node-ip-address=127.0.0.1 "
                                       f"--dashboard-port={dashboard_port} ")
                )
    config["head_start_ray_commands"] = [adapt(c) for c in config["head_start_ray_commands"] if c.strip() != "ray stop"]
    config["worker_start_ray_commands"] = []
    return config


def serve_config(http_port: int) -> dict:
    """deploy/serve-config.yaml with the simulated engine on a free port."""
    config = yaml.safe_load((ROOT / "deploy" / "serve-config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    app = config["applications"][0]["args"]["config_dict"]
    # The model directory by its full path: replicas do not run in this checkout's directory.
    app["engine"] = {"kind": "sim", "model": str(ROOT / "models" / "tiny-llama"), "kv_blocks": 96,
                     "max_model_len": 1024}
    return config


def run(keep: bool = False) -> dict:
    for tool in ("ssh-keygen", "rsync"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing (scripts/setup.sh installs openssh and rsync)")
    if not Path(SSHD).exists():
        raise SystemExit("sshd is missing: apt-get install openssh-server (scripts/setup.sh does)")
    work = Path(tempfile.mkdtemp(prefix="cacheopt-ray-up-"))
    secrets_dir = work / "cacheopt"
    secrets_dir.mkdir(mode=0o700)
    (secrets_dir / "ray-auth-token").write_text(secrets.token_hex(32))
    (secrets_dir / "redis-password").write_text(secrets.token_hex(16))
    api_key = secrets.token_hex(16)
    (secrets_dir / "api-keys").write_text(api_key)
    gcs_port, redis_port, http_port, dashboard_port = free_port(), free_port(), free_port(), free_port()
    cluster_file, serve_file = work / "cluster.yaml", work / "serve.yaml"
    cluster_file.write_text(yaml.safe_dump(cluster_yaml(work, secrets_dir, redis_port, gcs_port, dashboard_port)))
    serve_file.write_text(yaml.safe_dump(serve_config(http_port)))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(secrets_dir / "ray-auth-token"),
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    result: dict = {"work": str(work)}
    started = time.time()

    def step(name: str, args: list[str], timeout: float) -> None:
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        result[f"{name}_s"] = round(time.time() - started, 1)
        (work / f"{name}.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"{name} failed ({done.returncode}); log: {work}/{name}.log\n{done.stderr[-2000:]}")
    try:
        step("ray_up", [str(BIN / "ray"), "up", "-y", "--no-config-cache", str(cluster_file)], 600)
        # As deploy/README.md says: on the head, with Ray's token, `serve deploy`.
        step("serve_deploy", [str(BIN / "ray"), "exec", str(cluster_file),
                              f"cd {ROOT} && RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={secrets_dir}/ray-auth-token "
                              f"{BIN}/serve deploy -a http://127.0.0.1:{dashboard_port} {serve_file}"], 300)
        import httpx
        import openai

        base = f"http://127.0.0.1:{http_port}"
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        result["ready_s"] = round(time.time() - started, 1)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0)
        out = client.completions.create(model="tiny-llama", prompt="Hello from ray up", max_tokens=5)
        result["served_tokens"] = out.usage.completion_tokens
        result["unauthenticated_status"] = httpx.post(f"{base}/v1/completions", json={"model": "tiny-llama",
                                                      "prompt": "x", "max_tokens": 1}).status_code
    finally:
        if not keep:
            try:
                step("ray_down", [str(BIN / "ray"), "down", "-y", str(cluster_file)], 300)
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                result["ray_down_error"] = str(error)[:500]
            # `ray down` runs `ray stop` on the head, which needs `ray` on the SSH session's
            # PATH (a real node has it from pip); here it is in this checkout's .venv only,
            # so what is left of this cluster (and only this one) is stopped by its GCS port.
            result["processes_left_after_ray_down"] = stop_ray_cluster(gcs_port)
            pid_file = work / "redis.pid"
            if pid_file.exists():
                subprocess.run(["kill", pid_file.read_text().strip()], check=False)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="leave the cluster up (ray down yourself)")
    result = run(keep=parser.parse_args().keep)
    print(json.dumps(result))
    return 0 if result.get("served_tokens") == 5 and "ray_down_error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
