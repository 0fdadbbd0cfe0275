"""Reading ahead (cache/prefault.py, issue 18): the bytes a gather and the window after it
will use are asked of the kernel in file order, without the GIL, and nothing about what a
gather returns or refuses changes."""

import mmap
import multiprocessing
import os
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
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


def _read_ahead_done() -> None:
    """Wait until the read-ahead thread has done what it was given so far."""
    done = threading.Event()
    prefault.read_ahead([done.set], threading.Event())
    assert done.wait(30)


@pytest.fixture
def asked(monkeypatch):
    """The read-ahead requests of this process: [(bytes to read, checks, stop event)]."""
    calls = []
    real = prefault.read_ahead

    def record(items, stop):
        spans = [i for i in items if isinstance(i, tuple)]
        calls.append((sum(n for _, _, n in spans), len(items) - len(spans), stop))
        real(items, stop)
    monkeypatch.setattr(prefault, "read_ahead", record)
    monkeypatch.setattr(prefault, "_madvise", prefault._madvise or (lambda *a: 0))
    return calls


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_cold_gathers_read_ahead_and_return_the_stored_rows(make_cache, backend, asked):
    """From a dropped page cache, in any order, with the next gather read ahead (and
    checked) in the same pass: the rows are those written; what was read ahead for the
    next gather is not asked for twice, and is asked for again in the next epoch (the page
    cache may have dropped it), but not checked again."""
    path, spec = make_cache(backends=(backend,), failures={6: "corrupt"})
    _drop_from_page_cache(path)
    ds = open_cache(path)
    rng = np.random.default_rng(0)
    valid = ds.valid_indices
    first, then = rng.permutation(valid)[:24], rng.permutation(valid)[24:48]
    for epoch in range(2):
        got = ds.gather(first, FIELDS, threads=2, then=then)
        for name in FIELDS:
            np.testing.assert_array_equal(got[name], _want(spec, first, name))
        got = ds.gather(then, FIELDS, threads=1)
        for name in FIELDS:
            np.testing.assert_array_equal(got[name], _want(spec, then, name))
        assert len(asked) == epoch + 1  # both gathers' bytes in the first one's pass
        assert all(stop.is_set() for *_, stop in asked)  # none left once its rows are in
        assert not ds._then
    # the bytes of the fields' members or chunks (chunks: more rows than were asked for)
    per_sample = sum(spec.fields[f].nbytes for f in FIELDS if f != "label")
    assert asked[0][0] >= (len(first) + len(then)) * per_sample
    assert asked[0][1] > 0 and asked[1][1] == 0  # then's checks: first epoch only


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_the_next_gather_is_checked_early_and_damage_still_found(make_cache, backend):
    """The read-ahead thread checks the next gather's bytes once they are in; what it
    finds sound is not checked again, what it does not is left to the gather, which
    raises for it as before."""
    path, spec = make_cache(backends=(backend,))
    rel = wds_backend.shard_file(2) if backend == "wds" else \
        zarr_backend.shard_file(spec, "tokens", 2)
    data = bytearray((path / rel).read_bytes())
    at = len(data) // 2  # a row of shard 2 (samples 32..47)
    if backend == "wds":  # in the data of sample 40's tokens
        with tarfile.open(path / rel) as tar:
            at = tar.getmember(f"{40:09d}.tokens.npy").offset_data + 200
    data[at] ^= 0xFF
    (path / rel).write_bytes(bytes(data))
    ds = open_cache(path)
    if not prefault.available():
        pytest.skip("no MADV_POPULATE_READ here: no read-ahead")
    ds.gather(np.arange(8), FIELDS, then=np.arange(16, 48))
    _read_ahead_done()
    r = ds.reader
    if backend == "zarr":
        early = r._checked[("tokens", 1)]  # shard 1's chunks: checked, none by the gather
        assert early.all() and r._shard("tokens", 1)._rows.count(None) == len(early)
        assert not r._checked[("tokens", 2)].all()
    else:
        assert (r._early[(1, "tokens.npy")][:, 0] >= 0).all()
        assert (r._early[(2, "tokens.npy")][:, 0] < 0).any()
    with pytest.raises(DamagedCacheError):
        ds.gather(np.arange(16, 48), FIELDS)
    got = ds.gather(np.arange(16, 32), FIELDS)
    np.testing.assert_array_equal(got["tokens"], _want(spec, range(16, 32), "tokens"))


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
    ds.gather(np.arange(8), FIELDS, then=np.arange(8, 16))
    (_, _, later), = ds._then.values()
    with pytest.raises(DamagedCacheError):
        ds.gather(np.arange(70), FIELDS, threads=2, then=np.arange(8))
    assert later.is_set() and not ds._then  # no read-ahead of a next gather left
    assert ds._copier is None or not ds._copier[2]._work_queue.qsize()  # no copy queued
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


