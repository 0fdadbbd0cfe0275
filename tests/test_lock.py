"""One encode job per cache (cache/lock.py) and a full disk during encode: real processes
that hold the lock, die with it or lose it, real Ray, real write errors."""

import errno
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_jpeg_folder

from cache import create_cache, open_cache
from cache.format import done_shards, read_manifest
from cache.lock import LOCK_NAME, CacheLock, CacheLockedError, read_lock
from pipeline import cli
from pipeline.job import (EncodeConfig, locked_write_stage, make_plan, no_space_error,
                          run_encode)
from pipeline.stages import EncodeStage, decode_stage, shard_row

REPO = Path(__file__).resolve().parents[1]
TINY = dict(dataset="imagefolder", resolution=64, vae="tiny", teacher="dinov2-tiny",
            random_weights=True, shard_size=4, batch_size=3, progress=False)
TINY_ARGS = ["--dataset", "imagefolder", "--resolution", "64", "--vae", "tiny", "--teacher",
             "dinov2-tiny", "--random-weights", "--shard-size", "4", "--no-progress"]

# another encode job in its own process: takes the lock, says so, then checks every 50 ms
# that the lock is still its own (as the encode driver does before finalizing). It loads
# cache/lock.py without cache/__init__.py, whose loader imports torch (seconds per process)
HOLDER = """
import sys, time, types
sys.modules["cache"] = pkg = types.ModuleType("cache")
pkg.__path__ = ["cache"]
from cache.lock import CacheLock, LockLostError
lock = CacheLock(sys.argv[1], command="holder job", heartbeat_s=float(sys.argv[2]))
lock.acquire()
print("held", flush=True)
try:
    while True:
        time.sleep(0.05)
        lock.check()
except LockLostError as e:
    print("lost:", e, flush=True)
    lock.release()
    sys.exit(3)
"""


def _hold(root, heartbeat_s=30.0) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), str(heartbeat_s)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    assert line == "held\n", proc.stderr.read()
    return proc


def _killed_holder(root) -> int:
    """The lock file of a job that was SIGKILLed (its pid, now dead and reaped)."""
    proc = _hold(root)
    proc.kill()
    proc.wait()
    return proc.pid


def _foreign_lock(root, heartbeat_age_s, **extra) -> dict:
    """The lock of a job on another machine, as that machine's CacheLock writes it."""
    now = time.time()
    info = {"lock": "urepa-cache encode job", "host": "other-node.example", "boot_id": "b",
            "pid_ns": "pid:[1]", "pid": 4242, "pid_start": "77", "started": "2026-01-02T03:04:05Z",
            "heartbeat": "?", "heartbeat_unix": now - heartbeat_age_s, "heartbeat_every_s": 30,
            "stale_after_s": 600, "token": "f" * 32, "command": "pipeline encode --out X",
            **extra}
    Path(root).mkdir(parents=True, exist_ok=True)
    (Path(root) / LOCK_NAME).write_text(json.dumps(info))
    return info


@pytest.fixture(scope="module")
def ray_local():
    import ray
    # 4 logical CPUs on a 2-core machine: a CPU encoder plus decode and write tasks
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _cfg(out, data, **kw):
    return EncodeConfig(out=str(out), data_dir=str(data), **{**TINY, **kw})


# ---------------------------------------------------------------- the lock, real processes

