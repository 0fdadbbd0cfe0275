"""Nothing read back from a cache is trusted: names stay inside it, a changed manifest is
found, damaged bytes never reach a batch, and sizes are bounded (issue 14)."""

import builtins
import os
import json
import shutil
import tarfile

import numpy as np
import pytest

from cache import (CacheLoader, DamagedCacheError, IncompleteCacheError, LoaderConfig,
                   open_cache)
from cache.format import done_marker_path, manifest_path, sealed
from pipeline.cli import main as pipeline_main


def _edit_manifest(path, edit, reseal=False):
    m = json.loads(manifest_path(path).read_text())
    edit(m)
    manifest_path(path).write_text(json.dumps(sealed(m) if reseal else m, indent=1))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _all_batches(path, **kw):
    loader = CacheLoader(path, LoaderConfig(batch_size=4, block_size=4, shuffle_buffer=8,
                                            fields=("moments", "tokens", "label"), **kw))
    return sum(1 for _ in loader)


# ------------------------------------------------------------------ names (item 2)
@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_verify_opens_no_name_outside_the_cache(make_cache, tmp_path, monkeypatch, backend):
    path, spec = make_cache(backends=(backend,))
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret" * 100)
    marker_file = done_marker_path(path, backend, 1)
    marker = json.loads(marker_file.read_text())
    rel = next(iter(marker["files"]))
    info = {"bytes": outside.stat().st_size, "sha256": "0" * 64}
    del marker["files"][rel]
    marker["files"]["../outside.bin"] = info
    marker["files"][f"file://{outside}"] = info
    marker_file.write_text(json.dumps(marker))
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open",
                        lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1])
    report = open_cache(path).verify()
    assert report.bad_shards == {backend: [1]}
    assert "marker lists files" in str(report)
    assert not [f for f in opened if "outside" in f]


# ------------------------------------------------------------------ the manifest (item 3)
@pytest.mark.parametrize("edit", [
    lambda m: m["latent"].update(scale=0.18216),                       # one byte
    lambda m: m["failures"].append({"index": 5, "key": "x", "reason": "y"}),
])
def test_any_manifest_change_is_found_on_open(make_cache, capsys, edit):
    path, _ = make_cache(backends=("zarr",))
    _edit_manifest(path, edit)
    with pytest.raises(DamagedCacheError, match="does not match its own checksum"):
        open_cache(path)
    assert pipeline_main(["verify", str(path)]) == 1
    assert "checksum" in _one_error_line(capsys)


def test_a_resealed_manifest_is_caught_by_the_done_markers(make_cache):
    """Even a manifest whose own checksum was recomputed disagrees with the markers."""
    path, _ = make_cache(backends=("zarr", "wds"))
    _edit_manifest(path, lambda m: m["latent"].update(scale=0.13025), reseal=True)
    report = open_cache(path).verify()
    assert not report.ok and "written for another manifest" in str(report)
    assert report.bad_shards == {"zarr": list(range(5)), "wds": list(range(5))}

    path, _ = make_cache("c2", backends=("zarr",))

    def drop_sample(m):
        m["failures"].append({"index": 5, "key": "x", "reason": "y"})
        m["num_valid"] -= 1
    _edit_manifest(path, drop_sample, reseal=True)
    report = open_cache(path).verify()
    assert "failures differ from the zarr done markers" in str(report)

    path, _ = make_cache("c3", backends=("zarr",))
    _edit_manifest(path, lambda m: m["latent"]["channel_stats"]["mean"].reverse(), reseal=True)
    assert "channel_stats differ" in str(open_cache(path).verify())


# ------------------------------------------------------------------ reads (item 4)
def _zarr_chunk_data_offset(path):
    """A byte inside the data of shard 2's first tokens chunk."""
    return path / "zarr" / "tokens" / "c" / "2" / "0" / "0" / "0", 100


def _wds_member_data_offset(path):
    tar = path / "wds" / "shard-000002.tar"
    with tarfile.open(tar) as tf:
        member = next(m for m in tf if m.name.endswith(".tokens.npy"))
    return tar, member.offset_data + 200


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_a_flipped_byte_never_reaches_a_batch(make_cache, backend, capsys):
    path, _ = make_cache(backends=(backend,))
    assert _all_batches(path) == 17
    f, offset = (_zarr_chunk_data_offset if backend == "zarr" else _wds_member_data_offset)(path)
    data = bytearray(f.read_bytes())
    data[offset] ^= 0x10
    f.write_bytes(bytes(data))
    with pytest.raises(DamagedCacheError, match=r"fails its checksum.*pipeline verify") as e:
        _all_batches(path)
    assert f.relative_to(path).as_posix() in str(e.value)
    # the explicit way out reads the damaged bytes as they are
    assert _all_batches(path, verify=False) == 17


def test_swapped_zarr_shards_are_found(make_cache):
    path, _ = make_cache(backends=("zarr",))
    a, b = (path / "zarr" / "moments" / "c" / str(k) / "0" / "0" / "0" for k in (1, 2))
    tmp = a.with_name("swap")
    shutil.move(a, tmp)
    shutil.move(b, a)
    shutil.move(tmp, b)
    with pytest.raises(DamagedCacheError, match="zarr/moments/c/[12]/0/0/0"):
        _all_batches(path)


