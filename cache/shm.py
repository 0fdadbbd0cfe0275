"""Shared, page-aligned window buffers for the loader's worker processes.

Without them a DataLoader worker returns each window as fresh tensors, and torch moves
every one into new shared memory on the way out: a second copy of ~400 MB per window into
pages the kernel must first zero, 4-5x the cost of the gather itself
(docs/performance.md). Instead the main process owns a few *slots*: files in a shared
memory directory (/dev/shm), mapped once by every process. A worker gathers a window
straight into the slot its task names and returns only where each field lies; the main
process wraps its own mapping of the slot in tensors. A slot is handed to a new task only
when no batch cut from it is referenced any more (reference counts, as in the in-process
buffer pool) and no task in flight uses it.

A slot's memory is reserved the first time it is used (so a loader holds what its windows
in flight need, and a full /dev/shm is a MemoryError, not a SIGBUS in a worker); the files
go when the loader is garbage collected or the process exits, and a directory left by a
killed process (its lock released) is removed by the next loader that starts.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import shutil
import tempfile
import uuid
import weakref
from pathlib import Path

import numpy as np

PAGE = mmap.PAGESIZE
_PREFIX = "urepa-loader-"


def shm_root() -> Path:
    """Where slot files live: /dev/shm when it is there and writable, else the temp dir
    (then a slot is file-backed: still shared, at the page cache's mercy)."""
    env = os.environ.get("UREPA_SHM_DIR")
    if env:
        return Path(env)
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def _remove_orphans(root: Path) -> None:
    """Remove slot directories no process holds any more (a loader killed hard). A live
    loader holds an flock on its directory's lock file; locks are the kernel's, so this
    also holds across PID namespaces (containers sharing /dev/shm). A directory without
    a lock file is being created, or not ours: left alone."""
    for d in root.glob(f"{_PREFIX}*"):
        try:
            fd = os.open(d / "lock", os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held: alive
        else:
            shutil.rmtree(d, ignore_errors=True)
        finally:
            os.close(fd)


def aligned(n: int) -> int:
    return -(-n // PAGE) * PAGE


def _release(directory: str, lock_fd: int, pinned: list[int]) -> None:
    """Finalizer: unpin, remove the files, drop the lock (in that order)."""
    if pinned:
        import torch
        for ptr in pinned:
            torch.cuda.cudart().cudaHostUnregister(ptr)
    shutil.rmtree(directory, ignore_errors=True)
    os.close(lock_fd)


class WindowSlots:
    """`count` shared files of `nbytes` each, mapped in this process as uint8 arrays.
    Pickles to its directory and sizes: a worker maps the files it is told to use.

    A slot's memory is reserved (fallocate) the first time it is used, so a loader only
    holds the shared memory its windows in flight need, and running out is a MemoryError
    here, not a SIGBUS in a worker writing to a page the filesystem cannot give."""

    def __init__(self, count: int, nbytes: int, *, root: Path | None = None):
        root = root or shm_root()
        _remove_orphans(root)
        self.nbytes, self.count = aligned(max(nbytes, 1)), count
        self.root = root
        free = shutil.disk_usage(root).free
        if free < self.count * self.nbytes:
            raise MemoryError(self._too_small(free))
        self.dir = root / f"{_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.dir.mkdir(mode=0o700)
        lock = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)  # held for the loader's life: see _remove_orphans
        self._pinned: list[int] = []
        self._finalizer = weakref.finalize(self, _release, str(self.dir), lock, self._pinned)
        self.arrays = [self._map(k, create=True) for k in range(count)]
        self._reserved = [False] * count
        self._worker_maps: dict[int, np.ndarray] = {}

    def _too_small(self, free: int) -> str:
        return (f"the loader's {self.count} window buffers need "
                f"{self.count * self.nbytes / 2**20:,.0f} MiB of shared memory in "
                f"{self.root}, {free / 2**20:,.0f} MiB are free: give the container more "
                "(docker run --shm-size=16g) or lower data.num_workers, "
                "data.prefetch_factor or data.shuffle_buffer")

    def _map(self, k: int, *, create: bool = False) -> np.ndarray:
        path = self.dir / f"slot-{k}"
        fd = os.open(path, (os.O_RDWR | os.O_CREAT | os.O_EXCL) if create else os.O_RDWR,
                     0o600)
        try:
            if create:
                os.ftruncate(fd, self.nbytes)  # sparse until reserve()
            elif os.fstat(fd).st_size != self.nbytes:
                raise OSError(f"{path}: {os.fstat(fd).st_size} bytes, expected {self.nbytes}")
            buf = mmap.mmap(fd, self.nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return np.frombuffer(buf, np.uint8)

    def reserve(self, k: int) -> None:
        """Give slot k its memory now (once): MemoryError if the filesystem is full."""
        if self._reserved[k]:
            return
        fd = os.open(self.dir / f"slot-{k}", os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, self.nbytes)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise MemoryError(self._too_small(shutil.disk_usage(self.root).free)) from None
        finally:
            os.close(fd)
        self._reserved[k] = True

    def pin(self, k: int) -> bool:
        """Page-lock slot k for asynchronous copies to the GPU (cudaHostRegister of this
        process's mapping, undone when the slots go); False if CUDA refuses."""
        import torch
        a = self.arrays[k]
        if int(torch.cuda.cudart().cudaHostRegister(a.ctypes.data, a.nbytes, 0)) != 0:
            return False
        self._pinned.append(a.ctypes.data)
        return True

    def __getstate__(self) -> dict:
        return {"dir": self.dir, "nbytes": self.nbytes, "count": self.count}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, arrays=None, _worker_maps={}, _finalizer=None)

    def worker_array(self, k: int) -> np.ndarray:
        """Slot k in a worker process (mapped at first use)."""
        a = self._worker_maps.get(k)
        if a is None:
            if not 0 <= k < self.count:
                raise ValueError(f"window slot {k} not in [0, {self.count})")
            a = self._worker_maps[k] = self._map(k)
        return a

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()


class SlotWriter:
    """Places a window's fields one after another in a slot, each at a page boundary."""

    def __init__(self, slot: np.ndarray):
        self.slot, self.used = slot, 0
        self.fields: dict[str, tuple[int, str, tuple[int, ...]]] = {}

    def alloc(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if self.used + n > len(self.slot):
            raise RuntimeError(f"a window needs more than its slot's {len(self.slot)} bytes "
                               "(a bug in the loader's window layout)")
        a = self.slot[self.used:self.used + n].view(dtype).reshape(shape)
        self.used = aligned(self.used + n)
        return a

    def holds(self, a: np.ndarray) -> tuple[int, str, tuple[int, ...]] | None:
        """(offset, dtype, shape) of `a` if it is a C-contiguous array inside the slot."""
        if not a.flags.c_contiguous or a.nbytes == 0:
            return None
        offset = a.ctypes.data - self.slot.ctypes.data
        if 0 <= offset and offset + a.nbytes <= len(self.slot):
            return offset, a.dtype.str, a.shape
        return None

    def put(self, name: str, a: np.ndarray) -> None:
        """Record field `name`: in place if it already lies in the slot, else copied."""
        where = self.holds(a)
        if where is None:
            dst = self.alloc(a.shape, a.dtype)
            np.copyto(dst, a)
            where = (dst.ctypes.data - self.slot.ctypes.data, a.dtype.str, a.shape)
        self.fields[name] = where


def slot_view(slot: np.ndarray, offset: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """The array a worker described, in this process's mapping of the slot. Its `.base`
    is the slot array, so the slot's reference count shows it is in use."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if not (0 <= offset and offset + n <= len(slot) and offset % dt.itemsize == 0):
        raise ValueError(f"a window field at [{offset}, {offset + n}) lies outside its slot")
    return slot[offset:offset + n].view(dt).reshape(shape)

