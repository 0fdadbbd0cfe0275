"""One creator per cache: the lock file `CACHE/_lock.json` that an encode job holds.

Two encode jobs writing one cache at once produce a cache that mixes their teachers and
still verifies (every shard is consistent in itself), or crash inside zarr. So the encode
driver holds this lock from before it creates the cache until after it finalizes it, and
its write tasks check the lock's token before each shard:

    with CacheLock(root, command=shlex.join(sys.argv)) as lock:   # or CacheLockedError
        writer = create_cache(root, ...)
        ...  # each write task: check_token(root, lock.token), then write its shard
        lock.check()                                               # or LockLostError
        finalize_cache(root)

The lock file (JSON) says who holds it: host, pid and the process's start time, the
machine's boot id and pid namespace, the start time of the job, its command, a random
token, and a heartbeat that the holder rewrites every `heartbeat_s` (HEARTBEAT_SECONDS)
from a daemon thread.

Taking the lock
- A local directory (also a file:// URL): the lock is written whole to a private temporary
  file and hard-linked to `_lock.json`; link(2) fails when the name exists, atomically,
  on local filesystems and NFS alike (readers never see a half-written lock). Where hard
  links are not supported (some FUSE/SMB mounts), O_CREAT|O_EXCL instead.
- Any other fsspec URL (s3://, gs://): object stores have no portable exclusive create.
  The job writes its lock when there is none, waits `settle_s` (SETTLE_SECONDS) and
  reads it back; another token there means another job won, and this one is refused. Two
  jobs that both find no lock and write within less than the settle time of each
  other's read-back can both believe they won: best effort (docs/encode.md).

An existing lock is stale, and taken over with a message that says whose and why, when
- it was taken on this machine (same host name, boot id and pid namespace, so a pid means
  the same thing) and its process is gone: no such pid, a zombie, or a pid reused by a
  process that started at another time;
- it was taken on another machine (its pid cannot be checked from here) and its heartbeat
  is older than `stale_s` (STALE_SECONDS, 10 minutes; also the tolerance for clock skew
  between the machines; the holder's own `stale_after_s`, if longer, wins);
- it is unreadable and, on a local disk, older than `stale_s` (its own mtime).
Otherwise the job is refused with CacheLockedError naming the holder. `break_lock=True`
(`pipeline encode --break-lock`) takes any lock, saying whose it broke: for a job known to
be gone whose heartbeat has not expired yet (a machine that died minutes ago).

A lock is unreadable (damaged) when it is not a regular file (locally, checked without
following links: a symbolic link, FIFO, device or directory is never opened), is larger
than MAX_LOCK_BYTES (64 KiB), is not a JSON object, lacks a field, or holds a field of the
wrong type or out of its range: pid 1 <= pid < 2**31, heartbeat_unix a finite time in
0 .. MAX_UNIX_TIME (year 2286), stale_after_s and heartbeat_every_s finite in
0.001 .. MAX_TIMEOUT_S (30 days) seconds, pid_start digits; host, token, boot_id, pid_ns,
started and command strings. Whatever a lock file holds, reading and judging it raises
only this module's errors, and every string from it is printed escaped and cut to
MAX_PRINTED (200) characters: one line. A directory with files in it is never removed.

Releasing removes the file only if it still holds our token. A holder whose lock was
taken over (its heartbeat stalled past the timeout, or --break-lock) notices at its next
heartbeat, write task or `check()`, and stops with LockLostError.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import math
import os
import secrets
import socket
import stat
import threading
import time
import unicodedata
from typing import Any, Callable

from .format import CacheError
from .store import NotRegularFileError, Store, file_kind, open_regular

LOCK_NAME = "_lock.json"
HEARTBEAT_SECONDS = 30.0    # how often the holder rewrites its heartbeat
STALE_SECONDS = 600.0       # a heartbeat this old (another machine's lock) is stale
SETTLE_SECONDS = 2.0        # object stores: wait this long before reading our lock back
MAX_LOCK_BYTES = 64 << 10   # a lock is ~600 bytes plus its command (cut to MAX_COMMAND)
MAX_COMMAND = 4096          # characters of the command a lock records
MAX_UNIX_TIME = 1e10        # a heartbeat after this (year 2286) is damage, not a clock
MAX_TIMEOUT_S = 30 * 86400  # the longest stale_after_s / heartbeat_every_s a lock may set
MAX_PRINTED = 200           # characters of a string from a lock file in a message


class CacheLockedError(CacheError):
    """Another encode job, alive or not provably dead, holds the cache's lock."""