def test_damage_in_a_loader_worker_is_one_line(make_cache):
    path, _ = make_cache(backends=("zarr",))
    f, offset = _zarr_chunk_data_offset(path)
    data = bytearray(f.read_bytes())
    data[offset] ^= 0x10
    f.write_bytes(bytes(data))
    with pytest.raises(DamagedCacheError) as e:
        _all_batches(path, num_workers=1, mp_context="spawn")
    assert "\n" not in str(e.value) and "fails its checksum" in str(e.value)


# ------------------------------------------------------------------ bounds (item 7)
@pytest.mark.timeout(60)
def test_an_absurd_num_samples_is_refused_at_once(make_cache, capsys):
    path, _ = make_cache(backends=("zarr",))

    def huge(m):
        m["spec"]["num_samples"] = 10**12
        m["num_samples"] = m["num_valid"] = 10**12
    _edit_manifest(path, huge, reseal=True)
    with pytest.raises(DamagedCacheError, match="documented limit"):
        open_cache(path)
    assert pipeline_main(["verify", str(path), "--allow-partial"]) == 1
    assert "num_samples" in _one_error_line(capsys)

    def large(m):  # within the limits, but more shards than the cache holds
        m["spec"]["num_samples"] = 10**6
        m["num_samples"] = m["num_valid"] = 10**6
    _edit_manifest(path, large, reseal=True)
    with pytest.raises(IncompleteCacheError, match="5/62500"):
        open_cache(path)


# ------------------------------------------------------------------ one line (wrong types)
@pytest.mark.parametrize("edit, words", [
    (lambda m: m.update(format_version="2"), "not a version number"),
    (lambda m: m["spec"].update(tokens="16"), "spec.tokens"),
    (lambda m: m["latent"].update(scale="0.18215"), "latent.scale"),
    (lambda m: m.update(failures={"index": 3}), "failures"),
])
def test_manifest_fields_of_the_wrong_type_are_one_line(make_cache, capsys, edit, words):
    path, _ = make_cache(backends=("zarr",))
    _edit_manifest(path, edit, reseal=True)
    for command in ("verify", "stats"):
        assert pipeline_main([command, str(path)]) == 1
        line = _one_error_line(capsys)
        assert words in line and "newer" not in line


def test_a_damaged_marker_is_one_line_for_the_loader(make_cache):
    path, _ = make_cache(backends=("wds",))
    marker_file = done_marker_path(path, "wds", 3)
    marker = json.loads(marker_file.read_text())
    marker["checksums"] = {"wds/shard-000003.tar": {"tokens.npy": "many"}}
    marker_file.write_text(json.dumps(marker))
    with pytest.raises(DamagedCacheError, match="shard-000003.tar: its members do not match the checksums"):
        _all_batches(path)
    assert np.isfinite(open_cache(path)[0]["moments"]).all()  # other shards still read


# ------------------------------------------------------------------ the training path (item 4)
def test_train_run_stops_at_damaged_bytes_in_one_line(tmp_path, capsys):
    from cache import CacheSpec
    from conftest import tiny_run_config, write_structured_cache
    from train.cli import main as train_main
    from train.config import to_yaml

    spec = CacheSpec(num_samples=96, shard_size=32, latent_size=8, tokens=16, token_dim=32)
    cache = write_structured_cache(tmp_path / "c", spec)
    f = cache / "zarr" / "moments" / "c" / "1" / "0" / "0" / "0" / "0"
    data = bytearray(f.read_bytes())
    data[300] ^= 0x01  # one bit of one latent value: an fp16 that still looks plausible
    f.write_bytes(bytes(data))

    def run(name, *extra):
        cfg = tiny_run_config(cache, tmp_path / name, "batch_size=16", "max_steps=6",
                              "data.shuffle_buffer=32", *extra)  # 6 steps: every sample
        path = tmp_path / f"{name}.yaml"
        path.write_text(to_yaml(cfg))
        return train_main(["run", str(path)])

    assert run("checked") == 2
    line = _one_error_line(capsys)
    assert "zarr/moments/c/1/0/0/0/0" in line and "pipeline verify" in line
    assert not list((tmp_path / "checked" / "checkpoints").glob("step_*"))
    assert run("unchecked", "data.verify_reads=false") == 0  # the explicit way out


# ------------------------------------------------------------------ attacks from the review
@pytest.mark.filterwarnings("ignore:.*format v1 cache")
def test_a_downgrade_to_v1_does_not_turn_the_checks_off(make_cache):
    path, _ = make_cache(backends=("zarr",))
    text = manifest_path(path).read_text()
    manifest_path(path).write_text(text.replace('"format_version": 2', '"format_version": 1'))
    with pytest.raises(DamagedCacheError, match="version 2 checksum"):
        open_cache(path)
    _edit_manifest(path, lambda m: (m.update(format_version=1), m.pop("sha256")))
    with pytest.raises(DamagedCacheError, match="markers are v2"):
        open_cache(path)


