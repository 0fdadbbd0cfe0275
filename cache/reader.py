"""Reading a cache: one API for both backends.

    ds = open_cache(path)            # checks format, version, completeness
    len(ds), ds[i], iter(ds)         # global index space; failed samples raise / are skipped
    ds.gather(indices, fields)       # batched raw reads (the training loader's path)
    ds.verify()                      # checksums, shapes, dtypes, NaN/Inf, counts, all shards
    ds.stats()                       # a summary for humans
"""

from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import prefault
from .format import (INDEX, KEY, LABEL, SCALES, CacheError, CacheSpec, DamagedCacheError,
                     FailedSampleError, IncompleteCacheError, dataset_sha256, done_shards,
                     latent_channel_stats, read_done_marker, read_manifest)
from .markers import check_marker, expected_files, file_digest, load_marker
from .quant import dequantize_tokens
from .store import Store
from .wds_backend import WdsReader
from .zarr_backend import ZarrReader, metadata_problems

READERS = {"zarr": ZarrReader, "wds": WdsReader}


def _runs(indices: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]],
                                        list[tuple[int, int]]]:
    """(the order that sorts `indices`, the runs of consecutive indices as positions
    [a, b) in that order, and as index ranges [lo, hi))."""
    order = np.argsort(indices, kind="stable")
    ordered = indices[order]
    cuts = np.flatnonzero(np.diff(ordered) != 1) + 1
    runs = list(zip(np.concatenate([[0], cuts]).tolist(),
                    np.concatenate([cuts, [len(ordered)]]).tolist()))
    return order, runs, [(int(ordered[a]), int(ordered[b - 1]) + 1) for a, b in runs]