def test_a_second_job_is_refused_naming_the_first(tmp_path, capsys):
    out = tmp_path / "cache"
    holder = _hold(out, heartbeat_s=0.1)
    try:
        info = read_lock(out)
        assert (info["pid"], info["host"]) == (holder.pid, socket.gethostname())
        with pytest.raises(CacheLockedError) as e:
            CacheLock(out).acquire()
        for part in (f"pid {holder.pid} on host {socket.gethostname()}",
                     f"started {info['started']}", "command: holder job", "--break-lock"):
            assert part in str(e.value)
        # the holder's heartbeat moves on (what another machine judges it by)
        time.sleep(0.5)
        assert read_lock(out)["heartbeat_unix"] > info["heartbeat_unix"]
        # `pipeline encode` on the same --out: refused before any work, one line, exit 4
        data = write_jpeg_folder(tmp_path / "data", classes=1, per_class=2)
        assert cli.main(["encode", *TINY_ARGS, "--data-dir", str(data), "--out",
                         str(out)]) == 4
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: ")
        assert f"pid {holder.pid} on host {socket.gethostname()}, started {info['started']}" in err
        assert read_lock(out)["token"] == info["token"] and holder.poll() is None
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_job_is_taken_over(tmp_path):
    out = tmp_path / "cache"
    pid = _killed_holder(out)
    notes = []
    lock = CacheLock(out, log=notes.append).acquire()
    assert len(notes) == 1 and f"took over the lock of pid {pid}" in notes[0]
    assert f"its process {pid} is no longer running" in notes[0]
    assert read_lock(out)["token"] == lock.token
    lock.release()
    assert not (out / LOCK_NAME).exists()
    # a killed job that nobody reaped yet (a zombie) is gone too
    proc = _hold(out)
    proc.kill()
    while open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.01)
    notes.clear()
    CacheLock(out, log=notes.append).acquire().release()
    proc.wait()
    assert f"its process {proc.pid} has exited (a zombie)" in notes[0]
    # its pid reused by another process (here: this one) does not keep the lock alive
    pid = _killed_holder(out)
    info = read_lock(out)
    (out / LOCK_NAME).write_text(json.dumps({**info, "pid": os.getpid()}))
    notes.clear()
    CacheLock(out, log=notes.append).acquire().release()
    assert f"its pid {os.getpid()} now belongs to another process" in notes[0]


def test_another_machines_lock_is_stale_only_when_its_heartbeat_is_old(tmp_path):
    out = tmp_path / "cache"
    _foreign_lock(out, heartbeat_age_s=20)
    with pytest.raises(CacheLockedError) as e:
        CacheLock(out).acquire()
    msg = str(e.value)
    assert "pid 4242 on host other-node.example, started 2026-01-02T03:04:05Z" in msg
    assert "last heartbeat 20 s ago" in msg and "expires 600 s after" in msg
    # a holder that declared a longer timeout keeps its lock longer
    _foreign_lock(out, heartbeat_age_s=3600, stale_after_s=7200)
    with pytest.raises(CacheLockedError, match="expires 7200 s after"):
        CacheLock(out).acquire()
    _foreign_lock(out, heartbeat_age_s=3600)
    notes = []
    lock = CacheLock(out, log=notes.append).acquire()
    assert "took over the lock of pid 4242 on host other-node.example" in notes[0]
    assert "another machine and its heartbeat is 3600 s old (stale after 600 s)" in notes[0]
    lock.release()
    # an unreadable lock file: refused while young, taken over once old
    (out / LOCK_NAME).write_text("{half a lo")
    with pytest.raises(CacheLockedError, match="unreadable lock file .*not JSON"):
        CacheLock(out).acquire()
    os.utime(out / LOCK_NAME, (time.time() - 3600,) * 2)
    notes.clear()
    CacheLock(out, log=notes.append).acquire().release()
    assert "it is unreadable and 3600 s old" in notes[0]


