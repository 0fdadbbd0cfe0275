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
SECRETS = {"RAY_AUTH_TOKEN"}   # passed by name: the value never appears in an argv or log
_VAR = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")
# the worker's dashboard agent and metrics ports: the head's defaults are taken on a
# shared host network
WORKER_PORTS = ["--dashboard-agent-listen-port=52366", "--dashboard-agent-grpc-port=52367",
                "--metrics-export-port=52368", "--runtime-env-agent-port=52369"]


def interpolate(text: str, env: dict[str, str]) -> str:
    """compose's $$, $VAR, ${VAR}, ${VAR-default}, ${VAR:-default}, ${VAR?msg} and
    ${VAR:?msg} in one string value."""
    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2) or "", m.group(3) or ""
        value = env.get(name)
        missing = value is None or (op.startswith(":") and value == "")
        if not missing:
            return value
        if op.endswith("?"):
            raise ValueError(f"{name} is not set: {arg}")
        return arg if op.endswith("-") else ""
    return _VAR.sub(one, text)


def _fill(node, env: dict[str, str]):
    """Variables filled in the parsed file's string values (after parsing, so a value
    stays the string it is: no YAML reading of 'yes', '0x1F' or '# ...' in a token)."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_fill(v, env) for v in node]
    if isinstance(node, dict):
        return {k: _fill(v, env) for k, v in node.items()}
    return node


def dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of compose's .env file beside the compose file (if any)."""
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            key, eq, value = line.strip().partition("=")
            if eq and key and not key.startswith("#"):
                out[key.strip()] = value.strip().strip("'\"")
    return out


def load(env: dict[str, str] | None = None, path: Path = COMPOSE) -> dict:
    """The compose file with its variables filled from `env` (default: os.environ over
    docker/.env, as compose does)."""
    env = {**dotenv(path.parent / ".env"), **(os.environ if env is None else env)}
    return _fill(yaml.safe_load(path.read_text()), env)


def _environment(svc: dict) -> dict[str, str | None]:
    env = svc.get("environment") or {}
    if isinstance(env, list):   # ["KEY=value", "KEY"]
        env = dict(item.partition("=")[::2] if "=" in item else (item, None) for item in env)
    return {k: None if v is None else str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in env.items()}


def run_args(service: str, *, name: str | None = None, env: dict[str, str] | None = None,
             volumes: dict[str, str] | None = None, image: str | None = None,
             options: list[str] = (), network: str = "host",
             path: Path = COMPOSE) -> list[str]:
    """`podman run -d ...` for one compose service (without the leading `podman`). The
    variables in SECRETS are passed by name: run podman with them in its environment.
    `network`: "host", or "none" for the head and "container:<head>" for the workers
    (one network namespace with nothing but loopback, shared by the cluster)."""
    spec = load(env, path)
    svc = spec["services"][service]
    volumes = volumes or {}
    args = ["run", "-d", "--name", name or f"{spec.get('name', 'compose')}-{service}",
            "--network", network, *options]
    if "shm_size" in svc:
        args += ["--shm-size", str(svc["shm_size"])]
    if svc.get("restart") and svc["restart"] != "no":
        args += ["--restart", svc["restart"]]
    grace = str(svc.get("stop_grace_period", ""))
    if grace.endswith("s") and grace[:-1].isdigit():
        args += ["--stop-timeout", grace[:-1]]
    devices = ((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}
    if any(d.get("driver") == "nvidia" for d in devices.get("devices") or []):
        args += ["--device", "nvidia.com/gpu=all"]   # CDI, the NVIDIA container toolkit's
    for key, value in _environment(svc).items():
        args += ["-e", key if key in SECRETS or value is None else f"{key}={value}"]
    for vol in svc.get("volumes") or []:
        src, dst, *mode = vol.split(":")
        if src in volumes:
            src = volumes[src]
        elif src.startswith("."):
            src = str((path.parent / src).resolve())
        args += ["-v", ":".join([src, dst, *mode])]
    command = svc["command"]
    words = shlex.split(command) if isinstance(command, str) else list(command)
    words = [w.replace("ray-head:", "127.0.0.1:").replace("0.0.0.0", "127.0.0.1")
             for w in words]
    if words[:2] == ["ray", "start"]:
        words.insert(2, "--node-ip-address=127.0.0.1")
        if "--head" not in words:
            words[3:3] = WORKER_PORTS
    return args + [image or svc["image"]] + words


def health_check(service: str, env: dict[str, str] | None = None,
                 path: Path = COMPOSE) -> list[str] | None:
    """The service's healthcheck command as an argv, rewritten as its command is."""
    test = (load(env, path)["services"][service].get("healthcheck") or {}).get("test")
    if not test or test == ["NONE"]:
        return None
    if isinstance(test, str):
        words = ["sh", "-c", test]
    elif test[0] == "CMD-SHELL":
        words = ["sh", "-c", " ".join(test[1:])]
    else:
        words = test[1:] if test[0] == "CMD" else test
    return [w.replace("ray-head:", "127.0.0.1:") for w in words]


if __name__ == "__main__":
    services = sys.argv[1:] or ["ray-head", "ray-worker-cpu"]
    env = {"RAY_AUTH_TOKEN": "unused-here", **os.environ}   # passed by name anyway
    print("# run with RAY_AUTH_TOKEN set in the environment (podman passes it on by name)")
    for s in services:
        print(shlex.join(["podman", "--runtime", "runc", *run_args(
            s, env=env, options=["--ulimit", "nofile=1024:1024",
                                 "--ulimit", "nproc=4096:4096"])]))
