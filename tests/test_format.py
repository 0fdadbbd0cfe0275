"""Spec validation and the errors for things that are not (usable) caches."""

import json

import numpy as np
import pytest

from cache import (CacheMismatchError, CacheSpec, FormatVersionError, IncompleteCacheError,
                   NotACacheError, create_cache, open_cache)
from cache.format import manifest_path
from conftest import small_spec


@pytest.mark.parametrize("field, value, words", [
    ("num_samples", 0, "num_samples"),
    ("chunk_size", 5, "divide shard_size"),
    ("backends", ("zarr", "hdf5"), "backends"),
    ("views", 3, "views"),
    ("token_dtype", "fp8", "token_dtype"),
    ("moments_dtype", "bfloat16", "moments_dtype"),
    ("compression", "lz4", "compression"),
])
def test_spec_rejects_bad_values_naming_the_field(field, value, words):
    with pytest.raises(ValueError, match=words):
        small_spec(**{field: value})


def test_spec_shapes_come_from_parameters():
    s = CacheSpec(num_samples=10, tokens=1024, token_dim=1024, views=2, latent_size=64,
                  token_dtype="int8")
    f = s.fields
    assert f["moments"].shape == (2, 8, 64, 64)
    assert f["tokens"].shape == (2, 1024, 1024) and f["tokens"].dtype == "int8"
    assert f["tokens_scale"].shape == (2, 1024)
    assert f["cls"].shape == (2, 1024)
    # 256 px DINOv2-B fp16: 16 KiB moments + 384 KiB tokens + 1.5 KiB cls + 16 B ints
    assert CacheSpec(num_samples=1).bytes_per_sample == 16384 + 393216 + 1536 + 16


def test_not_a_cache(tmp_path):
    with pytest.raises(NotACacheError, match="no such directory"):
        open_cache(tmp_path / "missing")
    with pytest.raises(NotACacheError, match="has no manifest.json"):
        open_cache(tmp_path)
    manifest_path(tmp_path).write_text("{not json")
    with pytest.raises(NotACacheError, match="unreadable"):
        open_cache(tmp_path)
    manifest_path(tmp_path).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(NotACacheError, match="not a urepa-cache manifest"):
        open_cache(tmp_path)


def test_newer_format_version_is_refused(make_cache):
    path, _ = make_cache()
    m = json.loads(manifest_path(path).read_text())
    m["format_version"] = 99
    manifest_path(path).write_text(json.dumps(m))
    with pytest.raises(FormatVersionError, match="version 99 is newer"):
        open_cache(path)


def test_incomplete_cache_needs_allow_partial(tmp_path, spec):
    from cache.synthetic import synthetic_shard
    writer = create_cache(tmp_path / "c", spec)
    writer.write_shard(1, synthetic_shard(spec, 1))
    with pytest.raises(IncompleteCacheError, match=r"1/5 zarr shards done.*allow_partial"):
        open_cache(tmp_path / "c")
    ds = open_cache(tmp_path / "c", allow_partial=True)
    assert ds.valid_indices.tolist() == list(range(16, 32))
    assert ds[20]["index"] == 20
    with pytest.raises(IncompleteCacheError, match="shard 0 is not written"):
        ds[3]
    report = ds.verify()
    assert not report.ok and report.bad_shards["zarr"] == [0, 2, 3, 4]


def test_reopening_with_other_parameters_is_refused(tmp_path, spec):
    create_cache(tmp_path / "c", spec, {"teacher": "dinov2-b"})
    create_cache(tmp_path / "c", spec, {"teacher": "dinov2-b"})  # same: resumes
    with pytest.raises(CacheMismatchError, match=r"token_dim: existing 24 vs requested 32"):
        create_cache(tmp_path / "c", small_spec(token_dim=32), {"teacher": "dinov2-b"})
    with pytest.raises(CacheMismatchError, match=r"teacher: existing 'dinov2-b' vs requested"):
        create_cache(tmp_path / "c", spec, {"teacher": "dinov2-l"})


def test_write_rejects_bad_arrays(tmp_path, spec):
    from cache.synthetic import synthetic_shard
    writer = create_cache(tmp_path / "c", spec)
    arrays = synthetic_shard(spec, 0)
    with pytest.raises(ValueError, match=r"'tokens' has shape \(15, 1, 16, 24\)"):
        writer.write_shard(0, {**arrays, "tokens": arrays["tokens"][1:]})
    bad = arrays["moments"].copy()
    bad[3, 0, 1, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN/Inf in rows \[3\]"):
        writer.write_shard(0, {**arrays, "moments": bad})
    # the same NaN in a row declared failed is fine: the row is not stored
    assert writer.write_shard(0, {**arrays, "moments": bad}, failures={3: "decode error"})
    with pytest.raises(ValueError, match="missing fields"):
        writer.write_shard(1, {"moments": arrays["moments"]})
