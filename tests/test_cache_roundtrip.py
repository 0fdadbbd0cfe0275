"""Round trips through both backends, every dtype option, with values that encode their index."""

import io

import numpy as np
import pytest
import webdataset as wds

from cache import open_cache
from cache.quant import dequantize_tokens
from conftest import expected


@pytest.mark.parametrize("backend", ["zarr", "wds"])
@pytest.mark.parametrize("moments_dtype, token_dtype, views", [
    ("float16", "float16", 1), ("float32", "float16", 2), ("float16", "int8", 2),
])
def test_roundtrip(make_cache, backend, moments_dtype, token_dtype, views):
    path, spec = make_cache(backends=(backend,), moments_dtype=moments_dtype,
                            token_dtype=token_dtype, views=views)
    ds = open_cache(path)
    assert len(ds) == ds.num_valid == 70 and ds.backend == backend
    for i in (0, 15, 16, 33, 69):  # shard edges and the short last shard
        got, want = ds[i], expected(spec, i)
        assert got["index"] == i and got["key"] == want["key"] and got["label"] == want["label"]
        assert got["moments"].dtype == np.dtype(moments_dtype)
        np.testing.assert_array_equal(got["moments"], want["moments"])
        assert got["moments"][:, 0, 0, 0].tolist() == [i] * views  # value encodes index
        np.testing.assert_array_equal(got["cls"], want["cls"])
        tol = 0.02 if token_dtype == "int8" else 1e-3
        np.testing.assert_allclose(got["tokens"].astype(np.float32), want["tokens"],
                                   atol=tol * np.abs(want["tokens"]).max())
    assert [s["index"] for s in ds] == list(range(70))


def test_zarr_fast_path_equals_zarr_api(make_cache):
    """The mmap reader returns exactly what zarr's own API returns, for every field."""
    path, spec = make_cache(backends=("zarr",), token_dtype="int8", views=2)
    ds = open_cache(path)
    idx = np.random.default_rng(0).permutation(70)
    fields = ["moments", "tokens", "tokens_scale", "cls", "label", "index"]
    assert all(ds.reader._fast[f] is not None for f in fields)
    got = ds.gather(idx, fields)
    for f in fields:
        np.testing.assert_array_equal(got[f], ds.reader.arrays[f][:][idx])


def test_zstd_compressed_zarr_reads_through_zarr(make_cache):
    path, spec = make_cache(backends=("zarr",), compression="zstd")
    ds = open_cache(path)
    assert ds.reader._fast["tokens"] is None  # compressed: zarr's pipeline decodes
    np.testing.assert_array_equal(ds[40]["moments"], expected(spec, 40)["moments"])
    assert ds.verify().ok


def test_both_backends_hold_the_same_samples(make_cache):
    path, _ = make_cache(token_dtype="int8", failures={5: "corrupt JPEG"})
    z, w = open_cache(path, backend="zarr"), open_cache(path, backend="wds")
    assert z.valid_indices.tolist() == w.valid_indices.tolist() == \
        [i for i in range(70) if i != 5]
    fields = ["moments", "tokens", "tokens_scale", "cls", "label", "index"]
    a, b = z.gather(z.valid_indices, fields), w.gather(w.valid_indices, fields)
    for f in fields:
        np.testing.assert_array_equal(a[f], b[f])


