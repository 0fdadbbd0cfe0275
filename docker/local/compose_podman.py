"""`podman run` commands derived from docker/compose.yaml, for machines with podman but
no compose and no container network of their own (host networking: every service listens
on loopback only). compose.yaml stays the source of truth: image, command, environment,
shared memory and volumes come from it; only what host networking changes is rewritten.

    python docker/local/compose_podman.py ray-head ray-worker-cpu   # prints the commands

What is rewritten, and why:
- the network: `--network host` instead of compose's project network, so the service name
  `ray-head` in a command becomes 127.0.0.1 and published ports (`ports:`) are dropped
  (the head's dashboard and job API are on 127.0.0.1:8265 as published);
- `ray start` gets `--node-ip-address=127.0.0.1`, and a listening address 0.0.0.0 becomes
  127.0.0.1, so nothing listens beyond loopback; the worker gets its own dashboard-agent
  ports (two Ray nodes share the host's ports here);
- named volumes can be replaced by host directories (`volumes={"urepa-cache": "/srv/x"}`);
- podman needs `--runtime runc` where crun refuses the host's hybrid cgroups, and
  explicit `--ulimit`s where raising the defaults is not permitted (both options).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import yaml

COMPOSE = Path(__file__).resolve().parents[1] / "compose.yaml"
_VAR = re.compile(r"\$\{(\w+)(?::([-?])([^}]*))?\}")
# the worker's dashboard agent and metrics ports: the head's defaults are taken on a
# shared host network
WORKER_PORTS = ["--dashboard-agent-listen-port=52366", "--dashboard-agent-grpc-port=52367",
                "--metrics-export-port=52368", "--runtime-env-agent-port=52369"]


def interpolate(text: str, env: dict[str, str]) -> str:
    """compose's ${VAR}, ${VAR:-default} and ${VAR:?message}."""
    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        value = env.get(name)
        if value:
            return value
        if op == "?":
            raise ValueError(f"{name} is not set: {arg}")
        return arg if op == "-" else ""
    return _VAR.sub(one, text)


def load(env: dict[str, str] | None = None, path: Path = COMPOSE) -> dict:
    """The compose file with its variables filled from `env` (default: os.environ)."""
    return yaml.safe_load(interpolate(path.read_text(), dict(os.environ if env is None
                                                             else env)))


def run_args(service: str, *, name: str | None = None, env: dict[str, str] | None = None,
             volumes: dict[str, str] | None = None, image: str | None = None,
             options: list[str] = (), path: Path = COMPOSE) -> list[str]:
    """`podman run -d ...` for one compose service (without the leading `podman`)."""
    spec = load(env, path)
    svc = spec["services"][service]
    volumes = volumes or {}
    args = ["run", "-d", "--name", name or f"{spec.get('name', 'compose')}-{service}",
            "--network", "host", *options]
    if "shm_size" in svc:
        args += ["--shm-size", str(svc["shm_size"]).replace("gb", "g").replace("mb", "m")]
    for key, value in (svc.get("environment") or {}).items():
        args += ["-e", f"{key}={value}"]
    for vol in svc.get("volumes") or []:
        src, dst, *mode = vol.split(":")
        if src in volumes:
            src = volumes[src]
        elif src.startswith("."):
            src = str((path.parent / src).resolve())
        args += ["-v", ":".join([src, dst, *mode])]
    command = svc["command"]
    words = shlex.split(command) if isinstance(command, str) else list(command)
    words = [w.replace("ray-head:", "127.0.0.1:").replace("=0.0.0.0", "=127.0.0.1")
             for w in words]
    if words[:2] == ["ray", "start"]:
        words.insert(2, "--node-ip-address=127.0.0.1")
        if "--head" not in words:
            words[3:3] = WORKER_PORTS
    return args + [image or svc["image"]] + words


def health_check(service: str, env: dict[str, str] | None = None,
                 path: Path = COMPOSE) -> list[str] | None:
    """The service's healthcheck command, rewritten as its command is, or None."""
    test = (load(env, path)["services"][service].get("healthcheck") or {}).get("test")
    if not test:
        return None
    words = test[1:] if test[0] in ("CMD", "CMD-SHELL") else test
    return [w.replace("ray-head:", "127.0.0.1:") for w in words]


if __name__ == "__main__":
    services = sys.argv[1:] or ["ray-head", "ray-worker-cpu"]
    env = {"RAY_AUTH_TOKEN": "$RAY_AUTH_TOKEN", **os.environ}
    for s in services:
        print(shlex.join(["podman", "--runtime", "runc", *run_args(
            s, env=env, options=["--ulimit", "nofile=1024:1024",
                                 "--ulimit", "nproc=4096:4096"])]))
