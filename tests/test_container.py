"""The cluster jobs for real (issue 20): the image built from docker/Dockerfile on a local
Ubuntu base, the compose cluster (head + one CPU worker) run with podman from commands
derived from docker/compose.yaml, `pipeline encode --address auto` inside it, the worker
killed mid-job and replaced; the cache verifies and equals an embedded-Ray encode in the
same image; then a short `train run` in the image from that cache.

The cluster shares one network namespace with nothing but loopback (head `--network
none`, worker `--network container:<head>`): no bridge network, and nothing of Ray
listens on the host (docker/README.md says why host networking does not do that).

Needs root, podman (runc), debootstrap, gpg, curl and the package archives (Ubuntu's,
PyPI); root with apt-get installs the tools where missing. Skipped where any of that is
missing, where podman cannot run a container, with under 20 GiB free, or with
UREPA_CONTAINER_TESTS=0. The first run builds the image (~10 minutes on 2 cores, most of
it installing torch); later runs reuse podman's layer cache (~3 minutes in all).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docker" / "local"))
import compose_podman  # noqa: E402

pytestmark = pytest.mark.container

BASE = "localhost/ubuntu:noble"
IMAGE = "localhost/urepa-cache:test"
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
PODMAN = ["podman", "--runtime", "runc"]
ENCODE = ["--dataset", "demo", "--data-dir", "/data", "--resolution", "128", "--vae", "tiny",
          "--teacher", "dinov2-tiny", "--random-weights", "--shard-size", "16",
          "--num-gpus", "0", "--cpu-encoders", "1", "--batch-size", "8"]


def sh(*cmd: str, timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)[:300]} -> {p.returncode}\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def engine():
    """podman that can run a container here (installed with apt-get where missing)."""
    if os.environ.get("UREPA_CONTAINER_TESTS") == "0":
        pytest.skip("UREPA_CONTAINER_TESTS=0")
    if os.geteuid() != 0:
        pytest.skip("the container test runs as root (rootful podman, debootstrap)")
    tools = {"podman": "podman", "runc": "runc", "debootstrap": "debootstrap", "gpg": "gpg",
             "curl": "curl", "dpkg-deb": "dpkg"}
    missing = sorted({pkg for tool, pkg in tools.items() if not shutil.which(tool)})
    if missing:
        if not shutil.which("apt-get"):
            pytest.skip(f"{missing} missing and no apt-get to install them")
        install = ["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=300", *missing]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        p = sh(*install, check=False, timeout=900, env=env)
        if p.returncode != 0:   # no or stale package lists: once more after an update
            sh("apt-get", "update", "-q", check=False, timeout=600)
            p = sh(*install, check=False, timeout=900, env=env)
        if p.returncode != 0:
            pytest.skip(f"cannot install podman here: {p.stderr.strip()[-300:]}")
    p = sh("curl", "-fsS", "-o", "/dev/null", "-m", "20",
           "http://archive.ubuntu.com/ubuntu/dists/noble/Release", check=False)
    q = sh("curl", "-fsS", "-o", "/dev/null", "-m", "20", "https://pypi.org/simple/pip/",
           check=False)
    if p.returncode or q.returncode:
        pytest.skip("Ubuntu's archive or PyPI cannot be reached: the image cannot be built")
    free = shutil.disk_usage("/var/lib/containers" if Path("/var/lib/containers").exists()
                             else "/var/lib").free
    if free < 20 * 2**30:
        pytest.skip(f"{free / 2**30:.0f} GiB free for podman's storage; the build needs ~20")
    return PODMAN


@pytest.fixture(scope="module")
def image(engine):
    """The project's image, from docker/Dockerfile on the local Ubuntu base."""
    sh("sh", str(ROOT / "docker" / "local" / "base-image.sh"), BASE, timeout=1200)
    ran = sh(*engine, "run", "--rm", "--network", "none", *LIMITS, BASE, "true", check=False)
    if ran.returncode:
        pytest.skip(f"podman cannot run a container here: {ran.stderr.strip()[-300:]}")
    t = time.perf_counter()
    certs = ["--volume", "/etc/ssl/certs:/host-certs:ro",
             "--build-arg", "PIP_CERT=/host-certs/ca-certificates.crt"] \
        if Path("/etc/ssl/certs/ca-certificates.crt").exists() else []
    sh(*engine, "build", "--network", "host", *LIMITS, *certs,
       "--ignorefile", str(ROOT / "docker" / "Dockerfile.dockerignore"),
       "--build-arg", f"BASE_IMAGE={BASE}", "-f", str(ROOT / "docker" / "Dockerfile"),
       "-t", IMAGE, str(ROOT), timeout=3000)
    print(f"image built in {time.perf_counter() - t:.0f} s")
    sh(*engine, "image", "prune", "-f", check=False)   # earlier builds' layers (~7 GB each)
    return IMAGE


