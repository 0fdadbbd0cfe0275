"""Reading mapped file ranges into memory ahead of their use, without holding the GIL.

The fast read paths take rows from memory-mapped shard files. On a cold page cache the
first touch of a page faults and waits for the disk, and it does so inside the checksum
(google_crc32c) or the copy with the GIL held: nothing else of the process runs, and the
disk gets one request at a time. `populate` asks the kernel to read ranges of a mapping in
(madvise MADV_POPULATE_READ, Linux >= 5.14) from a thread, through ctypes, which releases
the GIL for the call: the loader's read-ahead thread runs it over a window's byte ranges
in the order they will be used, while the main thread checks and the copy threads copy
what is already in (docs/performance.md, issue 18).

Nothing here reads or writes memory itself: an address that is no longer mapped makes
madvise fail (ENOMEM), which is ignored. Where the call is not available (another OS, an
older kernel) `populate` does nothing and reads fault their pages in as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import queue
import sys
import threading
from typing import Callable, Sequence

import numpy as np

PAGE = mmap.PAGESIZE
MADV_POPULATE_READ = 22  # <linux/mman.h>, Linux 5.14
_EINVAL = 22


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _load_madvise()


class Mapping:
    """A mapped file's bytes as seen by `populate`: a view that keeps the mapping alive,
    its address and length."""

    __slots__ = ("view", "addr", "size")

    def __init__(self, buf):
        self.view = np.frombuffer(buf, np.uint8)
        self.addr, self.size = self.view.ctypes.data, len(self.view)

    def span(self, offset: int, nbytes: int) -> Span | None:
        """Bytes [offset, offset + nbytes) of the file, or None if not all inside it."""
        if not (0 <= offset and 0 < nbytes <= self.size - offset):
            return None
        return (self, self.addr + offset, nbytes)


Span = tuple[Mapping, int, int]  # (mapping, address, length)


def available() -> bool:
    return _madvise is not None


def populate(spans: Sequence[Span | None], stop: threading.Event | None = None) -> None:
    """Read the mapped byte ranges `spans` (used in this order; None: skipped) into the
    page cache and map them, each as one request; returns early once `stop` is set."""
    global _madvise
    for span in spans:
        if span is None:
            continue
        _, addr, n = span
        fn = _madvise  # once: another thread may clear it
        if fn is None or (stop is not None and stop.is_set()):
            return
        start = addr - addr % PAGE
        if fn(start, n + addr - start, MADV_POPULATE_READ) != 0 \
                and ctypes.get_errno() == _EINVAL:
            _madvise = None  # a kernel without MADV_POPULATE_READ: faults read as before


def merged(spans: Sequence, gap: int = 64 << 10) -> list:
    """`spans` in their order (None: skipped), each joined to the one before it when both
    lie in the same mapping and it starts at most `gap` bytes past that one's end (the
    headers between a tar's members): fewer, larger reads. Anything else in `spans` (a
    read-ahead's checks) stays in its place, and nothing is joined across it."""
    out: list = []
    for span in spans:
        if span is None:
            continue
        if not isinstance(span, tuple):
            out.append(span)
            continue
        m, addr, n = span
        if out and isinstance(out[-1], tuple):
            m0, a, k = out[-1]
            if m0 is m and 0 <= addr - (a + k) <= gap:
                out[-1] = (m, a, addr + n - a)
                continue
        out.append((m, addr, n))
    return out


_jobs: tuple[int, queue.SimpleQueue] | None = None  # (pid, queue of the read-ahead thread)


def read_ahead(items: list[Span | Callable[[], object]], stop: threading.Event) -> None:
    """Have this process's read-ahead thread `populate` the spans in `items` and call the
    functions among them (checks of what the spans before them read in: what they raise
    is dropped), in order, until `stop` is set, after what it was given before. Nothing
    waits for it: what it does is only early (each reader waits for the bytes it uses,
    and checks them, itself). The thread is a daemon, so a pending read-ahead never holds
    up the interpreter's exit, and a forked child, which inherits no threads, starts its
    own."""
    global _jobs
    jobs = _jobs
    if jobs is None or jobs[0] != os.getpid():
        jobs = (os.getpid(), queue.SimpleQueue())  # (two racing callers: two threads)
        try:
            threading.Thread(target=_read_ahead_thread, args=(jobs[1],), daemon=True,
                             name="urepa-read-ahead").start()
        except RuntimeError:  # no new thread (at exit, or a thread limit): no read-ahead
            return
        _jobs = jobs
    jobs[1].put((items, stop))


def _read_ahead_thread(jobs: queue.SimpleQueue) -> None:
    while True:
        try:
            _run(*jobs.get())  # what it keeps alive (the mappings) goes when it returns
        except Exception:  # noqa: BLE001 - only early work is lost: readers do their own
            pass


def _run(items: list, stop: threading.Event) -> None:
    for item in items:
        if stop.is_set():
            return
        if isinstance(item, tuple):
            populate([item], stop)
        else:
            try:
                item()
            except Exception:  # noqa: BLE001 - a check that fails is the reader's to report
                pass