class LockLostError(CacheError):
    """The lock this job held was taken over or removed while the job ran."""


# ---------------------------------------------------------------- who and where

def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(
        timespec="seconds").replace("+00:00", "Z")


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:   # not Linux, or no such process: the field stays unknown
        return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks after boot) of a process, from /proc (Linux)."""
    text = _read_text(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    fields = text.rsplit(")", 1)[1].split()   # after "pid (comm)": comm may hold spaces
    return fields[0], fields[19]              # fields 3 (state) and 22 (starttime)


def machine() -> dict[str, str | None]:
    """What makes a pid meaningful: the host name, the kernel's boot id (a reboot or
    another machine with the same name) and the pid namespace (containers that share a
    host name and a volume). None where the platform does not tell."""
    ns = None
    with contextlib.suppress(OSError):
        ns = os.readlink("/proc/self/ns/pid")
    return {"host": socket.gethostname(),
            "boot_id": _read_text("/proc/sys/kernel/random/boot_id"), "pid_ns": ns}


_UNPRINTABLE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}   # controls, bidi, surrogates


def printable(text: str, limit: int = MAX_PRINTED) -> str:
    """A string from a lock file as it may appear in a one-line message: control, format
    and separator characters (newlines, terminal escapes, bidi overrides) and lone
    surrogates escaped (\\n, \\x1b, \\ud800), cut to `limit` characters."""
    out = "".join(c.encode("unicode_escape").decode("ascii")
                  if unicodedata.category(c) in _UNPRINTABLE else c for c in text)
    return out if len(out) <= limit else out[:limit - 3] + "..."


def describe(info: dict[str, Any]) -> str:
    """The holder of a lock in words: pid, host, start time, heartbeat age, command (one
    line: the strings from the file are escaped and cut, see printable)."""
    if "unreadable" in info:
        return f"an unreadable lock file ({printable(info['unreadable'])})"
    age = time.time() - info["heartbeat_unix"]
    beat = (f"last heartbeat {age:.0f} s ago" if age >= 0 else
            f"last heartbeat {-age:.0f} s in the future: clock skew")
    text = (f"pid {info['pid']} on host {printable(info['host'])}, started "
            f"{printable(info.get('started') or '?')} ({beat})")
    return text + (f", command: {printable(info['command'])}" if info.get("command") else "")


# ---------------------------------------------------------------- reading the lock

_NUMBER = (int, float)
_FIELDS: dict[str, tuple[type | tuple[type, ...], bool]] = {   # name: (type, required)
    "lock": (str, False), "host": (str, True), "boot_id": (str, False),
    "pid_ns": (str, False), "pid": (int, True), "pid_start": (str, False),
    "started": (str, False), "heartbeat": (str, False), "heartbeat_unix": (_NUMBER, True),
    "heartbeat_every_s": (_NUMBER, False), "stale_after_s": (_NUMBER, False),
    "token": (str, True), "command": (str, False)}
# the range of each number (compared exactly: an int of 400 digits never becomes a float)
_RANGES: dict[str, tuple[float, float, str]] = {
    "pid": (1, 2**31 - 1, "a process id: 1 .. 2**31-1"),
    "heartbeat_unix": (0, MAX_UNIX_TIME, f"a time: 0 .. {MAX_UNIX_TIME:.0e} s"),
    "heartbeat_every_s": (1e-3, MAX_TIMEOUT_S, f"seconds: 0.001 .. {MAX_TIMEOUT_S}"),
    "stale_after_s": (1e-3, MAX_TIMEOUT_S, f"seconds: 0.001 .. {MAX_TIMEOUT_S}")}


def _field_error(key: str, value: Any) -> str | None:
    """Why a field of a lock file is damaged, or None (missing optional fields are None)."""
    kind, required = _FIELDS[key]
    if value is None:
        return f"{key} missing" if required else None
    if not isinstance(value, kind) or isinstance(value, bool):
        return f"{key} is a JSON {type(value).__name__}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{key} is {value}"
    if key in _RANGES:
        low, high, what = _RANGES[key]
        if not low <= value <= high:
            shown = printable(str(value) if isinstance(value, float) or abs(value) < 10**30
                              else f"a {len(str(abs(value)))}-digit number", 40)
            return f"{key} is {shown}, not {what}"
    if key == "pid_start" and not (value.isascii() and value.isdigit()):
        return f"pid_start is {printable(value, 40)}, not a number of clock ticks"
    return None


def _parse(data: bytes) -> dict[str, Any]:
    """The checked fields of a lock file's bytes (other keys are dropped), or
    {"unreadable": why}."""
    try:
        info = json.loads(data)
    except (ValueError, RecursionError) as e:   # RecursionError: [[[[... nested deep
        return {"unreadable": f"not JSON: {type(e).__name__}: {e}"}
    if not isinstance(info, dict):
        return {"unreadable": f"a JSON {type(info).__name__}, not an object"}
    bad = [why for key in _FIELDS if (why := _field_error(key, info.get(key)))]
    if bad:
        return {"unreadable": "damaged: " + "; ".join(bad)}
    return {k: info[k] for k in _FIELDS if info.get(k) is not None}


def _read_local(store: Store, rel: str) -> bytes | str | None:
    """The bytes of the local lock file `rel`, why it cannot be read (str), or None when
    there is none. Never follows a link or opens a FIFO or device (whose read never
    ends); reads at most MAX_LOCK_BYTES + 1 bytes."""
    path = store.full(rel)
    try:
        if not store.is_regular(rel):   # lstat (a file:// URL: fsspec's isfile)
            mode = os.lstat(path).st_mode
            if not stat.S_ISREG(mode):
                return f"{file_kind(mode)}, not a regular file"
        with open_regular(path) as f:   # the name may have been replaced since
            return f.read(MAX_LOCK_BYTES + 1)
    except FileNotFoundError:
        return None
    except NotRegularFileError as e:
        return e.strerror
    except OSError as e:   # EACCES: another user's file
        return f"not readable ({e.strerror})"


def _judge(data: bytes | str) -> dict[str, Any]:
    """_parse, after _read_local's refusals and the size cap."""
    if isinstance(data, str):
        return {"unreadable": f"{LOCK_NAME} is {data}"}
    if len(data) > MAX_LOCK_BYTES:
        return {"unreadable": f"larger than {MAX_LOCK_BYTES} bytes"}
    return _parse(data)