def shared_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, 1000, 1000)   # the image's user
    return path


def done_shards(cache: Path) -> int:
    from cache.format import done_shards as done
    return len(done(cache, "zarr"))


@pytest.mark.timeout(3600)   # the first run builds the image
def test_compose_cluster_survives_a_killed_worker(image, tmp_path):
    env = {"RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_SHM_SIZE": "2gb",
           "DATA_DIR": str(shared_dir(tmp_path / "data"))}
    podman_env = {**os.environ, "RAY_AUTH_TOKEN": env["RAY_AUTH_TOKEN"]}   # by name only
    cache_root, hf, runs = (shared_dir(tmp_path / n) for n in ("cache", "hf", "runs"))
    volumes = {"urepa-cache": str(cache_root), "urepa-hf": str(hf)}
    names = {"ray-head": "urepa-test-head", "ray-worker-cpu": "urepa-test-worker",
             "embedded": "urepa-test-embedded", "train": "urepa-test-train"}

    def start(service: str) -> None:
        # one network namespace with nothing but loopback, the head's, shared by the
        # worker: every Ray service listens on loopback only (Ray binds all interfaces and
        # takes 127.0.0.1 for the host's address, so host networking would expose them)
        network = "none" if service == "ray-head" else f"container:{names['ray-head']}"
        sh(*PODMAN, *compose_podman.run_args(service, name=names[service], env=env,
                                             volumes=volumes, image=image, options=LIMITS,
                                             network=network),
           env=podman_env)

    def cluster_cpus() -> float:
        p = sh(*PODMAN, "exec", names["ray-head"], "python", "-c",
               "import ray; ray.init('auto', logging_level='ERROR'); "
               "print(ray.cluster_resources().get('CPU', 0))", check=False)
        try:
            return float(p.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            return 0.0

    def wait_for_worker() -> None:
        for _ in range(60):
            if cluster_cpus() > 0:
                return
            time.sleep(2)
        raise AssertionError("the worker never joined\n" + logs(names["ray-worker-cpu"]))

    def logs(name: str) -> str:
        return sh(*PODMAN, "logs", name, check=False).stdout[-2000:]

    for n in reversed(names.values()):   # workers first: they use the head's network
        sh(*PODMAN, "rm", "-f", n, check=False)
    try:
        t0 = time.perf_counter()
        start("ray-head")
        check = compose_podman.health_check("ray-head", env)
        for _ in range(60):
            if sh(*PODMAN, "exec", names["ray-head"], *check, check=False).returncode == 0:
                break
            time.sleep(2)
        else:
            raise AssertionError("the head never became healthy\n" + logs(names["ray-head"]))
        start("ray-worker-cpu")
        # the demo set, written by the image's own code into the data directory
        sh(*PODMAN, "run", "--rm", "--network", "none", *LIMITS, "-v",
           f"{env['DATA_DIR']}:/data", image, "python", "-c",
           "from pipeline.demo_data import ensure_demo_images; ensure_demo_images('/data')")
        wait_for_worker()
        head_started = time.perf_counter() - t0

        job = subprocess.Popen(
            [*PODMAN, "exec", names["ray-head"], "pipeline", "encode", *ENCODE,
             "--out", "/cache/demo", "--address", "auto"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        cache = cache_root / "demo"
        deadline = time.time() + 600
        while done_shards(cache) < 2 and job.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        killed_at = done_shards(cache)
        assert job.poll() is None, "the job ended before the worker could be killed:\n" + \
            job.stdout.read()[-3000:]
        assert 2 <= killed_at < 20, killed_at   # mid-job: 20 shards in all
        sh(*PODMAN, "kill", names["ray-worker-cpu"])
        sh(*PODMAN, "rm", "-f", names["ray-worker-cpu"])
        start("ray-worker-cpu")
        try:
            out, _ = job.communicate(timeout=900)
        except subprocess.TimeoutExpired:   # the driver runs in the head: stop it there
            sh(*PODMAN, "exec", names["ray-head"], "pkill", "-f", "pipeline encode",
               check=False)
            job.kill()
            out, _ = job.communicate()
        rerun = None
        if job.returncode != 0:   # a rerun of the same command resumes from done markers
            wait_for_worker()
            rerun = sh(*PODMAN, "exec", names["ray-head"], "pipeline", "encode", *ENCODE,
                       "--out", "/cache/demo", "--address", "auto", check=False,
                       timeout=900)
            assert rerun.returncode == 0, out[-3000:] + rerun.stdout[-3000:] + rerun.stderr
        verify = sh(*PODMAN, "exec", names["ray-head"], "pipeline", "verify", "/cache/demo",
                    check=False)
        summary = {"head_and_worker_s": round(head_started, 1), "killed_after_shards":
                   killed_at, "job_exit": job.returncode, "rerun": rerun is not None,
                   "job_tail": out.strip().splitlines()[-3:]}
        print(json.dumps(summary, indent=1))
        (tmp_path / "summary.json").write_text(json.dumps(summary))
        assert verify.returncode == 0, verify.stdout + verify.stderr
        # every shard after the kill ran on the new worker (the head has no CPUs)
        assert done_shards(cache) == 20
        # and nothing of the cluster listened on the host's network
        listening = sh("ss", "-ltnpH", check=False).stdout if shutil.which("ss") else ""
        assert not [line for line in listening.splitlines()
                    if "raylet" in line or "gcs_server" in line], listening

        # the same images through embedded Ray in a fresh container of the same image
        sh(*PODMAN, "run", "--rm", "--name", names["embedded"], "--network", "none",
           "--shm-size", "2g", *LIMITS, "-v", f"{env['DATA_DIR']}:/data:ro",
           "-v", f"{cache_root}:/cache", image,
           "pipeline", "encode", *ENCODE, "--out", "/cache/embedded", timeout=900)
        # a short training run inside the image, from the cluster's cache
        sh(*PODMAN, "run", "--rm", "--name", names["train"], "--network", "none",
           "--shm-size", "1g", *LIMITS, "-v", f"{cache_root}:/cache:ro",
           "-v", f"{runs}:/runs", image, "train", "run", "configs/demo.yaml",
           "data.cache=/cache/demo", "run_dir=/runs/t", "max_steps=6", "log_every=2",
           "checkpoint_every=6", timeout=900)
    finally:   # also what a timeout left running
        for n in reversed(names.values()):   # workers first: they use the head's network
            sh(*PODMAN, "rm", "-f", n, check=False)

    from cache import open_cache
    a, b = open_cache(cache_root / "demo"), open_cache(cache_root / "embedded")
    assert a.spec == b.spec and a.num_valid == b.num_valid > 0
    every = np.arange(a.spec.num_samples)
    assert a.keys(every) == b.keys(every)
    fields = [f for f, spec in a.spec.fields.items() if spec.dtype != "str"]
    x, y = a.gather(every, fields), b.gather(every, fields)
    for name in fields:   # bit for bit: the same code, weights and torch on the same CPU
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)

    assert "/cache/demo" in (runs / "t" / "config.yaml").read_text()
    steps = [json.loads(line)["step"] for line in
             (runs / "t" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6 and (runs / "t" / "checkpoints" / "step_00000006").is_dir()
