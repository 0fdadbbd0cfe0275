"""Reading ahead (cache/prefault.py, issue 18): the bytes a gather and the window after it
will use are asked of the kernel in file order, without the GIL, and nothing about what a
gather returns or refuses changes."""

import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from cache import (CacheLoader, DamagedCacheError, LoaderConfig, open_cache, prefault,
                   wds_backend, zarr_backend)
from conftest import expected

FIELDS = ["moments", "tokens", "cls", "label"]


def _drop_from_page_cache(root: Path) -> None:
    """Evict the cache's files (clean pages go at once), so the next reads fault."""
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _want(spec, indices, name):
    """The stored rows of `name` for `indices` (expected values in the stored dtype)."""
    want = np.stack([expected(spec, int(i))[name] for i in indices])
    return want.astype(spec.fields[name].dtype)


@pytest.fixture
def mapped(tmp_path):
    def make(name: str, size: int):
        p = tmp_path / name
        p.write_bytes(os.urandom(size))
        with open(p, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return make


def test_spans_stay_inside_their_mapping_and_merge_only_within_it(mapped):
    a, b = prefault.Mapping(mapped("a", 5 * mmap.PAGESIZE)), prefault.Mapping(mapped("b", 4096))
    assert a.span(0, a.size) == (a, a.addr, a.size)
    for offset, n in [(-1, 10), (0, a.size + 1), (a.size, 1), (10, 0)]:
        assert a.span(offset, n) is None
    spans = [a.span(0, 100), a.span(200, 100), a.span(4 * mmap.PAGESIZE, 10), b.span(0, 10)]
    # joined over a gap of 100 bytes, not over one of ~16 KB (gap=8 KB), never across files
    assert prefault.merged(spans, gap=8192) == [(a, a.addr, 300), spans[2], spans[3]]
    assert prefault.merged(spans[::-1], gap=8192) == spans[::-1]  # only forward


def test_populate_reads_any_span_and_stops_when_told(mapped):
    import threading
    m = prefault.Mapping(mapped("c", 3 * mmap.PAGESIZE + 5))
    prefault.populate([m.span(7, m.size - 7), None])  # unaligned start, partial last page
    stop = threading.Event()
    stop.set()
    prefault.populate([m.span(0, 10)], stop)
    assert bytes(m.view[:4]) == bytes(m.view[:4])  # still mapped and readable


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_cold_gathers_read_ahead_and_return_the_stored_rows(make_cache, backend):
    """From a dropped page cache, in any order, with the next gather read ahead: the rows
    are those written, and what was read ahead is not asked for twice."""
    path, spec = make_cache(backends=(backend,), failures={6: "corrupt"})
    _drop_from_page_cache(path)
    ds = open_cache(path)
    rng = np.random.default_rng(0)
    valid = ds.valid_indices
    first, then = rng.permutation(valid)[:24], rng.permutation(valid)[24:48]
    got = ds.gather(first, FIELDS, threads=2, then=then)
    for name in FIELDS:
        np.testing.assert_array_equal(got[name], _want(spec, first, name))
    if prefault.available():
        ds._ahead[1].submit(lambda: None).result()  # the read-ahead of `then` is done
        runs = [(int(i), int(i) + 1) for i in then]
        assert all(ds.reader.spans(f, lo, hi) == [] for f in FIELDS for lo, hi in runs)
    got = ds.gather(then, FIELDS, threads=1)
    for name in FIELDS:
        np.testing.assert_array_equal(got[name], _want(spec, then, name))


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_without_madvise_gathers_read_as_before(make_cache, monkeypatch, backend):
    path, spec = make_cache(backends=(backend,))
    monkeypatch.setattr(prefault, "_madvise", None)
    idx = np.random.default_rng(1).permutation(70)
    got = open_cache(path).gather(idx, FIELDS, threads=2, then=idx[:8])
    np.testing.assert_array_equal(got["tokens"], _want(spec, idx, "tokens"))


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_damage_stops_the_gather_its_copies_and_the_next_read_ahead(make_cache, backend):
    path, spec = make_cache(backends=(backend,))
    rel = wds_backend.shard_file(1) if backend == "wds" else \
        zarr_backend.shard_file(spec, "tokens", 1)
    shard_file = path / rel
    data = bytearray(shard_file.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    ds = open_cache(path)
    later = ds._later
    with pytest.raises(DamagedCacheError):
        ds.gather(np.arange(70), FIELDS, threads=2, then=np.arange(8))
    assert later.is_set() and ds._later is not later  # the read-ahead of `then` stopped
    assert ds._copier is None or not ds._copier[1]._work_queue.qsize()  # no copy queued
    if backend == "zarr":  # other shards still read, and right
        got = ds.gather(np.arange(16), FIELDS)
        np.testing.assert_array_equal(got["tokens"], _want(spec, range(16), "tokens"))


@pytest.mark.parametrize("workers", [0, 2])
def test_each_window_reads_ahead_the_next_one_its_process_fetches(make_cache, workers):
    path, _ = make_cache()
    loader = CacheLoader(path, LoaderConfig(batch_size=4, block_size=4, shuffle_buffer=8,
                                            num_workers=workers))
    tasks = loader._tasks(0, 0)
    step = max(1, workers)
    for w, task in enumerate(tasks):
        if w + step < len(tasks):
            np.testing.assert_array_equal(task.then, tasks[w + step].indices)
        else:
            assert task.then is None