def _copy(copies: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    for arr, rows, piece in copies:
        arr[rows] = piece


@dataclasses.dataclass
class VerifyReport:
    """Result of CacheDataset.verify(): every problem found, per backend and shard."""

    problems: list[tuple[str, int | None, str]]  # (backend, shard or None, message)
    shards_checked: int     # over all backends checked
    samples_checked: int    # over all backends checked: a sample in two backends counts twice
    bytes_checked: int
    per_backend: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    # backend -> (shards, samples) checked

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_shards(self) -> dict[str, list[int]]:
        out: dict[str, set[int]] = {}
        for backend, shard, _ in self.problems:
            if shard is not None:
                out.setdefault(backend, set()).add(shard)
        return {b: sorted(s) for b, s in out.items()}

    def __str__(self) -> str:
        counts = set(self.per_backend.values())
        if len(counts) == 1 and len(self.per_backend) > 1:   # the same in every backend
            (shards, samples), = counts
            what = (f"{shards} shard(s), {samples} samples in each of "
                    f"{len(self.per_backend)} backends ({', '.join(self.per_backend)})")
        elif self.per_backend:
            what = "; ".join(f"{b}: {sh} shard(s), {sa} samples"
                             for b, (sh, sa) in self.per_backend.items())
        else:
            what = f"{self.shards_checked} shard(s), {self.samples_checked} samples"
        head = (f"{'OK' if self.ok else 'FAILED'}: {what}, {self.bytes_checked / 1e9:.2f} GB "
                "checked")
        lines = [head] + [f"  {b} shard {s}: {msg}" if s is not None else f"  {b}: {msg}"
                          for b, s, msg in self.problems]
        return "\n".join(lines)


def open_cache(path: str | os.PathLike, *, allow_partial: bool = False,
               backend: str | None = None, verify_reads: bool = True) -> CacheDataset:
    """Open a cache: a directory or an fsspec URL (s3://bucket/in1k-256). Raises
    NotACacheError, FormatVersionError, DamagedCacheError (a manifest changed since it was
    written), or IncompleteCacheError (unless `allow_partial`, which serves the shards that
    are done). `backend` picks zarr or wds when both were written (default: the first
    written). With `verify_reads` (the default) every chunk or member read is checked
    against the CRC32C its done marker records, and damage raises DamagedCacheError naming
    the file (docs/cache-format.md, "Threat model and guarantees")."""
    return CacheDataset(path, allow_partial=allow_partial, backend=backend,
                        verify_reads=verify_reads)


class CacheDataset:
    def __init__(self, path: str | os.PathLike, *, allow_partial: bool = False,
                 backend: str | None = None, verify_reads: bool = True):
        self.manifest = read_manifest(path)
        self.store = Store.of(path)
        self.root = str(self.store)  # as given: a path or a URL
        self.spec = CacheSpec.from_json(self.manifest["spec"])
        self.version = self.manifest["format_version"]
        self.dataset = dataset_sha256(self.manifest)
        self.verify_reads = verify_reads and self.version >= 2
        if verify_reads and self.version < 2:
            warnings.warn(f"{self.root} is a format v{self.version} cache: it records no read "
                          "checksums, so reads are not checked; run `pipeline verify` on it "
                          "before training, or re-encode it", stacklevel=2)
        self._markers: dict[int, dict] = {}
        self.backend = backend or self.spec.backends[0]
        if self.backend not in self.spec.backends:
            raise ValueError(f"backend {self.backend!r} not in this cache "
                             f"(it has {list(self.spec.backends)})")
        spec = self.spec
        done_set = done_shards(self.store, self.backend)
        done = np.zeros(spec.num_shards, dtype=bool)
        done[[k for k in done_set if k < spec.num_shards]] = True
        if self.manifest.get("status") != "complete" or not done.all():
            if not allow_partial:
                raise IncompleteCacheError(
                    f"{self.root} is incomplete: status {self.manifest.get('status')!r}, "
                    f"{int(done.sum())}/{spec.num_shards} {self.backend} shards done. Finish "
                    "it by rerunning the encode job, or open it with allow_partial=True")
        self.shard_done = done
        if self.version < 2 and done.any():  # a v2 cache whose manifest was edited to "1"
            first = read_done_marker(self.store, self.backend, int(np.argmax(done)))
            if isinstance(first, dict) and ("checksums" in first or "dataset" in first):
                raise DamagedCacheError(f"{self.root}: the manifest says format v1, its done "
                                        "markers are v2: the manifest is damaged")
        failures = self.manifest.get("failures")
        if failures is None:  # not finalized: the (checked) done markers list them
            for k in np.flatnonzero(done).tolist():
                self._markers[k] = load_marker(self.store, spec, self.backend, k,
                                               version=self.version, dataset=self.dataset)
            failures = [f for k in sorted(self._markers) for f in self._markers[k]["failures"]]
        self.failures: dict[int, str] = {int(f["index"]): f["reason"] for f in failures}
        # built from the done shards only: memory follows the samples there are
        ranges = [np.arange(*spec.shard_range(int(k)), dtype=np.int64)
                  for k in np.flatnonzero(done)]
        valid = np.concatenate(ranges) if ranges else np.zeros(0, np.int64)
        self.valid_indices = valid[~np.isin(valid, np.fromiter(self.failures, np.int64))]
        self._reader = None
        self._copier: tuple[int, int, ThreadPoolExecutor] | None = None  # gather(threads=)
        # per fields: (pid, indices, stop) of the read-ahead asked for the next gather
        self._then: dict[tuple[str, ...], tuple[int, np.ndarray, threading.Event]] = {}

    def _marker(self, shard: int) -> dict[str, Any]:
        """The shard's done marker, checked once (DamagedCacheError if it is not sound,
        or if its failures are not the manifest's for this shard: a sample dropped from
        the manifest's failures would train on its zeroed row)."""
        marker = self._markers.get(shard)
        if marker is None:
            marker = load_marker(self.store, self.spec, self.backend, shard,
                                 version=self.version, dataset=self.dataset)
            start, stop = self.spec.shard_range(shard)
            mine = {f["index"] for f in marker["failures"]}
            if mine != {i for i in self.failures if start <= i < stop}:
                raise DamagedCacheError(
                    f"{self.root}: the manifest's failures in shard {shard} differ from its "
                    "done marker's: run `pipeline verify` on the cache")
            self._markers[shard] = marker
        return marker

    def _checksums(self, shard: int) -> dict[str, Any]:
        return self._marker(shard)["checksums"]

    # --------------------------------------------------------------- random access
    @property
    def reader(self) -> ZarrReader | WdsReader:
        """Backend reader, opened on first use (so each DataLoader worker opens its own)."""
        if self._reader is None:
            extra = {"metadata": self.manifest.get("zarr_metadata")} \
                if self.backend == "zarr" and self.version >= 2 else {}
            self._reader = READERS[self.backend](
                self.store, self.spec,
                checksums=self._checksums if self.verify_reads else None, **extra)
        return self._reader

    def __getstate__(self) -> dict:  # never pickle open files, mmaps or threads
        return {**self.__dict__, "_reader": None, "_copier": None, "_then": {}}

    def __len__(self) -> int:
        return self.spec.num_samples

    @property
    def num_valid(self) -> int:
        return len(self.valid_indices)

    def _check_available(self, i: int) -> None:
        if not 0 <= i < self.spec.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.spec.num_samples})")
        if i in self.failures:
            raise FailedSampleError(f"sample {i} failed at encode time: {self.failures[i]}")
        shard = i // self.spec.shard_size
        if not self.shard_done[shard]:
            raise IncompleteCacheError(f"sample {i}: shard {shard} is not written yet")

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Sample i with int8 fields dequantized to fp16: moments, tokens, cls, [attn_qk],
        label, index, key."""
        i = int(i)
        self._check_available(i)
        names = [n for n in self.spec.fields if n != KEY]
        row = {k: v[0] for k, v in self.gather(np.array([i]), names).items()}
        for name, scale in SCALES.items():
            if scale in row:
                row[name] = dequantize_tokens(row[name], row.pop(scale)).numpy()
        row[LABEL], row[INDEX] = int(row[LABEL]), int(row[INDEX])
        row[KEY] = self.reader.read_keys(i, i + 1)[0]
        return row

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Valid samples in index order."""
        for i in self.valid_indices:
            yield self[i]

    def keys(self, indices: Sequence[int]) -> list[str]:
        return [self.reader.read_keys(int(i), int(i) + 1)[0] for i in indices]

    def gather(self, indices: np.ndarray, fields: Sequence[str],
               alloc: Callable[[tuple[int, ...], str], np.ndarray] = np.empty,
               threads: int = 1, then: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Stored arrays of `fields` for `indices` (any order, no duplicates, all
        available), in the order given. Reads each run of consecutive indices once and
        copies each row once, from the backend straight into arrays made by `alloc`.

        Runs are taken in index order (file order), every field of a run before the next
        run. The process's read-ahead thread asks the kernel for their bytes in that order
        and without the GIL (cache/prefault.py), while this thread locates and checks each
        run and its copies start: with `threads` > 1 on a pool of that many threads (numpy
        releases the GIL in them), else here, run by run. `then`: the indices the caller
        will gather next (the same fields), read ahead in the background once these are,
        so the disk stays busy while these are copied and used; a read-ahead asked for
        indices that are then not the next gathered is dropped."""
        indices = np.asarray(indices, dtype=np.int64)
        for name in fields:
            if self.spec.fields[name].dtype == "str":
                raise ValueError(f"gather() reads numeric fields; use keys() for {name!r}")
        valid = self.valid_indices  # ascending
        at = np.searchsorted(valid, indices).clip(max=max(len(valid) - 1, 0))
        if len(indices) and (not len(valid) or (valid[at] != indices).any()):
            bad = indices if not len(valid) else indices[valid[at] != indices]
            self._check_available(int(bad[0]))  # raises what is wrong with it
            raise IndexError(f"sample {int(bad[0])} is not in this cache")
        out = {name: alloc((len(indices), *self.spec.fields[name].shape),
                           self.spec.fields[name].dtype) for name in fields}
        if len(indices) == 0:
            return out
        order, runs, bounds = _runs(indices)
        reader = self.reader
        stop = threading.Event()
        pool = self._copier_pool(threads) if threads > 1 else None
        # Copies start as runs are checked while this thread waits for reads (chunks or
        # members used for the first time by this reader); else they wait until all runs
        # are located and go in `threads` jobs: each job started early costs the locating
        # thread the GIL, a 20% loss on warm windows
        per_job = max(1, len(runs) // (4 * threads))
        first_reads = reader.first_reads
        jobs, copies = [], []  # copies: per run, those of each field
        key = tuple(fields)
        try:
            asked = self._then.pop(key, None)
            own = []  # (lo, hi, checked early) of the runs to read ahead
            if asked is not None and asked[0] == os.getpid() and \
                    np.array_equal(asked[1], indices):
                stop = asked[2]  # asked for by the gather before: under way
            else:
                if asked is not None:
                    asked[2].set()  # for another plan (a new epoch, a resume): dropped
                own = [(lo, hi, False) for lo, hi in bounds]
            items, ahead_stop = None, stop
            if then is not None and len(then):
                then = np.array(then, dtype=np.int64)
                later = threading.Event()
                try:  # planned by the caller: what is wrong with it is reported when gathered
                    # (a first gather reads its runs and these in one pass in file order: on
                    # a cold cache the reads of one bring in much of the other)
                    items = self._read_ahead_items(
                        sorted(own + [(lo, hi, True) for lo, hi in _runs(then)[2]]), fields)
                    self._then[key], ahead_stop = (os.getpid(), then, later), later
                except (CacheError, OSError, ValueError, IndexError):
                    items = None
            if items is None:
                items = self._read_ahead_items(own, fields)
            if items:
                prefault.read_ahead(items, ahead_stop)
            streaming = False
            for r, ((a, _), (lo, hi)) in enumerate(zip(runs, bounds)):
                copies.append([])
                for name in fields:
                    pos = a
                    for piece in reader.pieces(name, lo, hi):
                        copies[-1].append((out[name], order[pos:pos + len(piece)], piece))
                        pos += len(piece)
                streaming = streaming or reader.first_reads != first_reads
                if pool is None:
                    _copy(copies.pop())
                elif streaming and ((r + 1) % per_job == 0 or r == len(runs) - 1):
                    jobs.append(pool.submit(_copy, [c for run in copies for c in run]))
                    copies = []
            if copies:  # runs dealt round-robin: the threads get alike shares of each field
                jobs += [pool.submit(_copy, [c for run in copies[t::threads] for c in run])
                         for t in range(threads)]
        except BaseException:
            for _, _, later in self._then.values():
                later.set()  # and no read-ahead of what comes next
            self._then.clear()
            raise
        finally:  # no copy still at work once this returns, no read-ahead of these left
            stop.set()
            for job in jobs:
                job.exception()
        for job in jobs:
            job.result()
        return out

    def _read_ahead_items(self, plan: list[tuple[int, int, bool]], fields: Sequence[str]
                          ) -> list:
        """What the read-ahead thread does for the runs [lo, hi) of `plan`, in that order:
        read the bytes of `fields`, then (`early`) check those not checked yet."""
        return self.reader.ahead(fields, plan) if prefault.available() else []

    def _copier_pool(self, threads: int) -> ThreadPoolExecutor:
        """This dataset's pool of `threads` copy threads (made on first use, and anew in
        each process: pools are not pickled, and a forked child inherits no threads)."""
        held = self._copier
        if held is None or held[:2] != (os.getpid(), threads):
            held = self._copier = (os.getpid(), threads, ThreadPoolExecutor(
                threads, thread_name_prefix="urepa-copy"))
        return held[2]

    # --------------------------------------------------------------- verify & stats
    def verify(self, backends: Sequence[str] | None = None,
               num_threads: int | None = None) -> VerifyReport:
        """Check every shard of every backend: a sound done marker written for this
        manifest, files present with the recorded size, SHA-256 and read checksums, every
        field's shape and dtype, no NaN/Inf, the index field and sample counts; then the
        manifest's shard table, failures and latent statistics against the markers.
        Lists every bad shard. Only the files a shard has by construction are opened."""
        backends = list(backends or self.spec.backends)
        problems: list[tuple[str, int | None, str]] = []
        complete = self.manifest.get("status") == "complete"
        if not complete:
            problems.append(("manifest", None, f"status is {self.manifest.get('status')!r}, "
                                               "not 'complete' (finalize was never run)"))
        if "zarr" in backends and self.version >= 2:
            problems += [("zarr", None, p) for p in metadata_problems(
                self.store, self.spec, self.manifest.get("zarr_metadata"))]
        jobs = [(b, k) for b in backends for k in range(self.spec.num_shards)]
        with ThreadPoolExecutor(num_threads or min(8, os.cpu_count() or 1)) as pool:
            results = list(pool.map(lambda job: self._verify_shard(*job), jobs))
        samples = nbytes = 0
        markers: dict[str, list[dict | None]] = {b: [] for b in backends}
        per_backend = {b: (0, 0) for b in backends}
        for (backend, shard), (shard_problems, n, size, marker) in zip(jobs, results):
            problems += [(backend, shard, p) for p in shard_problems]
            samples, nbytes = samples + n, nbytes + size
            markers[backend].append(marker)
            shards_b, samples_b = per_backend[backend]
            per_backend[backend] = (shards_b + 1, samples_b + n)
        if complete:
            problems += [("manifest", None, p) for p in self._cross_check(markers)]
        return VerifyReport(problems, len(jobs), samples, nbytes, per_backend)

    def _cross_check(self, markers: dict[str, list[dict | None]]) -> list[str]:
        """The finalized manifest's shard table, failures and statistics against the done
        markers (those that are sound): a manifest changed since finalize disagrees."""
        m, problems = self.manifest, []
        for backend, found in markers.items():
            if any(mk is None for mk in found):
                continue  # already reported per shard
            table = [{"shard": k, "status": "done", "num_samples": mk["num_samples"],
                      "files": mk["files"]} for k, mk in enumerate(found)]
            if m.get("shards", {}).get(backend) != table:
                problems.append(f"the shard table of {backend} differs from the done "
                                "markers (the manifest was changed after finalize)")
            failures = [f for mk in found for f in mk["failures"]]
            if m.get("failures") != failures:
                problems.append(f"failures differ from the {backend} done markers': manifest "
                                f"{len(m.get('failures', []))}, markers {len(failures)}")
            if backend == self.spec.backends[0]:
                sums = np.sum([np.asarray(mk["latent_sums"]) for mk in found], axis=0)
                stats = latent_channel_stats(sums, m["latent"]["scale"])
                if m["latent"].get("channel_stats") != stats:
                    problems.append("latent.channel_stats differ from the statistics the "
                                    "done markers give")
        return problems

    def _verify_shard(self, backend: str, shard: int
                      ) -> tuple[list[str], int, int, dict | None]:
        """(problems, samples checked, bytes checked, the marker if it is sound)."""
        store = self.store
        marker = read_done_marker(store, backend, shard)
        if marker is None:
            return ["not done (no done marker): rerun the encode job"], 0, 0, None
        problems = check_marker(marker, self.spec, backend, shard, version=self.version,
                                dataset=self.dataset)
        if problems:  # the names are not to be trusted either: read no file
            return problems, 0, 0, None
        nbytes = 0
        for rel in expected_files(self.spec, backend, shard):
            info = marker["files"][rel]
            if not store.is_file(rel):
                problems.append(f"missing file {rel}")
                continue
            size = store.size(rel)
            nbytes += size
            if size != info["bytes"]:
                problems.append(f"{rel}: {size} bytes, expected {info['bytes']} (truncated?)")
                continue
            digest = file_digest(store, rel, backend, self.spec)
            if digest["sha256"] != info["sha256"]:
                problems.append(f"{rel}: checksum mismatch (corrupted)")
            elif "problem" in digest:
                problems.append(f"unreadable: {digest['problem']}")
            elif self.version >= 2 and digest["checksums"] != marker["checksums"][rel]:
                problems.append(f"{rel}: the done marker's read checksums differ from the "
                                "file's (the marker is damaged)")
        if problems:
            return problems, 0, nbytes, None
        try:
            data = READERS[backend](store, self.spec).read_shard(shard)
        except Exception as e:  # report any decode failure as this shard's problem
            return [f"unreadable: {type(e).__name__}: {e}"], 0, nbytes, None
        start, stop = self.spec.shard_range(shard)
        failed = {f["index"] for f in marker["failures"]}
        if backend == "wds":
            want_index = np.array([i for i in range(start, stop) if i not in failed])
        else:
            want_index = np.arange(start, stop)
        n = len(want_index)
        if not np.array_equal(data.get(INDEX), want_index):
            problems.append(f"sample indices do not match the shard range [{start}, {stop})")
        for name, f in self.spec.fields.items():
            a = data.get(name)
            if a is None:
                problems.append(f"field {name!r} missing")
                continue
            if name == KEY:
                if len(a) != n:
                    problems.append(f"key: {len(a)} entries, expected {n}")
                continue
            if a.shape != (n, *f.shape) or a.dtype != np.dtype(f.dtype):
                problems.append(f"{name}: {a.dtype}{list(a.shape)}, expected "
                                f"{f.dtype}{[n, *f.shape]}")
            elif a.dtype.kind == "f" and not np.isfinite(a).all():
                bad = np.flatnonzero(~np.isfinite(a.reshape(n, -1)).all(1))
                problems.append(f"{name}: NaN/Inf in samples {(want_index[bad]).tolist()[:10]}")
        return problems, n, nbytes, (None if problems else marker)

    def stats(self) -> dict[str, Any]:
        """Counts, sizes, latent channel statistics and the label distribution."""
        spec = self.spec
        labels = self.gather(self.valid_indices, [LABEL])[LABEL] if self.num_valid else []
        counts = np.bincount(labels) if len(labels) else np.zeros(0, int)
        present = counts[counts > 0]
        # backend directories are named after the backends (zarr/, wds/)
        disk = {b: self.store.du(b) for b in spec.backends}
        return {
            "path": self.root,
            "status": self.manifest.get("status"),
            "num_samples": spec.num_samples,
            "num_valid": self.num_valid,
            "num_failed": len(self.failures),
            "num_shards": spec.num_shards,
            "shard_size": spec.shard_size,
            "backends": list(spec.backends),
            "bytes_per_sample": {n: f.nbytes for n, f in spec.fields.items() if f.nbytes},
            "bytes_on_disk": disk,
            "latent_channel_stats": self.manifest.get("latent", {}).get("channel_stats"),
            "labels": {"classes_present": int(len(present)),
                       "min_per_class": int(present.min()) if len(present) else 0,
                       "max_per_class": int(present.max()) if len(present) else 0},
        }

