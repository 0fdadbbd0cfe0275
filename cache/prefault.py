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
import sys
import threading
from typing import Sequence

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
        if _madvise is None or (stop is not None and stop.is_set()):
            return
        start = addr - addr % PAGE
        if _madvise(start, n + addr - start, MADV_POPULATE_READ) != 0 \
                and ctypes.get_errno() == _EINVAL:
            _madvise = None  # a kernel without MADV_POPULATE_READ: faults read as before


def merged(spans: Sequence[Span], gap: int = 64 << 10) -> list[Span]:
    """`spans` in their order, each joined to the one before it when both lie in the same
    mapping and it starts at most `gap` bytes past that one's end (the headers between a
    tar's members): fewer, larger reads."""
    out: list[Span] = []
    for m, addr, n in spans:
        if out:
            m0, a, k = out[-1]
            if m0 is m and 0 <= addr - (a + k) <= gap:
                out[-1] = (m, a, addr + n - a)
                continue
        out.append((m, addr, n))
    return out
