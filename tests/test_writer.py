"""Concurrent writers, killed writers, idempotence and reproducibility."""

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cache import CacheWriter, create_cache, finalize_cache, open_cache
from cache.format import done_marker_path
from cache.synthetic import synthetic_shard, write_synthetic_cache
from conftest import expected, small_spec

REPO = Path(__file__).resolve().parents[1]


def _write_shards(args):
    root, shards = args
    writer = CacheWriter(root)  # each process opens the cache itself
    for k in shards:
        writer.write_shard(k, synthetic_shard(writer.spec, k))
    return os.getpid()


def test_many_processes_writing_different_shards_lose_nothing(tmp_path):
    spec = small_spec(num_samples=200, shard_size=8, chunk_size=2)  # 25 shards
    create_cache(tmp_path / "c", spec)  # metadata once, up front
    shards = list(np.random.default_rng(0).permutation(spec.num_shards))
    jobs = [(str(tmp_path / "c"), shards[i::4]) for i in range(4)]
    with mp.get_context("spawn").Pool(4) as pool:
        pids = pool.map(_write_shards, jobs)
    assert len(set(pids)) > 1
    finalize_cache(tmp_path / "c")
    for backend in spec.backends:
        ds = open_cache(tmp_path / "c", backend=backend)
        assert ds.verify().ok
        got = ds.gather(np.arange(200), ["moments", "index"])
        assert got["index"].tolist() == list(range(200))
        for i in range(0, 200, 7):
            np.testing.assert_array_equal(got["moments"][i], expected(spec, i)["moments"])


CHILD = textwrap.dedent("""
    import sys, time, json
    from cache import CacheSpec
    from cache.synthetic import write_synthetic_cache
    root, point = sys.argv[1], sys.argv[2]
    spec = CacheSpec.from_json(json.loads(sys.argv[3]))
    def hang():
        print("READY", flush=True)
        time.sleep(600)
    if point == "marker":  # everything of shard 1 written, its done marker not yet
        from cache.store import Store
        orig = Store.write_bytes
        def patched(self, rel, data):
            if rel.startswith("_done") and json.loads(data).get("shard") == 1:
                hang()
            orig(self, rel, data)
        Store.write_bytes = patched
    else:  # half of shard 1's zarr fields written
        from cache.zarr_backend import ZarrWriter
        orig_open = ZarrWriter._open
        def patched_open(self):
            arrays = orig_open(self)
            class Hanging(dict):
                def items(self_):
                    for i, kv in enumerate(dict.items(self_)):
                        if i == 2 and getattr(self, "_shard_now", None) == 1:
                            hang()
                        yield kv
            return Hanging(arrays)
        orig_write = ZarrWriter.write_shard
        def write(self, shard, arrays, failed=frozenset()):
            self._shard_now = shard
            return orig_write(self, shard, arrays, failed)
        ZarrWriter._open, ZarrWriter.write_shard = patched_open, write
    write_synthetic_cache(root, spec, finalize=False)
""")


@pytest.mark.parametrize("point", ["marker", "data"])
def test_killed_writer_leaves_no_marker_and_rerun_rewrites(tmp_path, point):
    spec = small_spec(num_samples=40, shard_size=16, chunk_size=4)
    root = tmp_path / "c"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), point,
                              json.dumps(spec.to_json())],
                             stdout=subprocess.PIPE, text=True, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.stdout.readline().strip() == "READY"
    child.send_signal(signal.SIGKILL)  # a real kill, mid-shard
    child.wait()
    writer = CacheWriter(root)
    assert writer.is_done(0) and not writer.is_done(1)
    assert writer.pending_shards() == [1, 2]
    assert not done_marker_path(root, "zarr", 1).exists()
    # the rerun (same command) finishes the cache; it equals an uninterrupted build
    write_synthetic_cache(root, spec)
    clean = write_synthetic_cache(tmp_path / "clean", spec)
    for backend in spec.backends:
        ds = open_cache(root, backend=backend)
        assert ds.verify().ok
        for k in range(spec.num_shards):
            a = json.loads(done_marker_path(root, backend, k).read_text())["files"]
            b = json.loads(done_marker_path(clean, backend, k).read_text())["files"]
            assert {p: f["sha256"] for p, f in a.items()} == \
                   {p: f["sha256"] for p, f in b.items()}, f"{backend} shard {k}"
    assert not list(root.rglob("*.partial")) and not list(root.rglob("*.tmp"))


def test_write_shard_is_idempotent(tmp_path, spec):
    path = write_synthetic_cache(tmp_path / "c", spec)
    writer = CacheWriter(path)
    before = done_marker_path(path, "zarr", 2).read_text()
    assert writer.write_shard(2, synthetic_shard(spec, 2)) is False
    assert done_marker_path(path, "zarr", 2).read_text() == before
    assert writer.write_shard(2, synthetic_shard(spec, 2), overwrite=True) is True
    assert open_cache(path).verify().ok


def test_finalize_refuses_missing_shards(tmp_path, spec):
    from cache import IncompleteCacheError
    write_synthetic_cache(tmp_path / "c", spec, finalize=False)
    done_marker_path(tmp_path / "c", "wds", 3).unlink()
    with pytest.raises(IncompleteCacheError, match=r"1 shard\(s\) not done: \['wds:3'\]"):
        finalize_cache(tmp_path / "c")


@pytest.mark.parametrize("backends", [("zarr",), ("wds",), ("zarr", "wds")])
def test_all_zero_and_all_failed_shards(tmp_path, backends):
    """A shard whose labels are all 0 (ImageNet's first 1,300 images are class 0) and a
    shard whose samples all failed are written, read and verified."""
    spec = small_spec(num_samples=48, shard_size=16, backends=backends)
    writer = create_cache(tmp_path / "c", spec)
    for k in range(3):
        arrays = synthetic_shard(spec, k)
        if k == 0:
            arrays["label"] = np.zeros(16, dtype=np.int64)
        failures = {i: "unreadable" for i in range(16)} if k == 1 else {}
        writer.write_shard(k, arrays, failures)
    finalize_cache(tmp_path / "c")
    for backend in backends:
        ds = open_cache(tmp_path / "c", backend=backend)
        report = ds.verify()
        assert report.ok, str(report)
        assert ds.valid_indices.tolist() == list(range(16)) + list(range(32, 48))
        assert ds[5]["label"] == 0 and ds[40]["index"] == 40


def test_gather_nothing(tmp_path, spec):
    ds = open_cache(write_synthetic_cache(tmp_path / "c", spec))
    assert ds.gather(np.array([], dtype=np.int64), ["moments"])["moments"].shape == (0, 1, 8, 4, 4)
