"""Caches on fsspec URLs: memory:// (in this process) and file:// (across processes), both
backends, written, verified and streamed exactly like a local directory."""

import uuid
from collections import Counter

import fsspec
import numpy as np
import pytest
import torch
from conftest import small_spec
from fsspec.implementations.memory import MemoryFileSystem

from cache import (CacheLoader, IncompleteCacheError, LoaderConfig, NotACacheError,
                   create_cache, open_cache)
from cache.synthetic import synthetic_shard, write_synthetic_cache

FIELDS = ["moments", "tokens", "cls", "label"]


@pytest.fixture
def memory_url():
    url = f"memory://urepa-test-{uuid.uuid4().hex[:8]}/cache"
    yield url
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _batches(root, backend, **kw):
    cfg = LoaderConfig(batch_size=8, shuffle_buffer=16, backend=backend,
                       fields=("moments", "tokens", "label", "index"), **kw)
    return list(CacheLoader(root, cfg))


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_memory_url_holds_the_same_cache_as_a_directory(tmp_path, memory_url, backend):
    spec = small_spec()
    failures = {5: "decode error: broken", 40: "decode error: empty"}
    write_synthetic_cache(tmp_path / "local", spec, failures=failures)
    write_synthetic_cache(memory_url, spec, failures=failures)
    local = open_cache(tmp_path / "local", backend=backend)
    remote = open_cache(memory_url, backend=backend)
    assert remote.root == memory_url
    report = remote.verify(backends=[backend])
    assert report.ok and report.samples_checked == local.verify(backends=[backend]).samples_checked
    assert remote.manifest["shards"] == local.manifest["shards"]  # same bytes, same checksums
    idx = np.random.default_rng(0).permutation(local.valid_indices)
    a, b = local.gather(idx, FIELDS), remote.gather(idx, FIELDS)
    for name in FIELDS:
        np.testing.assert_array_equal(a[name], b[name])
    assert remote[41]["key"] == local[41]["key"] == "synthetic/00000041.png"
    assert remote.stats()["bytes_on_disk"] == local.stats()["bytes_on_disk"]
    for x, y in zip(_batches(tmp_path / "local", backend), _batches(memory_url, backend),
                    strict=True):
        for name in x:
            assert torch.equal(x[name], y[name])


def test_remote_verify_finds_damage_and_partial_caches_resume(memory_url):
    spec = small_spec(backends=("zarr", "wds"))
    writer = create_cache(memory_url, spec,
                          {"dataset": "synthetic", "seed": 0, "random_weights": True})
    writer.write_shard(2, synthetic_shard(spec, 2))
    with pytest.raises(IncompleteCacheError, match="1/5 zarr shards done"):
        open_cache(memory_url)
    assert writer.pending_shards() == [0, 1, 3, 4]
    write_synthetic_cache(memory_url, spec)  # resumes: writes only the missing shards
    fs, path = fsspec.core.url_to_fs(memory_url)
    fs.pipe_file(f"{path}/wds/shard-000003.tar", b"not a tar")
    report = open_cache(memory_url).verify()
    assert report.bad_shards == {"wds": [3]}
    assert "bytes, expected" in str(report)
    with pytest.raises(NotACacheError, match="no such directory"):
        open_cache(memory_url + "-missing")
    with pytest.raises(NotACacheError, match="cannot open this URL"):
        open_cache("nosuch-protocol://bucket/cache")


def test_streaming_reads_only_what_it_needs(memory_url, monkeypatch):
    """One batch from a 20-shard remote cache: zarr asks for byte ranges of the chunks it
    reads (a small part of the cache), wds fetches only the tars the batch touches."""
    spec = small_spec(num_samples=320, shard_size=16, chunk_size=4, tokens=64)
    write_synthetic_cache(memory_url, spec)
    fs, path = fsspec.core.url_to_fs(memory_url)
    total = {b: fs.du(f"{path}/{b}") for b in spec.backends}
    read, fetched = Counter(), Counter()
    cat_file, get_file = MemoryFileSystem.cat_file, MemoryFileSystem.get_file

    def counting_cat(self, p, start=None, end=None, **kw):
        data = cat_file(self, p, start=start, end=end, **kw)
        read[p.split("/cache/")[1].split("/")[0]] += len(data)
        return data

    def counting_get(self, rpath, lpath, **kw):
        fetched[rpath] += 1
        return get_file(self, rpath, lpath, **kw)

    monkeypatch.setattr(MemoryFileSystem, "cat_file", counting_cat)
    monkeypatch.setattr(MemoryFileSystem, "get_file", counting_get)
    zarr_batch = next(iter(CacheLoader(memory_url, LoaderConfig(
        batch_size=16, shuffle_buffer=16, block_size=4, backend="zarr"))))
    assert zarr_batch["moments"].shape[0] == 16
    assert 0 < read["zarr"] < total["zarr"] / 8, (read, total)
    # shard-sized blocks (webdataset's shard shuffle): the first window holds two blocks,
    # so two of the twenty tars are fetched, once each
    wds_batch = next(iter(CacheLoader(memory_url, LoaderConfig(
        batch_size=16, shuffle_buffer=32, block_size=16, backend="wds"))))
    assert wds_batch["moments"].shape[0] == 16
    assert len(fetched) == 2 and set(fetched.values()) == {1}, fetched