def test_break_lock_takes_a_live_lock_and_its_holder_stops(tmp_path, capsys):
    out = tmp_path / "cache"
    holder = _hold(out, heartbeat_s=0.1)
    notes = []
    lock = CacheLock(out, break_lock=True, log=notes.append).acquire()
    try:
        assert f"broke the lock of pid {holder.pid} on host" in notes[0]
        assert notes[0].endswith(": --break-lock")
        # the holder notices and stops without removing the new lock
        assert holder.wait(timeout=30) == 3
        said = holder.stdout.read()
        assert f"lost: {out}: this encode job's lock {LOCK_NAME} was taken over by " \
               f"pid {os.getpid()}" in said
        assert read_lock(out)["token"] == lock.token
    finally:
        lock.release()
        holder.kill()
        holder.wait()
    # the command's flag: breaks a live holder's lock (saying whose), then this job fails
    # on its missing --data-dir (exit 2) and releases the lock it took
    holder = _hold(out, heartbeat_s=0.1)
    try:
        assert cli.main(["encode", *TINY_ARGS, "--data-dir", str(tmp_path / "nowhere"),
                         "--out", str(out), "--break-lock"]) == 2
        said = capsys.readouterr()
        assert f"lock: broke the lock of pid {holder.pid} on host" in said.out
        assert "does not exist" in said.err
        assert holder.wait(timeout=30) == 3
        assert not (out / LOCK_NAME).exists()
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_released_after_a_failure(tmp_path, capsys):
    out = tmp_path / "cache"
    pid = _killed_holder(out)
    # a stale lock alone is not "a directory that is not a cache"; the job takes it over,
    # fails on its data directory, and releases the lock
    assert cli.main(["encode", *TINY_ARGS, "--data-dir", str(tmp_path / "nowhere"), "--out",
                     str(out)]) == 2
    said = capsys.readouterr()
    assert f"lock: took over the lock of pid {pid}" in said.out and "does not exist" in said.err
    assert not (out / LOCK_NAME).exists()
    # a new --out that the job created for its lock is removed with it
    assert cli.main(["encode", *TINY_ARGS, "--data-dir", str(tmp_path / "nowhere"), "--out",
                     str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()


def test_an_fsspec_url_lock_is_written_then_read_back(tmp_path):
    url = "memory://test-lock/cache"
    first = CacheLock(url, settle_s=0.05).acquire()
    try:
        assert read_lock(url)["token"] == first.token
        with pytest.raises(CacheLockedError, match=f"pid {os.getpid()} on host"):
            CacheLock(url, settle_s=0.05).acquire()
    finally:
        first.release()
    assert read_lock(url) is None


def _one_encoded_shard(tmp_path):
    """A 4-image job (one shard) and that shard decoded and encoded by the job's stages,
    as the write task receives it (the stages without Ray)."""
    data = write_jpeg_folder(tmp_path / "data", classes=1, per_class=4)
    cfg = _cfg(tmp_path / "cache", data)
    plan = make_plan(cfg)
    models = dict(vae="tiny", teacher="dinov2-tiny", teacher_weights=None,
                  random_weights=True, seed=0)
    encode = EncodeStage(models, plan.hashes, device="cpu", precision="fp32", batch_size=3,
                         threads=1, resolution=64)
    decoded = decode_stage(shard_row(plan.source, plan.spec, 0), resolution=64, views=1)
    row = {k: v[0] for k, v in encode({k: np.asarray([v]) for k, v in decoded.items()}).items()}
    return cfg, plan, row


def test_write_tasks_refuse_a_lock_that_is_not_the_jobs(tmp_path):
    """A job whose lock was broken writes no further shard: the write stage checks the
    lock's token first and hands the refusal back to the driver in its row (which raises
    LockLostError); with the job's token it writes."""
    cfg, plan, row = _one_encoded_shard(tmp_path)
    out = Path(cfg.out)
    with CacheLock(out) as lock:
        create_cache(out, plan.spec, plan.provenance)
        refused = locked_write_stage(row, root=str(out), lock_token="0" * 32)
        assert done_shards(out, "zarr") == set()
        written = locked_write_stage(row, root=str(out), lock_token=lock.token)
    stop = json.loads(refused["stop"])
    assert stop["lock_lost"].startswith(f"{out}: this encode job's lock {LOCK_NAME} was "
                                        f"taken over by pid {os.getpid()} on host")
    assert written["stop"] == "" and written["images"] == 4
    assert done_shards(out, "zarr") == {0}


# ---------------------------------------------------------------- end to end, real Ray

def test_encode_takes_over_a_killed_jobs_lock_and_releases_it(ray_local, tmp_path):
    """`run_encode` after a job that wrote the cache's only shard and was SIGKILLed: the
    directory holding a cache and a stale lock is accepted, the lock is taken over (saying
    whose), this job's while it runs, and released after the success. (The job only has
    to finalize; the Ray pipeline under the lock runs in the full-disk test below.)"""
    cfg, plan, row = _one_encoded_shard(tmp_path)
    out = Path(cfg.out)
    with CacheLock(out) as lock:
        create_cache(out, plan.spec, {**plan.provenance, "precision": "fp32"})
        assert locked_write_stage(row, root=str(out), lock_token=lock.token)["stop"] == ""
    pid = _killed_holder(out)
    said, held = [], []

    def log(line):
        said.append(line)
        held.append(read_lock(out))   # the plan line comes while the job runs
    summary = run_encode(cfg, log=log)
    assert summary["shards_encoded"] == 0 and summary["shards_total"] == 1
    assert said[0].startswith(f"lock: took over the lock of pid {pid} on host ")
    assert said[0].endswith(f"its process {pid} is no longer running")
    assert (held[1]["pid"], held[1]["command"]) == (os.getpid(), shlex.join(sys.argv))
    assert not (out / LOCK_NAME).exists()
    assert read_manifest(out)["status"] == "complete" and open_cache(out).verify().ok


# ---------------------------------------------------------------- a full disk

FSIZE_DRIVER = """
import resource, sys
from pipeline import cli
# a file size limit below the size of the lock file: its first write fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (64, resource.RLIM_INFINITY))
sys.exit(cli.main(sys.argv[1:]))
"""

FSIZE_WORKERS = """
import logging, resource, sys
import ray

def limit():   # every worker of this job: files up to 80 KiB (Ray's own logs stay smaller)
    resource.setrlimit(resource.RLIMIT_FSIZE, (80 << 10, resource.RLIM_INFINITY))

ray.init(address=sys.argv[1], logging_level=logging.WARNING,
         runtime_env={"worker_process_setup_hook": limit})
from pipeline import cli
print("--- cli ---", file=sys.stderr, flush=True)
sys.exit(cli.main(sys.argv[2:]))
"""


def test_no_space_in_the_driver_is_one_line(tmp_path):
    data = write_jpeg_folder(tmp_path / "data", classes=1, per_class=2)
    out = tmp_path / "cache"
    r = subprocess.run([sys.executable, "-c", FSIZE_DRIVER, "encode", *TINY_ARGS,
                        "--data-dir", str(data), "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 5, r.stderr[-3000:]
    err = r.stderr.strip()
    assert err.count("\n") == 0, err
    assert err == (f"error: file too large for the file system or the process's file size "
                   f"limit (ulimit -f) while writing {out} ([Errno 27] File too large): the "
                   "shards already done are kept; free space and rerun the same command to "
                   "resume")
    assert not out.exists()


def test_no_space_in_a_write_task_is_one_line(ray_local, tmp_path):
    """The write tasks of the job hit a real EFBIG (their processes' file size limit) for
    the first shard's files (12 images at 128 px and two views: 96 KiB of moments, 192 KiB
    of tokens); the second shard (1 image: 64 KiB at most) fits. One error line, no
    traceback, exit 5, the lock released."""
    data = write_jpeg_folder(tmp_path / "data", classes=1, per_class=13)
    out = tmp_path / "cache"
    args = ["encode", *TINY_ARGS, "--resolution", "128", "--views", "2", "--shard-size", "12",
            "--batch-size", "4", "--data-dir", str(data), "--out", str(out)]
    r = subprocess.run([sys.executable, "-c", FSIZE_WORKERS, ray_local, *args], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 5, r.stderr[-3000:]
    # Ray's own notices (a constructor argument in the object store, a worker's torch
    # warning) come on any run; ours is one line, last, and there is no traceback
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    err = r.stderr.split("--- cli ---\n", 1)[1].strip().splitlines()
    assert [line for line in err if line.startswith("error")] == err[-1:], err
    assert err[-1] == (
        f"error: file too large for the file system or the process's file size limit "
        f"(ulimit -f) while writing {out} (shard 0, on {socket.gethostname()}: [Errno 27] "
        "File too large): the shards already done are kept; free space and rerun the same "
        "command to resume")
    # shard 1 is done when it was written before the driver stopped the job (usually)
    assert 0 not in done_shards(out, "zarr") <= {1}
    assert read_manifest(out)["status"] == "incomplete" and not (out / LOCK_NAME).exists()


def test_no_space_is_found_in_a_real_ray_task_error(ray_local):
    import ray

    @ray.remote
    def fails(code):
        raise OSError(code, os.strerror(code), "/cache/zarr/moments/c/3/0/0/0/0")

    with pytest.raises(ray.exceptions.RayTaskError) as e:
        ray.get(fails.remote(errno.ENOSPC))
    found = no_space_error(e.value)
    assert found.errno == errno.ENOSPC and found.filename == "/cache/zarr/moments/c/3/0/0/0/0"
    with pytest.raises(ray.exceptions.RayTaskError) as e:
        ray.get(fails.remote(errno.EDQUOT))
    assert no_space_error(e.value).errno == errno.EDQUOT
    with pytest.raises(ray.exceptions.RayTaskError) as e:
        ray.get(fails.remote(errno.EACCES))
    assert no_space_error(e.value) is None      # not a full disk: the traceback stays
    try:   # further down an exception's chain
        try:
            ray.get(fails.remote(errno.ENOSPC))
        except Exception as inner:
            raise RuntimeError("writing the manifest") from inner
    except RuntimeError as outer:
        assert no_space_error(outer).errno == errno.ENOSPC