def test_changed_zarr_metadata_is_found(make_cache, capsys):
    """Codecs, endianness and shapes turn bytes into values: a transpose codec added to
    moments' zarr.json would serve transposed latents whose bytes all pass their CRC."""
    path, _ = make_cache(backends=("zarr",))
    meta = path / "zarr" / "moments" / "zarr.json"
    m = json.loads(meta.read_text())
    m["codecs"][0]["configuration"]["codecs"].insert(
        0, {"name": "transpose", "configuration": {"order": [0, 1, 2, 4, 3]}})
    meta.write_text(json.dumps(m))
    with pytest.raises(DamagedCacheError, match="zarr/moments/zarr.json differs"):
        _all_batches(path)
    assert pipeline_main(["verify", str(path)]) == 1
    assert "zarr/moments/zarr.json differs" in capsys.readouterr().out
    meta.write_bytes(meta.read_bytes()[:-3])  # unparseable: still one line
    assert pipeline_main(["stats", str(path)]) == 1
    assert "zarr.json differs" in _one_error_line(capsys)


def _shard_index(f, n_chunks):
    data = bytearray(f.read_bytes())
    return data, np.frombuffer(data, "<u8", 2 * n_chunks, len(data) - 16 * n_chunks - 4)


def test_crafted_shard_indexes_are_refused(make_cache):
    import google_crc32c
    path, spec = make_cache(backends=("zarr",))
    f = path / "zarr" / "moments" / "c" / "1" / "0" / "0" / "0" / "0"
    n = spec.shard_size // spec.chunk_size
    for entry in ([2**64 - 1, 2**64 - 1], [2**64 - 8, 16]):  # "never written"; wraps 2^64
        data, index = _shard_index(f, n)
        index = index.copy().reshape(n, 2)
        index[1] = entry
        data[-16 * n - 4:-4] = index.tobytes()
        data[-4:] = np.uint32(google_crc32c.value(bytes(data[-16 * n - 4:-4]))).tobytes()
        copy = path.parent / "crafted"
        shutil.copytree(path, copy)
        (copy / f.relative_to(path)).write_bytes(bytes(data))
        with pytest.raises(DamagedCacheError, match="zarr/moments/c/1/0/0/0/0"):
            _all_batches(copy)
        assert not open_cache(copy).verify().ok
        shutil.rmtree(copy)


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_missing_or_empty_shard_files_are_one_line(make_cache, backend):
    path, _ = make_cache(backends=(backend,))
    f = (path / "zarr" / "tokens" / "c" / "2" / "0" / "0" / "0" if backend == "zarr"
         else path / "wds" / "shard-000002.tar")
    f.write_bytes(b"")
    with pytest.raises(DamagedCacheError):
        _all_batches(path)
    f.unlink()
    ds = open_cache(path)
    for _ in range(2):  # and again: the reader keeps no half-opened shard
        with pytest.raises(DamagedCacheError):
            ds[40]


def test_markers_that_are_not_plain_files_or_numbers(make_cache):
    path, _ = make_cache(backends=("zarr",))
    marker_file = done_marker_path(path, "zarr", 1)
    marker = json.loads(marker_file.read_text())
    marker["latent_sums"][1][0] = 10**400
    marker_file.write_text(json.dumps(marker))
    report = open_cache(path).verify()
    assert report.bad_shards == {"zarr": [1]} and "latent_sums" in str(report)
    marker_file.write_text('{"shard": ' + "9" * 5000 + "}")  # above Python's int limit
    assert open_cache(path).verify().bad_shards == {"zarr": [1]}
    marker_file.unlink()
    marker_file.symlink_to("/dev/zero")      # would be read until memory runs out
    assert "not done" in str(open_cache(path, allow_partial=True).verify())
    marker_file.unlink()
    os.mkfifo(marker_file)                    # would block a reader forever
    assert "not done" in str(open_cache(path, allow_partial=True).verify())


def test_a_failure_dropped_from_the_manifest_is_found_by_the_loader(make_cache):
    path, _ = make_cache(backends=("zarr",), failures={20: "corrupt"})

    def drop(m):
        m["failures"] = []
        m["num_valid"] += 1
    _edit_manifest(path, drop, reseal=True)
    with pytest.raises(DamagedCacheError, match="failures in shard 1 differ"):
        _all_batches(path)


def test_zarr_pipeline_damage_is_one_line(make_cache):
    """Compressed arrays are read through zarr's own pipeline: a flipped byte fails the
    chunk's crc32c trailer there, reported as DamagedCacheError naming the array."""
    path, _ = make_cache(backends=("zarr",), compression="zstd")
    f = path / "zarr" / "moments" / "c" / "1" / "0" / "0" / "0" / "0"
    data = bytearray(f.read_bytes())
    data[40] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(DamagedCacheError, match="zarr/moments: rows") as e:
        _all_batches(path)
    assert "\n" not in str(e.value)
