"""GMem's memory bank: the CLS token of every valid training sample, as a file or read
straight from the cache (`pipeline bank CACHE OUT` writes the file; `train sample --bank`
reads either).

    bank row r  <->  the cache's r-th valid sample (CacheDataset.valid_indices[r]), view 0
                     (the unflipped image: GMem's bank holds no flipped copies)

The file is a plain safetensors file (no pickle), written in one pass without holding the
column in memory (ImageNet: 1,281,167 x 768 fp16 = 1.97 GB):

    "label"  int64   [N]      the samples' class labels (train sample's arr_1)
    "index"  int64   [N]      the samples' cache indices, strictly increasing
    "cls"    float16 [N, D]   the CLS tokens as the cache stores them (not normalised)
    metadata  format "urepa-gmem-bank", format_version "1", cache_manifest_sha256,
              cache_dataset_sha256, cache_root, view "0", rows N, dim D

A bank file is input from disk: its header is parsed here (not by the safetensors
library, which does not expose the byte offsets that random rows are read through by a
memory map) and every size, offset, dtype and shape is checked against the file's size
before a byte of data is used; then the labels and indices are checked, and the CLS
rows for finiteness. Any problem is one BankError line naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .format import CLS, LABEL, CacheError, atomic_file, manifest_sha256
from .reader import CacheDataset, open_cache
from .store import is_url, open_regular

BANK_FORMAT = "urepa-gmem-bank"
BANK_VERSION = "1"
MAX_HEADER_BYTES = 1 << 20          # a bank's header is ~500 bytes
MAX_DIM = 1 << 16                   # DINOv2-g is 1536-d
_DTYPES = {"cls": ("F16", np.float16, 2), "label": ("I64", np.int64, 1),
           "index": ("I64", np.int64, 1)}
_SHA_CHUNK = 16 << 20


class BankError(CacheError):
    """A bank that cannot be written or read; the message is one line."""


class Bank:
    """N rows of D-dim CLS tokens with their labels. `cls(rows)` and `labels(rows)` take
    any row numbers in [0, N) (repeats allowed) and return them in that order."""
    path: str                       # absolute path (or URL) of the file or cache
    kind: str                       # "file" or "cache"
    rows: int
    dim: int
    sha256: str                     # the file's SHA-256, or the cache manifest's

    def identity(self) -> dict[str, Any]:
        """What fixes the bank's content (sample.json records it; a rerun must agree)."""
        return {"path": self.path, "kind": self.kind, "sha256": self.sha256,
                "rows": self.rows, "dim": self.dim}

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise BankError(f"bank {self.path}: row numbers must be 1-D, got {rows.shape}")
        if len(rows) and (rows.min() < 0 or rows.max() >= self.rows):
            raise BankError(f"bank {self.path}: row {int(rows.max())} out of range "
                            f"[0, {self.rows})")
        return rows

    def cls(self, rows: np.ndarray) -> np.ndarray:
        """float16 [n, D]."""
        raise NotImplementedError

    def labels(self, rows: np.ndarray) -> np.ndarray:
        """int64 [n]."""
        raise NotImplementedError


