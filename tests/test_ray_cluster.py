"""A real two-node Ray cluster on loopback: `ray start --head` and `ray start --address`
as separate processes with their own resources, `pipeline encode --address` against it,
and the worker node killed mid-job. The job finishes through Ray's retries on a
replacement node (or a rerun finishes it); the cache verifies and equals the one an
embedded single-process run writes from the same images."""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import write_jpeg_folder

from cache import open_cache
from cache.format import done_shards, read_manifest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
# Ray 2.60 clusters started by `ray start` require a token: every node and driver of this
# cluster shares one (a real cluster passes it the same way: RAY_AUTH_TOKEN or a file)
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0",
       "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _encode(data, out, *extra) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "encode", "--dataset", "imagefolder",
            "--data-dir", str(data), "--out", str(out), "--resolution", "64", "--vae", "tiny",
            "--teacher", "dinov2-tiny", "--random-weights", "--shard-size", "2",
            "--batch-size", "3", "--no-progress", *extra]


class Cluster:
    """Ray nodes started with `ray start --block`, each in its own process group, with a
    private temp dir (so no other Ray on this machine finds or stops them)."""

    def __init__(self, log_dir: Path):
        self.temp = tempfile.mkdtemp(prefix="urc-", dir="/tmp")  # short: socket paths
        self.port, self.log_dir, self.nodes = _free_port(), log_dir, []
        self.address = f"127.0.0.1:{self.port}"

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "w")
        proc = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats",
                                 "--temp-dir", self.temp, *args], env=ENV, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append(proc)
        return proc

    def head(self, cpus: int) -> None:
        self.start("head", "--head", "--node-ip-address", "127.0.0.1", "--port",
                   str(self.port), "--num-cpus", str(cpus), "--num-gpus", "0",
                   "--include-dashboard", "false")

    def worker(self, name: str, cpus: int) -> subprocess.Popen:
        # another loopback address: the driver attaches to the head's node, not this one
        return self.start(name, "--address", self.address, "--node-ip-address", "127.0.0.2",
                          "--num-cpus", str(cpus), "--num-gpus", "0")

    def wait_for_nodes(self, n: int, timeout: float = 120) -> None:
        script = ("import ray; ray.init(address='%s', logging_level='ERROR'); "
                  "print(sum(x['Alive'] for x in ray.nodes()))" % self.address)
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True,
                                 text=True, timeout=60)
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
                return
            time.sleep(1)
        raise TimeoutError(f"{n} Ray nodes never came up: "
                           + (self.log_dir / "head.log").read_text()[-2000:])

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        """SIGKILL a node: its process group holds `ray start`, the raylet, its agents and
        every worker process it started."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def shutdown(self) -> None:
        for proc in self.nodes:
            if proc.poll() is None:
                self.kill(proc)
        for p in Path("/proc").iterdir():  # stragglers of this cluster, if any
            try:
                if p.name.isdigit() and self.temp in (p / "cmdline").read_bytes().decode(
                        errors="replace"):
                    os.kill(int(p.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    c.shutdown()


def _hashes(root):
    return {b: [s["files"] for s in t] for b, t in read_manifest(root)["shards"].items()}


def test_encode_on_a_two_node_cluster_survives_a_killed_worker_node(cluster, tmp_path):
    data = write_jpeg_folder(tmp_path / "data", classes=4, per_class=15)    # 30 shards
    ref = tmp_path / "ref"
    out = subprocess.run(_encode(data, ref, "--num-cpus", "2"), cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]

    cluster.head(cpus=1)                        # the driver's node: one CPU
    worker = cluster.worker("worker-1", cpus=3)  # most of the work lands here
    cluster.wait_for_nodes(2)
    cache = tmp_path / "cluster"
    cmd = _encode(data, cache, "--address", cluster.address, "--num-gpus", "0",
                  "--format", "both")
    job = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and job.poll() is None and \
                len(done_shards(cache, "wds")) < 3:
            time.sleep(0.1)
        done_at_kill = len(done_shards(cache, "wds"))
        assert job.poll() is None and 3 <= done_at_kill < 30, job.stdout.read()
        cluster.kill(worker)                    # mid-job: the node and its workers die
        cluster.worker("worker-2", cpus=3)      # as KubeRay or an autoscaler would
        log, _ = job.communicate(timeout=400)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    rerun = None
    if job.returncode != 0:                     # the driver gave up: the rerun finishes it
        rerun = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True,
                               timeout=400)
        assert rerun.returncode == 0, log[-2000:] + rerun.stdout[-2000:] + rerun.stderr[-2000:]
    print(f"killed after {done_at_kill}/30 shards; "
          f"{'finished by a rerun' if rerun else 'the job finished through retries'}")
    for backend in ("zarr", "wds"):
        assert open_cache(cache, backend=backend).verify().ok
    assert _hashes(cache)["zarr"] == _hashes(ref)["zarr"]   # the same bytes as one process
    assert read_manifest(cache)["provenance"]["command"]["address"] == cluster.address
