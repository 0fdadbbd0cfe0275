"""verify() finds damage: flipped bytes, truncation, missing files and markers."""

import json

import pytest

from cache import open_cache
from cache.format import done_marker_path, manifest_path


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_clean_cache_verifies(make_cache):
    path, spec = make_cache(token_dtype="int8", views=2, failures={9: "CMYK decode error"})
    for backend in spec.backends:
        report = open_cache(path, backend=backend).verify()
        assert report.ok, str(report)
        assert report.shards_checked == 2 * spec.num_shards
        assert report.samples_checked == 2 * 70 - 1  # zarr keeps the failed slot, wds not
        # the line says what each backend holds, not their sum (issue 17)
        assert str(report).startswith(f"OK: zarr: {spec.num_shards} shard(s), 70 samples; "
                                      f"wds: {spec.num_shards} shard(s), 69 samples, ")
    one = open_cache(path).verify(backends=["zarr"])
    assert str(one).startswith(f"OK: zarr: {spec.num_shards} shard(s), 70 samples, ")


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_damage_is_found_and_every_bad_shard_listed(make_cache, backend):
    path, spec = make_cache(backends=(backend,))
    files = {k: [path / f for f in json.loads(done_marker_path(path, backend, k).read_text())
                 ["files"]] for k in range(spec.num_shards)}
    _flip_byte(files[1][0], 100)                       # a flipped byte
    f3 = files[3][-1]
    f3.write_bytes(f3.read_bytes()[:-700])             # a truncated shard
    files[4][0].unlink()                               # a missing file
    done_marker_path(path, backend, 0).unlink()        # a shard never finished
    report = open_cache(path, allow_partial=True).verify()
    assert not report.ok
    assert report.bad_shards == {backend: [0, 1, 3, 4]}
    text = str(report)
    assert "checksum mismatch" in text and "truncated" in text and "missing file" in text
    assert "not done" in text


def test_nan_in_stored_data_is_found(make_cache):
    """A NaN that got into a shard (with a consistent checksum) is still reported."""
    import numpy as np
    import zarr

    from cache.markers import file_digest
    from cache.store import Store
    path, spec = make_cache(backends=("zarr",))
    arr = zarr.open_array(path / "zarr" / "cls", mode="r+")
    block = arr[16:32]
    block[5, 0, 3] = np.nan
    arr[16:32] = block
    marker_path = done_marker_path(path, "zarr", 1)
    marker = json.loads(marker_path.read_text())
    rel = "zarr/cls/c/1/0/0"
    digest = file_digest(Store(path), rel, "zarr", spec)
    marker["files"][rel] = {"bytes": digest["bytes"], "sha256": digest["sha256"]}
    marker["checksums"][rel] = digest["checksums"]
    marker_path.write_text(json.dumps(marker))
    report = open_cache(path).verify()
    assert report.bad_shards == {"zarr": [1]} and "NaN/Inf in samples [21]" in str(report)


def test_unfinalized_manifest_is_reported(make_cache):
    path, _ = make_cache(finalize=False)
    report = open_cache(path, allow_partial=True).verify()
    assert not report.ok and "finalize was never run" in str(report)
    assert report.bad_shards == {}
    m = json.loads(manifest_path(path).read_text())
    assert m["status"] == "incomplete"
