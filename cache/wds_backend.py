"""webdataset backend: one uncompressed tar per shard, readable by plain `webdataset`.

Each sample is keyed by its global index (`%09d`) and has the members

    <key>.moments.npy  <key>.tokens.npy  [<key>.tokens_scale.npy]  <key>.cls.npy
    [<key>.attn_qk.npy  [<key>.attn_qk_scale.npy]]   (with --teacher-attn)
    <key>.label.cls (class index as text, webdataset's convention)  <key>.key.txt

so `wds.WebDataset(url).decode()` yields numpy arrays and an int label. Samples that failed
at encode time are left out of the tar (plain webdataset users never see a placeholder);
the manifest lists them.

Our reader does random access without unpacking: the stdlib `tarfile` gives each member's
data offset, the tar is memory-mapped and each `.npy` payload is viewed in place. A tar on
a remote store is first fetched whole into a private temporary folder, the first time one
of its samples is read, and dropped again when more than `remote_shards` are held: as in
webdataset's own streaming, a shard is the unit of transfer, so train from a remote wds
cache with `data.block_size` = the shard size (shard shuffle plus the shuffle buffer).
"""

from __future__ import annotations

import io
import mmap
import os
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator

import google_crc32c
import numpy as np
import webdataset as wds

from .format import INDEX, KEY, LABEL, CacheSpec, DamagedCacheError
from .store import ShardFiles, Store
from .tensors import read_npy_header

DIR = "wds"
_EXT = {"label": "label.cls", "key": "key.txt"}  # every other field: "<name>.npy"


def member_ext(name: str) -> str:
    return _EXT.get(name, f"{name}.npy")


def shard_file(shard: int) -> str:
    """A shard's tar, relative to the cache root."""
    return f"{DIR}/shard-{shard:06d}.tar"


class WdsWriter:
    name = "wds"

    def __init__(self, store: Store, spec: CacheSpec):
        self.store, self.spec = Store.of(store), spec

    def create(self) -> None:
        self.store.makedirs(DIR)

    def write_shard(self, shard: int, arrays: dict[str, np.ndarray],
                    failed: set[int] = frozenset()) -> list[str]:
        """Write a shard's tar atomically (Store.writer). `failed` holds the local offsets
        of samples to leave out. Returns the file written, relative to the cache root."""
        start, stop = self.spec.shard_range(shard)
        rel = shard_file(shard)
        self.store.remove_stale_tmp(rel)
        fields = [n for n in self.spec.fields if n != INDEX]
        with self.store.writer(rel) as f:
            # mtime fixed: the same inputs give a byte-identical tar
            with wds.TarWriter(f, mtime=0.0, user="urepa", group="urepa") as sink:
                for i in range(stop - start):
                    if i in failed:
                        continue
                    sample = {"__key__": f"{start + i:09d}"}
                    for name in fields:
                        value = arrays[name][i]
                        if name == LABEL:
                            value = str(int(value))
                        elif name == KEY:
                            value = str(value)
                        sample[member_ext(name)] = value
                    sink.write(sample)
        return [rel]


class _MappedTar:
    """A tar mapped into memory, indexed by member: `keys` are the samples' global indices
    in tar order and offsets[ext] / sizes[ext] the data offset and size of each sample's
    member with that extension."""

    def __init__(self, path: Path, rel: str):
        self.rel = rel
        rows: dict[int, dict[str, tuple[int, int]]] = {}
        try:
            with tarfile.open(path, "r:") as tf:
                for m in tf:
                    if m.isfile():
                        stem, _, ext = m.name.partition(".")
                        if not stem.isdigit() or len(stem) > 12:
                            raise ValueError(f"member name {m.name[:40]!r} is not "
                                             "<index>.<field>")
                        rows.setdefault(int(stem), {})[ext] = (m.offset_data, m.size)
        except (tarfile.TarError, OSError, ValueError, UnicodeDecodeError) as e:
            raise DamagedCacheError(f"{rel}: unreadable tar ({e}); run `pipeline verify` "
                                    "on the cache") from None
        self.keys = np.fromiter(rows, dtype=np.int64, count=len(rows))
        exts = {e for r in rows.values() for e in r}
        self.offsets = {e: np.array([r.get(e, (-1, 0))[0] for r in rows.values()], np.int64)
                        for e in exts}
        self.sizes = {e: np.array([r.get(e, (-1, 0))[1] for r in rows.values()], np.int64)
                      for e in exts}
        with open(path, "rb") as f:
            self.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def locate(self, start: int, stop: int, ext: str) -> tuple[int, np.ndarray, np.ndarray]:
        """Row of sample `start`, and the offsets and sizes of `ext` for samples
        start..stop-1 (all must be present)."""
        p = int(np.searchsorted(self.keys, start))
        n = stop - start
        if p + n > len(self.keys) or self.keys[p] != start or self.keys[p + n - 1] != stop - 1:
            missing = sorted(set(range(start, stop)) - set(self.keys.tolist()))
            raise DamagedCacheError(f"{self.rel}: samples {missing[:10]} are not in this tar "
                                    "(damaged, or a tar from another shard)")
        if ext not in self.offsets or (self.offsets[ext][p:p + n] < 0).any():
            raise DamagedCacheError(f"{self.rel}: a sample in [{start}, {stop}) lacks its "
                                    f".{ext} member")
        return p, self.offsets[ext][p:p + n], self.sizes[ext][p:p + n]

    def checksums(self) -> dict[str, list[int | None]]:
        """CRC32C of every member's bytes, per extension, in row order (None: absent)."""
        data = np.frombuffer(self.buf, np.uint8)
        return {ext: [None if o < 0 else google_crc32c.value(data[o:o + s])
                      for o, s in zip(self.offsets[ext].tolist(), self.sizes[ext].tolist())]
                for ext in sorted(self.offsets)}