def read_lock(root: str | os.PathLike | Store) -> dict[str, Any] | None:
    """The lock file's checked contents (module docstring), None when there is none. An
    unreadable one (not a regular file, too large, damaged) gives {"unreadable": why,
    "age_s": seconds since it was written (local files only)}."""
    store = Store.of(root)
    if store.posix:   # a local directory or a file:// URL
        data = _read_local(store, LOCK_NAME)
    else:
        try:   # fsspec: no file types to check, but never more than the cap
            data = store.fs.cat_file(store.full(LOCK_NAME), start=0, end=MAX_LOCK_BYTES + 1)
        except FileNotFoundError:
            return None
    if data is None:
        return None
    info = _judge(data)
    if "unreadable" in info and store.posix:
        with contextlib.suppress(OSError):
            info["age_s"] = time.time() - os.lstat(store.full(LOCK_NAME)).st_mtime
    return info


def check_token(root: str | os.PathLike | Store, token: str) -> None:
    """Raise LockLostError unless the cache's lock holds `token` (each write task calls
    this before writing its shard: a job whose lock was broken stops writing)."""
    store = Store.of(root)
    info = read_lock(store)
    if info is not None and info.get("token") == token:
        return
    whose = ("is gone (removed by hand?)" if info is None
             else f"was taken over by {describe(info)}")
    raise LockLostError(
        f"{store}: this encode job's lock {LOCK_NAME} {whose}; this job stops so that two "
        "jobs never write one cache. The shards done so far are kept; make sure no other "
        "job writes this cache, then rerun the same command")


def _same_machine(info: dict[str, Any]) -> bool:
    """Whether a lock was taken here, where its pid can be checked (unknown ids match)."""
    here = machine()
    return info["host"] == here["host"] and all(
        info.get(k) is None or here[k] is None or info.get(k) == here[k]
        for k in ("boot_id", "pid_ns"))


def _process_gone(info: dict[str, Any]) -> str | None:
    """Why the process of a lock taken on this machine is no longer its holder, or None."""
    pid = info["pid"]   # 1 <= pid < 2**31 (_parse)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"its process {pid} is no longer running"
    except PermissionError:
        pass   # alive, another user's
    stat = _proc_stat(pid)
    if stat is not None:
        state, start = stat
        if state == "Z":
            return f"its process {pid} has exited (a zombie)"
        if info.get("pid_start") is not None and start != info["pid_start"]:
            return f"its pid {pid} now belongs to another process"
    return None


# ---------------------------------------------------------------- the lock