def test_plain_webdataset_reads_the_tars(make_cache):
    path, spec = make_cache(backends=("wds",), failures={17: "truncated"})
    urls = sorted(str(p) for p in (path / "wds").glob("shard-*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False, nodesplitter=None).decode())
    assert [int(s["__key__"]) for s in samples] == [i for i in range(70) if i != 17]
    s = samples[20]  # global index 21
    want = expected(spec, 21)
    np.testing.assert_array_equal(s["moments.npy"], want["moments"])
    assert s["label.cls"] == want["label"] and s["key.txt"] == want["key"]
    assert s["tokens.npy"].dtype == np.float16 and s["tokens.npy"].shape == (1, 16, 24)


def test_failed_samples_are_recorded_and_skipped(make_cache):
    from cache import FailedSampleError
    path, _ = make_cache(failures={3: "corrupt JPEG", 40: "zero-byte file"})
    ds = open_cache(path)
    assert ds.manifest["num_valid"] == 68
    assert [(f["index"], f["reason"]) for f in ds.manifest["failures"]] == \
        [(3, "corrupt JPEG"), (40, "zero-byte file")]
    with pytest.raises(FailedSampleError, match="zero-byte file"):
        ds[40]
    assert 3 not in [s["index"] for s in ds]


def test_latent_channel_stats_match_direct_computation(make_cache):
    path, spec = make_cache(views=2)
    ds = open_cache(path)
    m = np.stack([expected(spec, i)["moments"].astype(np.float64) for i in range(70)])
    mean, std = m[:, :, :4], m[:, :, 4:]
    z_var = mean.var(axis=(0, 1, 3, 4)) + (std**2).mean(axis=(0, 1, 3, 4))
    stats = ds.manifest["latent"]["channel_stats"]
    np.testing.assert_allclose(stats["mean"], mean.mean(axis=(0, 1, 3, 4)), rtol=1e-4)
    np.testing.assert_allclose(stats["std"], np.sqrt(z_var), rtol=1e-4)
    assert ds.manifest["latent"]["scale"] == 0.18215


def test_int8_dequantize_on_torch_matches_numpy():
    import torch
    from cache.quant import quantize_tokens
    x = np.random.default_rng(0).standard_normal((3, 5, 8)).astype(np.float32)
    q, s = quantize_tokens(x)
    t = dequantize_tokens(torch.from_numpy(q), torch.from_numpy(s), torch.float32)
    np.testing.assert_allclose(t.numpy(), q * s.astype(np.float32)[..., None], rtol=1e-6)


def test_wds_irregular_member_layout_falls_back_per_sample(tmp_path, spec):
    """Keys longer than a tar block make member strides uneven: still read correctly."""
    from cache import create_cache, finalize_cache
    from cache.synthetic import synthetic_shard
    s = spec.__class__(**{**spec.to_json(), "backends": ("wds",), "num_samples": 16})
    writer = create_cache(tmp_path / "c", s)
    arrays = synthetic_shard(s, 0)
    arrays["key"] = np.array(["k" * (100 + 300 * (i % 3)) for i in range(16)])
    writer.write_shard(0, arrays)
    finalize_cache(tmp_path / "c")
    ds = open_cache(tmp_path / "c")
    got = ds.gather(np.arange(16), ["moments", "label"])
    np.testing.assert_array_equal(got["moments"], arrays["moments"].astype(np.float16))
    assert ds.keys([4, 5]) == ["k" * 400, "k" * 700]
    assert ds.verify().ok


def _walked(path):
    """A tar's index by the stdlib's member-by-member walk (the reference)."""
    from cache.wds_backend import _walk_members
    rows = _walk_members(path)
    return rows, np.fromiter(rows, np.int64)


def _by_stride(path, check_all=True):
    """A tar's index from its fixed stride (None if _MappedTar fell back to the walk),
    with every header checked when `check_all`."""
    from cache.wds_backend import _MappedTar
    tar = _MappedTar(path, path.name)
    if not tar._unchecked and not hasattr(tar, "_layout"):
        return None
    if check_all and not all(tar.check(e, 0, len(tar.keys)) for e in list(tar._unchecked)):
        return None
    return tar.keys, tar.offsets, tar.sizes


def test_wds_index_from_the_stride_equals_a_tar_walk(make_cache):
    """Opening a tar reads two samples' headers with tarfile and checks the rest at their
    predicted places: the index equals tarfile's walk, gaps of failed samples included."""
    path, _ = make_cache(backends=("wds",), failures={17: "truncated", 18: "bad", 40: "x"})
    tars = sorted((path / "wds").glob("shard-*.tar"))
    for tar in tars:
        fixed = _by_stride(tar)
        assert fixed is not None, tar
        keys, offsets, sizes = fixed
        rows, walked = _walked(tar)
        np.testing.assert_array_equal(keys, walked)
        assert set(offsets) == {e for r in rows.values() for e in r}
        for ext in offsets:
            assert offsets[ext].tolist() == [r[ext][1] for r in rows.values()]
            assert sizes[ext].tolist() == [r[ext][2] for r in rows.values()]
    assert 17 not in _by_stride(tars[1])[0] and 19 in _by_stride(tars[1])[0]  # of 16


def test_wds_index_falls_back_to_the_walk_unless_every_header_fits(make_cache, tmp_path):
    """A header changed anywhere (its checksum, its name, another sample's layout) makes
    the fixed-stride index refuse; the walk then decides, as before."""
    import shutil
    path, spec = make_cache(backends=("wds",))
    tar = sorted((path / "wds").glob("shard-*.tar"))[0]
    rows, _ = _walked(tar)
    header = rows[5]["moments.npy"][1] - 512   # sample 5's moments ustar header
    for pos, value in ((header + 3, ord("7")), (header + 148, ord("1")), (header + 300, 1)):
        bad = tmp_path / f"bad-{pos}.tar"
        shutil.copy(tar, bad)
        with open(bad, "r+b") as f:
            f.seek(pos)
            old = f.read(1)[0]
            f.seek(pos)
            f.write(bytes([value if value != old else value + 1]))
        assert _by_stride(bad) is None, pos
    # a damaged header in a cache: the reader's walk reports it, nothing is misread
    with open(tar, "r+b") as f:
        f.seek(header + 148)
        f.write(b"9")
    ds = open_cache(path, verify_reads=False)
    with pytest.raises(Exception, match="unreadable tar|checksum"):
        ds.gather(np.arange(8), ["moments"])


def test_wds_tar_with_samples_out_of_order_is_refused(make_cache):
    """Samples 5 and 6 swapped in a tar (the layout holds, the keys do not follow): no
    read returns one sample's values for the other, checked or not."""
    import tarfile
    from cache import DamagedCacheError
    path, _ = make_cache(backends=("wds",))
    tar = sorted((path / "wds").glob("shard-*.tar"))[0]
    with tarfile.open(tar) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    key = lambda m: int(m.name.partition(".")[0])  # noqa: E731
    order = sorted(members, key=lambda md: {5: 6, 6: 5}.get(key(md[0]), key(md[0])))
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        for m, data in order:
            tf.addfile(m, io.BytesIO(data))
    for verify in (False, True):
        with pytest.raises(DamagedCacheError, match="not in increasing order|checksum"):
            open_cache(path, verify_reads=verify).gather(np.arange(8), ["moments"])


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_gather_refuses_samples_it_does_not_hold(make_cache, backend):
    """Out of range (70 lies in the last chunk's padding), failed at encode time, or in a
    shard not written: an error, never zeros."""
    from cache import FailedSampleError, IncompleteCacheError
    path, spec = make_cache(backends=(backend,), failures={5: "corrupt"})
    ds = open_cache(path)
    for bad, error in ((70, IndexError), (-1, IndexError), (5, FailedSampleError)):
        with pytest.raises(error):
            ds.gather(np.array([3, bad, 4]), ["moments", "label"])
    assert ds.gather(np.array([], np.int64), ["label"])["label"].shape == (0,)
    partial, _ = make_cache("partial", backends=(backend,), finalize=False)
    (partial / "_done" / backend / "000004.json").unlink()  # the last shard (64..69)
    ds = open_cache(partial, allow_partial=True)
    with pytest.raises(IncompleteCacheError):
        ds.gather(np.array([0, 69]), ["label"])