def _gather_in_child(ds, out) -> None:
    got = ds.gather(np.arange(40, 0, -1), FIELDS, threads=2, then=np.arange(8))
    out.put(float(got["tokens"].sum()))


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_gathers_with_threads_of_its_own(make_cache):
    """The parent's copy and read-ahead threads are not the child's (a fork copies no
    threads): a gather in a forked child must not wait on them."""
    path, spec = make_cache()
    ds = open_cache(path)
    want = ds.gather(np.arange(40, 0, -1), FIELDS, threads=2, then=np.arange(8))
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_gather_in_child, args=(ds, out))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        pytest.fail("the gather in the forked child hung")
    assert child.exitcode == 0 and out.get(timeout=5) == float(want["tokens"].sum())


def test_a_gather_never_waits_for_a_read_ahead(make_cache, monkeypatch):
    """A read-ahead is only early: neither a gather nor the interpreter's exit waits for
    one (here each span takes 0.5 s on the read-ahead thread)."""
    path, spec = make_cache()
    real = prefault.populate

    def slow(spans, stop=None):
        if threading.current_thread().name == "urepa-read-ahead":
            for span in spans:
                if stop is not None and stop.is_set():
                    return
                time.sleep(0.5)
        real(spans, stop)
    monkeypatch.setattr(prefault, "populate", slow)
    monkeypatch.setattr(prefault, "_madvise", prefault._madvise or (lambda *a: 0))
    ds = open_cache(path)
    t = time.perf_counter()
    ds.gather(np.arange(8), FIELDS, then=np.arange(8, 70))  # queues ~many slow spans
    ds.gather(np.arange(8, 70), ["cls"])  # other fields: not held up by that queue
    ds.gather(np.arange(30, 40), FIELDS)  # not the planned next gather: that one dropped
    assert time.perf_counter() - t < 2.0
    script = textwrap.dedent(f"""
        import time, numpy as np
        from cache import open_cache, prefault
        def slow(spans, stop=None):
            time.sleep(30)
        prefault.populate = slow
        prefault._madvise = prefault._madvise or (lambda *a: 0)
        open_cache({str(path)!r}).gather(np.arange(8), ["tokens"], then=np.arange(8, 16))
    """)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60,
                   cwd=Path(__file__).resolve().parents[1])
    assert time.perf_counter() - t < 20  # exited with the read-ahead still asleep


def test_wds_spans_are_joined_in_file_order_and_cut_at_the_end(mapped):
    m = prefault.Mapping(mapped("t", 10_000))
    join = wds_backend._joined
    empty = np.zeros(0, np.int64)
    assert join(m, empty, empty) == []
    starts, ends = np.array([5000, 0, 50, 9990]), np.array([5100, 100, 80, 10_100])
    assert join(m, starts, ends, gap=10) == [m.span(0, 100), m.span(5000, 100),
                                             m.span(9990, 10)]
    assert join(m, starts, ends, gap=5000) == [m.span(0, 10_000)]
    assert list(wds_backend._ranges(np.array([3, 7, 9]), np.array([5, 7, 11]))) == [3, 4, 9, 10]


@pytest.mark.parametrize("then", [None, np.arange(0, 8)])
def test_a_tar_of_another_shard_is_reported_as_damage(make_cache, then):
    """Reading ahead a tar that holds other samples than its name says (here shard 0's
    tar in shard 1's place) leaves the reader's own report: DamagedCacheError."""
    path, spec = make_cache(backends=("wds",))
    (path / wds_backend.shard_file(1)).write_bytes((path / wds_backend.shard_file(0)).read_bytes())
    ds = open_cache(path)
    with pytest.raises(DamagedCacheError, match="not in this tar"):
        ds.gather(np.arange(16, 20), FIELDS, then=then)