class CacheLock:
    """The encode job's lock on a cache root (module docstring: protocol and limits).

    `with CacheLock(root, command=...) as lock:` takes it (CacheLockedError if another
    live job holds it), keeps its heartbeat and releases it at the end, also on errors.
    `log` receives the one-line notices (a stale lock taken over, a lock broken)."""

    def __init__(self, root: str | os.PathLike | Store, *, command: str | None = None,
                 break_lock: bool = False, heartbeat_s: float = HEARTBEAT_SECONDS,
                 stale_s: float = STALE_SECONDS, settle_s: float = SETTLE_SECONDS,
                 log: Callable[[str], Any] = print):
        if not 0.001 <= heartbeat_s < stale_s <= MAX_TIMEOUT_S:
            raise ValueError(f"CacheLock: heartbeat_s {heartbeat_s} must be at least 0.001 "
                             f"and below stale_s {stale_s} (a live holder must never look "
                             f"stale), and stale_s at most {MAX_TIMEOUT_S} (what other jobs "
                             "read as a sane lock); choose values in that order")
        self.store = Store.of(root)
        self.command, self.break_lock, self.log = command, break_lock, log
        self.heartbeat_s, self.stale_s, self.settle_s = heartbeat_s, stale_s, settle_s
        self.token = secrets.token_hex(16)
        self.info: dict[str, Any] = {}   # what the lock file holds, once acquired
        self.held = False
        self._made_root = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None   # set by the heartbeat thread
        self.heartbeat_error: OSError | None = None   # the last failed beat (full disk?)

    def __repr__(self) -> str:
        return f"CacheLock({self.store.name!r}, held={self.held})"

    def __enter__(self) -> CacheLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # -------------------------------------------------------------- taking
    def acquire(self) -> CacheLock:
        if self.held:
            raise RuntimeError(f"{self!r} is already held")
        self._made_root = self.store.posix and not self.store.exists()
        self.store.makedirs()
        try:
            self._acquire()
        except BaseException:
            with contextlib.suppress(OSError):   # the error that stopped us matters more
                self._drop_root()
            raise
        self.held = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        name=f"lock-heartbeat {self.store}")
        self._thread.start()
        return self

    def _acquire(self) -> None:
        now = time.time()
        proc = _proc_stat(os.getpid())
        self.info = {"lock": "urepa-cache encode job", **machine(), "pid": os.getpid(),
                     "pid_start": proc[1] if proc else None, "started": _iso(now),
                     "heartbeat": _iso(now), "heartbeat_unix": now,
                     "heartbeat_every_s": self.heartbeat_s, "stale_after_s": self.stale_s,
                     "token": self.token,
                     # cut: the lock stays far below MAX_LOCK_BYTES whatever the command
                     "command": None if self.command is None else self.command[:MAX_COMMAND]}
        # a few rounds: each one either takes the lock, refuses, or removes a stale lock
        # (another job may take it first; then the next round judges that one)
        for _ in range(5):
            if self._create():
                break
            info = read_lock(self.store)
            if info is None:
                continue   # released since
            reason = "--break-lock" if self.break_lock else self._stale(info)
            if reason is None:
                if "unreadable" in info:
                    hint = ("if no other job is running, remove the file or rerun with "
                            "--break-lock")
                elif _same_machine(info):
                    hint = ("a job on this machine that dies is detected by itself; rerun "
                            "with --break-lock only if that process is stuck")
                else:
                    hint = (f"if that job is gone (its machine died), its lock expires "
                            f"{self._stale_after(info):.0f} s after its last heartbeat, or "
                            "rerun with --break-lock now")
                raise CacheLockedError(f"{self.store} is being written by another encode "
                                       f"job: {describe(info)}. Wait for it to finish; {hint}")
            if self._remove_if(info):
                verb = "broke" if self.break_lock else "took over"
                self.log(f"lock: {verb} the lock of {describe(info)}: {reason}")
        else:
            raise CacheLockedError(f"{self.store}: {LOCK_NAME} was taken by other jobs 5 "
                                   "times while this one tried; rerun when they are done")

    def _drop_root(self) -> None:
        """Remove the cache directory if the lock made it and nothing else came."""
        root = self.store.local_path() if self._made_root else None
        if root is not None and root.is_dir() and not any(root.iterdir()):
            root.rmdir()

    def _stale_after(self, info: dict[str, Any]) -> float:
        # a number in 0.001 .. MAX_TIMEOUT_S when present (_parse)
        return max(self.stale_s, float(info.get("stale_after_s", 0.0)))

    def _stale(self, info: dict[str, Any]) -> str | None:
        """Why an existing lock may be taken over, or None if its holder may be alive."""
        if "unreadable" in info:
            age = info.get("age_s")
            if age is not None and age > self.stale_s:
                return f"it is unreadable and {age:.0f} s old"
            return None
        if _same_machine(info):
            return _process_gone(info)
        age, limit = time.time() - info["heartbeat_unix"], self._stale_after(info)
        if age > limit:
            return (f"taken on another machine and its heartbeat is {age:.0f} s old "
                    f"(stale after {limit:.0f} s)")
        return None

    def _data(self) -> bytes:
        return (json.dumps(self.info, indent=1) + "\n").encode()

    def _create(self) -> bool:
        """Create the lock file if there is none; True if it is ours."""
        if not self.store.posix:
            return self._create_remote()
        path = self.store.full(LOCK_NAME)
        tmp = f"{path}.{self.token}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(self._data())
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
            # no hard links on this filesystem: exclusive create (a reader that meets
            # the file before its bytes reads it as unreadable, which is never stale
            # while young)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._data())
                f.flush()
                os.fsync(f.fileno())
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _create_remote(self) -> bool:
        # a read, not exists(): fsspec may answer exists() from a cached directory listing
        if read_lock(self.store) is not None:
            return False
        self.store.write_bytes(LOCK_NAME, self._data())
        # another job that found no lock either may overwrite ours in the meantime: the
        # last writer wins and the other one, reading back, sees a foreign token
        time.sleep(self.settle_s)
        info = read_lock(self.store)
        return info is not None and info.get("token") == self.token

    def _remove_if(self, info: dict[str, Any]) -> bool:
        """Remove the lock file if it is still the lock `info` judged stale."""
        if not self.store.posix:
            now = read_lock(self.store)
            if now is None or now.get("token") != info.get("token"):
                return False
            self.store.remove(LOCK_NAME)
            return True
        # locally: move it aside (atomic), then look at what was moved (read as read_lock
        # reads: a link, FIFO, device or directory is never opened); a job that took the
        # lock between our read and the move gets its lock put back
        path = self.store.full(LOCK_NAME)
        aside_rel = f"{LOCK_NAME}.{self.token}.broken"
        aside = self.store.full(aside_rel)
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        moved = _read_local(self.store, aside_rel)
        if moved is None:
            return False
        is_dir = isinstance(moved, str) and moved.startswith("a directory")
        if _judge(moved).get("token") == info.get("token"):
            if not is_dir:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(aside)
                return True
            try:
                os.rmdir(aside)   # a directory with files in it is never deleted here
                return True
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.rename(aside, path)
                raise CacheLockedError(
                    f"{path} is a directory, not a lock file, and cannot be removed "
                    f"({e.strerror}); move it away by hand if no job is running, then "
                    "rerun") from None
        with contextlib.suppress(OSError):   # fails when a newer lock has the name
            if is_dir:
                os.rename(aside, path)
            else:
                os.link(aside, path, follow_symlinks=False)
        with contextlib.suppress(OSError):   # (IsADirectoryError: put back or left)
            os.unlink(aside)
        return False

    # -------------------------------------------------------------- holding
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._rewrite()
            except LockLostError as e:
                self._lost = str(e)
                return
            except OSError as e:
                # a full disk or a network error: the next beat tries again; the lock
                # only looks stale to other machines after stale_s without a beat
                self.heartbeat_error = e

    def _rewrite(self) -> None:
        check_token(self.store, self.token)
        now = time.time()
        self.info.update(heartbeat=_iso(now), heartbeat_unix=now)
        if not self.store.posix:
            self.store.write_bytes(LOCK_NAME, self._data())
            return
        path = self.store.full(LOCK_NAME)
        tmp = f"{path}.{self.token}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(self._data())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def check(self) -> None:
        """Raise LockLostError unless the lock is still ours (before finalizing)."""
        if not self.held:
            raise RuntimeError(f"{self!r} is not held")
        if self._lost:
            raise LockLostError(self._lost)
        check_token(self.store, self.token)

    # -------------------------------------------------------------- releasing
    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours. Never raises
        for an I/O error (it runs while another error propagates): says so instead."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            info = read_lock(self.store)
            if info is not None and info.get("token") == self.token:
                self.store.remove(LOCK_NAME)
            elif info is not None:
                self.log(f"lock: {self.store}/{LOCK_NAME} is no longer this job's "
                         f"({describe(info)}); left in place")
            self._drop_root()
        except OSError as e:
            self.log(f"lock: could not release {self.store}/{LOCK_NAME}: {e}; remove it "
                     "by hand if no job is running (or rerun with --break-lock)")
