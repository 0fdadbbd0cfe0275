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

The files are sparse (memory is used by the pages written, not by their size), removed
when the loader is garbage collected or the process exits, and a directory left by a
killed process is removed by the next loader that starts.
"""

from __future__ import annotations

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
    """Remove slot directories whose process no longer runs (a loader killed hard)."""
    for d in root.glob(f"{_PREFIX}*"):
        pid = d.name[len(_PREFIX):].partition("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass  # alive, another user's


def aligned(n: int) -> int:
    return -(-n // PAGE) * PAGE


class WindowSlots:
    """`count` shared files of `nbytes` each, mapped in this process as uint8 arrays.
    Pickles to its directory and sizes: a worker maps the files it is told to use."""

    def __init__(self, count: int, nbytes: int, *, root: Path | None = None):
        root = root or shm_root()
        _remove_orphans(root)
        need = count * nbytes
        free = shutil.disk_usage(root).free
        self.nbytes, self.count = aligned(max(nbytes, 1)), count
        self.dir = root / f"{_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if free < need:
            raise MemoryError(
                f"the loader's {count} window buffers need {need / 2**20:,.0f} MiB of shared "
                f"memory in {root}, {free / 2**20:,.0f} MiB are free: give the container more "
                "(docker run --shm-size=16g) or lower data.num_workers, "
                "data.prefetch_factor or data.shuffle_buffer")
        self.dir.mkdir(mode=0o700)
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.dir), True)
        self.arrays = [self._map(k, create=True) for k in range(count)]
        self._worker_maps: dict[int, np.ndarray] = {}

    def _map(self, k: int, *, create: bool = False) -> np.ndarray:
        path = self.dir / f"slot-{k}"
        fd = os.open(path, (os.O_RDWR | os.O_CREAT | os.O_EXCL) if create else os.O_RDWR,
                     0o600)
        try:
            if create:
                os.ftruncate(fd, self.nbytes)  # sparse: no memory until written
            elif os.fstat(fd).st_size != self.nbytes:
                raise OSError(f"{path}: {os.fstat(fd).st_size} bytes, expected {self.nbytes}")
            buf = mmap.mmap(fd, self.nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return np.frombuffer(buf, np.uint8)

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

