"""Done markers: what a shard's writer records about its files, and the checks of a marker
read back from disk.

A marker (`_done/<backend>/<shard>.json`, written last) holds, besides the shard's range,
failures and latent sums:

    "dataset":   dataset_sha256 of the manifest the shard was written for (format v2)
    "files":     {name: {"bytes", "sha256"}} for each file of the shard
    "checksums": {name: ...} (format v2): zarr, the CRC32C of each inner chunk's bytes;
                 wds, {member extension: [CRC32C of each sample's member, in tar order]}

Readers check every chunk or member they read against "checksums" (cache/reader.py), and
`verify` recomputes all of it from the files. Every name in a marker must be one of the
names the shard's files have by construction (`expected_files`): a marker naming
`../../x` or a URL is damaged, and nothing outside the cache is ever opened.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import re
import tempfile
from pathlib import Path
from typing import Any

from .format import CacheSpec, DamagedCacheError, _is_int, _short, read_done_marker
from .store import Store
from .wds_backend import member_checksums
from .wds_backend import shard_file as wds_shard_file
from .zarr_backend import chunk_checksums
from .zarr_backend import shard_file as zarr_shard_file

_SHA256 = re.compile(r"[0-9a-f]{64}")


def expected_files(spec: CacheSpec, backend: str, shard: int) -> list[str]:
    """The files of a shard, relative to the cache root: the only names a marker may hold."""
    if backend == "zarr":
        return [zarr_shard_file(spec, name, shard) for name in spec.fields]
    return [wds_shard_file(shard)]


def file_digest(store: Store, rel: str, backend: str, spec: CacheSpec) -> dict[str, Any]:
    """Size, SHA-256 and read checksums of a stored file, from one pass over its bytes
    (a remote file is fetched to a temporary local copy first). A file whose layout cannot
    be parsed has checksums None and the reason under "problem"."""
    local = store.local_path(rel)
    with tempfile.TemporaryDirectory(prefix="urepa-digest-") as tmp:
        if local is None:
            local = Path(tmp) / "file"
            store.fetch(rel, local)
        size = local.stat().st_size
        if size == 0:
            return {"bytes": 0, "sha256": hashlib.sha256().hexdigest(), "checksums": None,
                    "problem": f"{rel}: empty file"}
        with open(local, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            out = {"bytes": size, "sha256": hashlib.sha256(buf).hexdigest(), "checksums": None}
            try:
                if backend == "zarr":
                    out["checksums"] = chunk_checksums(buf, spec.shard_size // spec.chunk_size,
                                                       rel)
                else:
                    out["checksums"] = member_checksums(local, rel)
            except DamagedCacheError as e:
                out["problem"] = str(e)
    return out


def check_marker(marker: Any, spec: CacheSpec, backend: str, shard: int, *,
                 version: int, dataset: str) -> list[str]:
    """Every problem of a marker read back from disk: types, ranges, names, counts, and
    (format v2) the dataset digest and the checksum lists' shapes. Empty when sound."""
    if not isinstance(marker, dict):
        return [f"done marker is a {type(marker).__name__}, not an object"]
    problems = []
    start, stop = spec.shard_range(shard)
    if (marker.get("shard"), marker.get("start"), marker.get("stop")) != (shard, start, stop):
        problems.append(f"done marker names shard {_short(marker.get('shard'))} "
                        f"[{_short(marker.get('start'))}, {_short(marker.get('stop'))}), "
                        f"expected {shard} [{start}, {stop})")
    failures = marker.get("failures")
    if not isinstance(failures, list) or not all(
            isinstance(f, dict) and _is_int(f.get("index")) and start <= f["index"] < stop
            and isinstance(f.get("key"), str) and isinstance(f.get("reason"), str)
            for f in failures) or len({f["index"] for f in failures}) != len(failures):
        problems.append("done marker's failures are not a list of distinct "
                        f"{{index in [{start}, {stop}), key, reason}}")
        failures = []
    if marker.get("num_samples") != stop - start - len(failures):
        problems.append(f"marker counts {_short(marker.get('num_samples'))} samples, expected "
                        f"{stop - start - len(failures)}")
    sums = marker.get("latent_sums")
    if not (isinstance(sums, list) and len(sums) == 4 and all(
            isinstance(row, list) and len(row) == spec.latent_channels
            and all(_finite(x) for x in row) for row in sums)):
        problems.append(f"done marker's latent_sums are not 4 x {spec.latent_channels} "
                        "finite numbers")
    names = set(expected_files(spec, backend, shard))
    files = marker.get("files")
    if not isinstance(files, dict) or set(files) != names:
        shown = sorted(files)[:8] if isinstance(files, dict) else files
        problems.append(f"marker lists files {_short(shown)}, expected {sorted(names)}")
    elif not all(isinstance(i, dict) and _is_int(i.get("bytes")) and i["bytes"] >= 0
                 and isinstance(i.get("sha256"), str) and _SHA256.fullmatch(i["sha256"])
                 for i in files.values()):
        problems.append("done marker's file entries are not {bytes, sha256}")
    if version < 2 and ("dataset" in marker or "checksums" in marker):
        problems.append("done marker was written in format v2, the manifest says v1: the "
                        "manifest is damaged")
    if version >= 2:
        if marker.get("dataset") != dataset:
            problems.append("done marker was written for another manifest (dataset digest "
                            f"{str(marker.get('dataset'))[:12]}..., the manifest's "
                            f"{dataset[:12]}...): the manifest was changed after this "
                            "shard was written, or the shard belongs to another cache")
        sums_by_file = marker.get("checksums")
        if not isinstance(sums_by_file, dict) or set(sums_by_file) != names:
            problems.append("done marker holds no read checksums for its files")
    return problems


def _finite(x: Any) -> bool:
    """A JSON number that is finite as a float (an integer of 400 digits is not)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def load_marker(store: Store, spec: CacheSpec, backend: str, shard: int, *, version: int,
                dataset: str) -> dict[str, Any]:
    """A done marker, checked: raises DamagedCacheError naming the shard and what is wrong
    (readers call this once per shard)."""
    marker = read_done_marker(store, backend, shard)
    if marker is None:
        raise DamagedCacheError(f"{store}: {backend} shard {shard} has no readable done "
                                "marker; run `pipeline verify` on the cache")
    problems = check_marker(marker, spec, backend, shard, version=version, dataset=dataset)
    if problems:
        raise DamagedCacheError(f"{store}: {backend} shard {shard}: {problems[0]}; run "
                                "`pipeline verify` on the cache")
    return marker