# ------------------------------------------------------------------ the file
class FileBank(Bank):
    kind = "file"

    def __init__(self, path: str | os.PathLike):
        self.path = str(Path(path).absolute())
        where = f"bank file {self.path}"
        p = Path(self.path).resolve()   # a link the user names is followed, once, here
        try:
            f = open_regular(p)
        except OSError as e:
            raise BankError(f"{where}: cannot open ({e.strerror or e}); pass a file written "
                            "by `pipeline bank CACHE OUT`, or a cache directory") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            header, data_start = _read_header(f, size, where)
            self.metadata = _check_metadata(header.pop("__metadata__", None), where)
            spans = _check_entries(header, size - data_start, where)
            self.sha256 = _file_sha256(f)

            def array(name: str) -> np.ndarray:   # maps the file opened above (mmap dups
                begin, _end, shape = spans[name]  # its descriptor: it outlives the `with`)
                return np.memmap(f, dtype=np.dtype(_DTYPES[name][1]).newbyteorder("<"),
                                 mode="r", offset=data_start + begin, shape=tuple(shape))
            self._cls = array("cls")
            self._labels = np.array(array("label"), dtype=np.int64)   # ~10 MB for ImageNet
            index = np.array(array("index"), dtype=np.int64)
        n, d = spans["cls"][2]
        self.rows, self.dim = n, d
        meta_rows, meta_dim = self.metadata.get("rows"), self.metadata.get("dim")
        if meta_rows != str(n) or meta_dim != str(d):
            raise BankError(f"{where}: metadata says rows={meta_rows} dim={meta_dim}, the "
                            f"tensors are [{n}, {d}]: the file is damaged; write it again")
        if self._labels.min() < 0:
            raise BankError(f"{where}: negative class label {int(self._labels.min())}: the "
                            "file is damaged; write it again")
        if index.min() < 0 or (n > 1 and not (np.diff(index) > 0).all()):
            raise BankError(f"{where}: \"index\" is not strictly increasing non-negative "
                            "cache indices: the file is damaged; write it again")
        step = max(1, (64 << 20) // (2 * d))              # 64 MB of rows at a time
        for a in range(0, n, step):
            if not np.isfinite(self._cls[a:a + step]).all():
                raise BankError(f"{where}: NaN or Inf in the CLS rows from row {a}: the file "
                                "is damaged; write it again")
        self.cache_manifest_sha256 = self.metadata["cache_manifest_sha256"]

    def cls(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self._cls[self._rows(rows)])

    def labels(self, rows: np.ndarray) -> np.ndarray:
        return self._labels[self._rows(rows)]


def _read_header(f, size: int, where: str) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and where its data starts."""
    if size < 8:
        raise BankError(f"{where}: {size} bytes, not a safetensors file (truncated?); "
                        "write it again with `pipeline bank`")
    (length,) = struct.unpack("<Q", f.read(8))
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise BankError(f"{where}: header length {length} does not fit the file's {size} "
                        f"bytes (limit {MAX_HEADER_BYTES}): not a bank file, or truncated")
    try:
        header = json.loads(f.read(length))
    except (ValueError, RecursionError) as e:    # JSON, UTF-8
        raise BankError(f"{where}: unreadable header ({str(e)[:100]}): not a bank file"
                        ) from None
    if not isinstance(header, dict):
        raise BankError(f"{where}: the header is not a JSON object: not a bank file")
    return header, 8 + length


def _check_metadata(meta: Any, where: str) -> dict[str, str]:
    if not (isinstance(meta, dict) and meta.get("format") == BANK_FORMAT):
        raise BankError(f"{where}: no \"{BANK_FORMAT}\" metadata: not a file of `pipeline "
                        "bank` (pass one, or a cache directory)")
    if meta.get("format_version") != BANK_VERSION:
        raise BankError(f"{where}: bank format version {str(meta.get('format_version'))[:20]!r}"
                        f", this code reads {BANK_VERSION!r}: write it again with this "
                        "version's `pipeline bank`")
    digest = meta.get("cache_manifest_sha256")
    if not (isinstance(digest, str) and len(digest) == 64
            and all(c in "0123456789abcdef" for c in digest)):
        raise BankError(f"{where}: metadata cache_manifest_sha256 is not a SHA-256: damaged")
    return meta


def _check_entries(header: dict[str, Any], data_size: int, where: str
                   ) -> dict[str, tuple[int, int, list[int]]]:
    """Each tensor's (begin, end, shape), checked: exactly cls, label, index with their
    dtypes, shapes [N, D], [N], [N] (N >= 1, 1 <= D <= MAX_DIM), and byte ranges that tile
    the data area exactly."""
    if set(header) != set(_DTYPES):
        raise BankError(f"{where}: tensors {sorted(header)[:8]}, expected {sorted(_DTYPES)}: "
                        "not a bank file")
    spans = {}
    for name, (dtype, _np, rank) in _DTYPES.items():
        e = header[name]
        ok = (isinstance(e, dict) and e.get("dtype") == dtype
              and isinstance(e.get("shape"), list) and len(e["shape"]) == rank
              and all(type(s) is int and s >= 1 for s in e["shape"])
              and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
              and all(type(o) is int for o in e["data_offsets"]))
        if not ok:
            shown = json.dumps(e)[:120] if isinstance(e, dict) else type(e).__name__
            raise BankError(f"{where}: tensor {name!r} is {shown}, expected {dtype} of rank "
                            f"{rank}: not a bank file, or damaged")
        spans[name] = (*e["data_offsets"], e["shape"])
    n, d = spans["cls"][2]
    if spans["label"][2] != [n] or spans["index"][2] != [n]:
        raise BankError(f"{where}: cls {spans['cls'][2]}, label {spans['label'][2]}, index "
                        f"{spans['index'][2]}: the row counts differ; damaged")
    if d > MAX_DIM:
        raise BankError(f"{where}: CLS width {d} above {MAX_DIM}: damaged")
    for name, (begin, end, shape) in spans.items():
        nbytes = math.prod(shape) * np.dtype(_DTYPES[name][1]).itemsize
        if not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise BankError(f"{where}: tensor {name!r} {shape} ({nbytes} bytes) at bytes "
                            f"[{begin}, {end}) of a {data_size}-byte data area: the file is "
                            "truncated or damaged; write it again")
    ranges = sorted((b, e) for b, e, _ in spans.values())
    tiled = ranges[0][0] == 0 and ranges[-1][1] == data_size and all(
        a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    if not tiled:
        raise BankError(f"{where}: the tensors do not tile the {data_size}-byte data area "
                        "(truncated, or bytes appended): write it again")
    return spans


def _file_sha256(f) -> str:
    f.seek(0)
    h = hashlib.sha256()
    while chunk := f.read(_SHA_CHUNK):
        h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------ the cache
class CacheBank(Bank):
    """The `cls` column of a cache, read row by row (CacheDataset.gather, view 0)."""
    kind = "cache"

    def __init__(self, path: str | os.PathLike):
        self.ds: CacheDataset = open_cache(path)
        self.path = self.ds.root if is_url(self.ds.root) else str(Path(self.ds.root).absolute())
        f = self.ds.spec.fields.get(CLS)
        if f is None:
            raise BankError(f"cache {self.path} stores no {CLS!r} field: GMem's bank needs "
                            "the teacher's CLS tokens")
        self.rows, self.dim = self.ds.num_valid, int(f.shape[-1])
        if self.rows == 0:
            raise BankError(f"cache {self.path} has no valid sample: an empty bank")
        m = self.ds.manifest
        self.sha256 = m.get("sha256") or manifest_sha256(m)

    def _read(self, rows: np.ndarray, field: str) -> np.ndarray:
        uniq, inverse = np.unique(self._rows(rows), return_inverse=True)
        out = self.ds.gather(self.ds.valid_indices[uniq], [field])[field]
        return out[:, 0][inverse] if field == CLS else out[inverse]

    def cls(self, rows: np.ndarray) -> np.ndarray:
        return self._read(rows, CLS).astype(np.float16, copy=False)

    def labels(self, rows: np.ndarray) -> np.ndarray:
        return self._read(rows, LABEL).astype(np.int64, copy=False)


def open_bank(path: str | os.PathLike) -> Bank:
    """A bank file of `pipeline bank`, or a cache (a directory or a URL). Raises
    BankError, or the cache's own CacheError, with one line."""
    p = str(path)
    if is_url(p) or Path(p).is_dir():
        return CacheBank(p)
    if not Path(p).exists():
        raise BankError(f"bank {p}: no such file or directory; pass a file written by "
                        "`pipeline bank CACHE OUT`, or a cache directory")
    return FileBank(p)


# ------------------------------------------------------------------ writing
def write_bank(cache: str | os.PathLike, out: str | os.PathLike, *, chunk: int = 65536,
               log: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Write the bank of `cache` (every valid sample's CLS token, view 0, in valid-sample
    order) to the safetensors file `out`, atomically, reading `chunk` rows at a time.
    Returns a summary. Raises CacheError (BankError for a bad `out`)."""
    out = Path(out)
    if out.is_dir():
        raise BankError(f"{out} is a directory: name the bank file to write, e.g. "
                        f"{out / 'bank.safetensors'}")
    ds = open_cache(cache)
    f = ds.spec.fields.get(CLS)
    if f is None:
        raise BankError(f"cache {ds.root} stores no {CLS!r} field: nothing to bank")
    n, d = ds.num_valid, int(f.shape[-1])
    if n == 0:
        raise BankError(f"cache {ds.root} has no valid sample: nothing to bank")
    m = ds.manifest
    meta = {"format": BANK_FORMAT, "format_version": BANK_VERSION,
            "cache_manifest_sha256": m.get("sha256") or manifest_sha256(m),
            "cache_dataset_sha256": ds.dataset, "cache_root": str(ds.root), "view": "0",
            "rows": str(n), "dim": str(d)}
    sizes = {"label": 8 * n, "index": 8 * n, "cls": 2 * n * d}   # the order of the data
    header, at = {"__metadata__": meta}, 0
    for name in ("label", "index", "cls"):
        shape = [n, d] if name == "cls" else [n]
        header[name] = {"dtype": _DTYPES[name][0], "shape": shape,
                        "data_offsets": [at, at + sizes[name]]}
        at += sizes[name]
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)                       # data starts 8-byte aligned
    valid = ds.valid_indices
    try:
        with atomic_file(out) as fh:
            fh.write(struct.pack("<Q", len(head)) + head)
            labels = [ds.gather(valid[a:a + chunk], [LABEL])[LABEL].astype("<i8")
                      for a in range(0, n, chunk)]
            fh.write(np.concatenate(labels).tobytes())
            fh.write(valid.astype("<i8").tobytes())
            for a in range(0, n, chunk):
                rows = ds.gather(valid[a:a + chunk], [CLS])[CLS][:, 0]
                fh.write(np.ascontiguousarray(rows, dtype="<f2").tobytes())
                log(f"{min(a + chunk, n):,}/{n:,} rows")
    except OSError as e:
        raise BankError(f"cannot write {out}: {e.strerror or e}") from None
    return {"out": str(out), "rows": n, "dim": d, "bytes": out.stat().st_size,
            "cache": str(ds.root), "cache_manifest_sha256": meta["cache_manifest_sha256"]}
