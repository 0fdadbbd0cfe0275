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
from cache.lock import (LOCK_NAME, CacheLock, CacheLockedError, LockLostError, check_token,
                        machine, read_lock)
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


# ---------------------------------------------------------------- a lock file that is not
# what a CacheLock writes: every case is a one-line refusal while young (CacheLockedError
# in the job, LockLostError in a write task), taken over once old, never another error

def _lock_fields(here: bool, **extra) -> dict:
    """A lock as CacheLock writes it: of this process on this machine, or of another
    machine's job (heartbeat now), with `extra` replacing fields."""
    if here:
        start = open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19]
        who = {**machine(), "pid": os.getpid(), "pid_start": start}
    else:
        who = {"host": "other-node.example", "boot_id": "b", "pid_ns": "pid:[1]",
               "pid": 4242, "pid_start": "77"}
    return {"lock": "urepa-cache encode job", **who, "started": "2026-01-02T03:04:05Z",
            "heartbeat": "?", "heartbeat_unix": time.time(), "heartbeat_every_s": 30,
            "stale_after_s": 600, "token": "f" * 32, "command": "pipeline encode", **extra}


def _age(path, seconds):
    """Set the mtime of `path` (of a link itself, not its target) `seconds` back."""
    os.utime(path, (time.time() - seconds,) * 2, follow_symlinks=False)


def _refused_then_taken_over(out, why: str):
    """The lock at `out` is unreadable for `why`: refused (one line) while young, lost for a
    write task, taken over (saying so) once an hour old."""
    assert read_lock(out)["unreadable"].startswith(why)
    with pytest.raises(CacheLockedError) as e:
        CacheLock(out).acquire()
    assert f"an unreadable lock file ({why}" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(LockLostError, match=r"was taken over by an unreadable lock file"):
        check_token(out, "f" * 32)
    _age(out / LOCK_NAME, 3600)
    notes = []
    lock = CacheLock(out, log=notes.append).acquire()
    assert read_lock(out)["token"] == lock.token
    lock.release()
    assert len(notes) == 1 and f"unreadable lock file ({why}" in notes[0]
    assert notes[0].endswith("it is unreadable and 3600 s old")
    assert not os.path.lexists(out / LOCK_NAME)


@pytest.mark.parametrize("here, extra, why", [
    (True, {"pid": 10**30}, "damaged: pid is a 31-digit number, not a process id"),
    (True, {"pid": 0}, "damaged: pid is 0, not a process id"),
    (True, {"pid": 2**31}, "damaged: pid is 2147483648, not a process id"),
    (True, {"pid_start": ["x"]}, "damaged: pid_start is a JSON list"),
    (False, {"heartbeat_unix": 10**400}, "damaged: heartbeat_unix is a 401-digit number"),
    (False, {"heartbeat_unix": float("nan")}, "damaged: heartbeat_unix is nan"),
    (False, {"heartbeat_unix": -1e18}, "damaged: heartbeat_unix is -1e+18, not a time"),
    (False, {"stale_after_s": 10**400}, "damaged: stale_after_s is a 401-digit number"),
    (False, {"stale_after_s": float("inf")}, "damaged: stale_after_s is inf"),
    (False, {"heartbeat_every_s": -1}, "damaged: heartbeat_every_s is -1, not seconds"),
    (False, {"boot_id": ["b"]}, "damaged: boot_id is a JSON list"),
    (False, {"command": {"a": 1}}, "damaged: command is a JSON dict"),
])
def test_a_number_or_field_out_of_range_is_a_damaged_lock(tmp_path, here, extra, why):
    """Out-of-range numbers once overflowed in os.kill (a pid of 31 digits on this
    machine) or float() (a heartbeat of 401 digits), made a live holder's lock look stale
    (pid 0, a pid_start that is no start time, a heartbeat in 1970) or never stale (inf)."""
    out = tmp_path / "cache"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps(_lock_fields(here, **extra)))
    _refused_then_taken_over(out, why)


def test_the_readers_own_keys_in_a_lock_file_are_ignored(tmp_path):
    """A lock file cannot pose as unreadable-and-old with keys of read_lock's answer."""
    out = tmp_path / "cache"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps(_lock_fields(False, unreadable="x", age_s="old")))
    assert set(read_lock(out)) >= {"host", "pid", "token"} and "age_s" not in read_lock(out)
    with pytest.raises(CacheLockedError, match="pid 4242 on host other-node.example"):
        CacheLock(out).acquire()