def member_checksums(path: Path, rel: str) -> dict[str, list[int | None]]:
    """What a done marker records for a tar: each member's CRC32C, per extension."""
    return _MappedTar(path, rel).checksums()


class WdsReader:
    name = "wds"

    def __init__(self, store: Store, spec: CacheSpec, max_open_shards: int = 512,
                 remote_shards: int | None = None,
                 checksums: Callable[[int], dict[str, Any]] | None = None):
        """`checksums(shard)`: the shard's recorded checksums (its done marker's), which
        every member read is checked against; None reads unchecked (format v1 caches)."""
        self.store, self.spec = Store.of(store), spec
        self._checksums = checksums
        self._expected: dict[int, dict[str, list]] = {}
        # members already checked, per (shard, extension): each is checked once per
        # reader, as ZarrReader checks each chunk once
        self._checked: dict[tuple[int, str], np.ndarray] = {}
        self._tars: dict[int, _MappedTar] = {}
        self._max_open = max_open_shards
        self._fetched: ShardFiles | None = None
        if self.store.local_path() is None:  # remote: tars held as local copies
            self._fetched = ShardFiles(self.store)
            self._max_open = remote_shards or int(os.environ.get("UREPA_REMOTE_SHARDS", 4))
        self._headers: dict[bytes, tuple[int, np.dtype, tuple[int, ...]]] = {}

    def _tar(self, shard: int) -> _MappedTar:
        t = self._tars.get(shard)
        if t is None:
            if len(self._tars) >= self._max_open:
                old = next(iter(self._tars))
                del self._tars[old]
                if self._fetched:
                    self._fetched.drop(shard_file(old))
            rel = shard_file(shard)
            path = self._fetched.get(rel) if self._fetched else self.store.local_path(rel)
            t = _MappedTar(path, rel)
            if self._checksums is not None:
                want = self._checksums(shard).get(rel)
                if not (isinstance(want, dict) and all(
                        isinstance(v, list) and len(v) == len(t.keys) for v in want.values())):
                    raise DamagedCacheError(f"{rel}: its members do not match the checksums "
                                            "its done marker records; run `pipeline verify` "
                                            "on the cache")
                self._expected[shard] = want
            self._tars[shard] = t  # only once its checksums are in hand
        return t

    def _check(self, tar: _MappedTar, shard: int, ext: str, row: int, offs: np.ndarray,
               sizes: np.ndarray) -> None:
        """Raise DamagedCacheError unless each member's bytes match their recorded CRC32C."""
        if self._checksums is None:
            return
        want = self._expected[shard].get(ext)
        checked = self._checked.setdefault((shard, ext), np.zeros(len(tar.keys), bool))
        if checked[row:row + len(offs)].all():
            return
        data = np.frombuffer(tar.buf, np.uint8)
        for j, (o, s) in enumerate(zip(offs.tolist(), sizes.tolist())):
            if want is None or google_crc32c.value(data[o:o + s]) != want[row + j]:
                raise DamagedCacheError(
                    f"{tar.rel}: member {tar.keys[row + j]:09d}.{ext} fails its checksum "
                    "(damaged, or a tar from another place); run `pipeline verify` on the "
                    "cache")
        checked[row:row + len(offs)] = True

    def _npy_layout(self, buf: mmap.mmap, offset: int, size: int
                    ) -> tuple[int, np.dtype, tuple[int, ...]]:
        """(payload offset, dtype, shape) of an .npy member; parsed by numpy once per layout."""
        head = bytes(buf[offset:offset + 128])
        hit = self._headers.get(head)
        if hit is None:
            f = io.BytesIO(bytes(buf[offset:offset + min(size, 4096)]))
            shape, fortran, dtype = read_npy_header(f)
            if fortran:
                raise ValueError("fortran-ordered .npy members are not written by this cache")
            hit = self._headers[head] = (f.tell(), dtype, shape)
        return hit

    def pieces(self, name: str, start: int, stop: int) -> Iterator[np.ndarray]:
        """Rows [start, stop) of field `name`. Members of consecutive samples written by
        this cache sit at a fixed stride in the tar, so a run within one shard is a single
        strided view of the mapped file; otherwise one view per sample."""
        S = self.spec.shard_size
        while start < stop:
            end = min(stop, (start // S + 1) * S)
            yield from self._shard_pieces(name, start, end)
            start = end

    def _shard_pieces(self, name: str, start: int, stop: int) -> Iterator[np.ndarray]:
        if name == INDEX:
            yield np.arange(start, stop, dtype=np.int64)
            return
        shard = start // self.spec.shard_size
        tar = self._tar(shard)
        row, offs, sizes = tar.locate(start, stop, member_ext(name))
        self._check(tar, shard, member_ext(name), row, offs, sizes)
        if name == LABEL:
            yield np.array([int(bytes(tar.buf[o:o + s])) for o, s in zip(offs, sizes)],
                           dtype=np.int64)
            return
        data_off, dtype, shape = self._npy_layout(tar.buf, int(offs[0]), int(sizes[0]))
        f = self.spec.fields[name]
        if shape != f.shape or dtype != np.dtype(f.dtype) or data_off + f.nbytes > sizes[0]:
            raise DamagedCacheError(f"{tar.rel}: member {start:09d}.{member_ext(name)} "
                                    f"holds {dtype}{list(shape)}, expected "
                                    f"{f.dtype}{list(f.shape)}")
        row_strides = np.empty(shape, dtype).strides
        stride = np.diff(offs)
        if (sizes == sizes[0]).all() and (len(offs) == 1 or (stride == stride[0]).all()):
            yield np.ndarray((len(offs), *shape), dtype=dtype, buffer=tar.buf,
                             offset=int(offs[0]) + data_off,
                             strides=(int(stride[0]) if len(stride) else 0, *row_strides))
            return
        for o, s in zip(offs, sizes):  # irregular layout (a tar written by other tools)
            d, dt, sh = self._npy_layout(tar.buf, int(o), int(s))
            if sh != f.shape or dt != np.dtype(f.dtype) or d + f.nbytes > s:
                raise DamagedCacheError(f"{tar.rel}: a .{member_ext(name)} member holds "
                                        f"{dt}{list(sh)}, expected {f.dtype}{list(f.shape)}")
            yield np.ndarray((1, *sh), dtype=dt, buffer=tar.buf, offset=int(o) + d)

    def read_keys(self, start: int, stop: int) -> list[str]:
        out, S = [], self.spec.shard_size
        while start < stop:
            end = min(stop, (start // S + 1) * S)
            tar = self._tar(start // S)
            row, offs, sizes = tar.locate(start, end, member_ext(KEY))
            self._check(tar, start // S, member_ext(KEY), row, offs, sizes)
            out += [bytes(tar.buf[o:o + s]).decode() for o, s in zip(offs, sizes)]
            start = end
        return out

    def read_shard(self, shard: int) -> dict[str, np.ndarray]:
        """Every field of a shard's present samples via plain `tarfile` + `np.load` (the
        reference reader used by verify); `index` comes from the member keys."""
        ext_to_field = {member_ext(n): n for n in self.spec.fields if n != INDEX}
        samples: dict[int, dict] = {}
        with self.store.open(shard_file(shard)) as raw, tarfile.open(fileobj=raw, mode="r:") as tf:
            for m in tf:
                stem, _, ext = m.name.partition(".")
                field = ext_to_field.get(ext)
                if field is None:
                    raise ValueError(f"unexpected tar member {m.name!r}")
                data = tf.extractfile(m).read()
                if ext.endswith(".npy"):
                    value = np.load(io.BytesIO(data), allow_pickle=False)
                else:
                    value = int(data) if field == LABEL else data.decode()
                samples.setdefault(int(stem), {})[field] = value
        indices = sorted(samples)
        out = {INDEX: np.asarray(indices, dtype=np.int64)}
        for field in ext_to_field.values():
            try:
                values = [samples[i][field] for i in indices]
            except KeyError:
                raise ValueError(f"a sample lacks its {member_ext(field)} member") from None
            f = self.spec.fields[field]
            # a shard whose samples all failed is an empty tar: keep the declared layout
            out[field] = (np.asarray(values) if values else
                          np.empty((0, *f.shape), object if f.dtype == "str" else f.dtype))
        return out