def _valid_lock_elsewhere(tmp_path) -> Path:
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps(_lock_fields(False)))
    return target


@pytest.mark.timeout(20)   # a FIFO once hung every reader here
@pytest.mark.parametrize("kind, why", [
    ("devzero", "_lock.json is a symbolic link, not a regular file"),
    ("link", "_lock.json is a symbolic link, not a regular file"),
    ("fifo", "_lock.json is a FIFO, not a regular file"),
    ("dir", "_lock.json is a directory, not a regular file"),
    ("large", f"larger than {64 << 10} bytes"),
    ("nested", "not JSON: RecursionError"),
])
def test_a_lock_that_is_not_a_regular_small_file_is_never_read(tmp_path, kind, why):
    """A link to /dev/zero once filled the memory, a FIFO hung the job and every write
    task, a directory raised IsADirectoryError, JSON nested 60000 deep RecursionError."""
    out = tmp_path / "cache"
    out.mkdir()
    path = out / LOCK_NAME

    def make():
        if kind == "devzero":
            path.symlink_to("/dev/zero")
        elif kind == "link":
            path.symlink_to(_valid_lock_elsewhere(tmp_path))
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "dir":
            path.mkdir()
        elif kind == "large":   # a valid lock after 64 KiB of spaces
            path.write_text(" " * (64 << 10) + json.dumps(_lock_fields(False)))
        else:
            path.write_text("[" * 60000)
    make()   # --break-lock takes it while young
    notes = []
    CacheLock(out, break_lock=True, log=notes.append).acquire().release()
    assert len(notes) == 1 and notes[0].endswith("): --break-lock")
    assert notes[0].startswith(f"lock: broke the lock of an unreadable lock file ({why}")
    assert not os.path.lexists(path)
    make()
    _refused_then_taken_over(out, why)
    if kind == "link":   # the link was removed, not the file it named
        assert json.loads((tmp_path / "elsewhere.json").read_text())["pid"] == 4242


def test_a_lock_directory_with_files_in_it_is_left_alone(tmp_path):
    out = tmp_path / "cache"
    (out / LOCK_NAME).mkdir(parents=True)
    (out / LOCK_NAME / "notes.txt").write_text("mine")
    _age(out / LOCK_NAME, 3600)
    with pytest.raises(CacheLockedError) as e:
        CacheLock(out, log=lambda line: None).acquire()
    assert str(e.value) == (f"{out / LOCK_NAME} is a directory, not a lock file, and cannot "
                            "be removed (Directory not empty); move it away by hand if no "
                            "job is running, then rerun")
    assert (out / LOCK_NAME / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(out)) == [LOCK_NAME]


def test_strings_from_a_lock_are_printed_on_one_line(tmp_path):
    """Host, start and command of a lock reach the refusal, the takeover notice and a
    write task's LockLostError escaped (newlines, terminal escapes, a lone surrogate
    that print() cannot encode) and cut to 200 characters."""
    out = tmp_path / "cache"
    out.mkdir()
    command = "a\nTraceback (most recent call last):\nb\u2028\ud800" + "x" * 1000
    fields = _lock_fields(False, host="else\nwhere", started="\x1b[31mred", command=command)
    (out / LOCK_NAME).write_text(json.dumps(fields))

    def one_line(text):
        assert "\n" not in text and "\x1b" not in text and "\u2028" not in text, text
        text.encode("utf-8")   # no lone surrogate
        return text
    with pytest.raises(CacheLockedError) as e:
        CacheLock(out).acquire()
    msg = one_line(str(e.value))
    assert ("pid 4242 on host else\\nwhere, started \\x1b[31mred (last heartbeat 0 s ago), "
            "command: a\\nTraceback (most recent call last):\\nb\\u2028\\ud800xxx") in msg
    assert "x" * 100 + "..." in msg and "x" * 200 not in msg   # 200 characters in all
    with pytest.raises(LockLostError) as e:
        check_token(out, "0" * 32)
    one_line(str(e.value))
    (out / LOCK_NAME).write_text(json.dumps({**fields, "heartbeat_unix": time.time() - 3600}))
    notes = []
    with CacheLock(out, command="y" * 100_000, log=notes.append):
        one_line(notes[0])
        assert notes[0].startswith("lock: took over the lock of pid 4242 on host else\\nwhere")
        # this job's own command is cut: its lock stays far below what a reader accepts
        assert read_lock(out)["command"] == "y" * 4096


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
