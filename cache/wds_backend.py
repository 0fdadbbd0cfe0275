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

import functools
import io
import mmap
import os
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import google_crc32c
import numpy as np
import webdataset as wds

from .format import INDEX, KEY, LABEL, CacheSpec, DamagedCacheError
from .prefault import Mapping, Span, merged, populate
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


_BLOCK = 512  # tar block


def _walk_members(path: Path, stop_after_keys: int | None = None
                  ) -> dict[int, dict[str, tuple[int, int, int]]]:
    """{key: {ext: (header offset, data offset, size)}} of the regular files in the tar,
    in tar order, through the stdlib's tarfile (every header read and checked). With
    `stop_after_keys`, stops at the first member of key number stop_after_keys + 1."""
    rows: dict[int, dict[str, tuple[int, int, int]]] = {}
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            stem, _, ext = m.name.partition(".")
            if not stem.isdigit() or len(stem) > 12:
                raise ValueError(f"member name {m.name[:40]!r} is not <index>.<field>")
            key = int(stem)
            if stop_after_keys is not None and key not in rows \
                    and len(rows) == stop_after_keys:
                rows[key] = {ext: (m.offset, m.offset_data, m.size)}
                break
            rows.setdefault(key, {})[ext] = (m.offset, m.offset_data, m.size)
    return rows


_POWERS = {base: base ** np.arange(11, -1, -1, dtype=np.int64) for base in (8, 10)}


def _digits(fields: np.ndarray, base: int) -> np.ndarray | None:
    """Values of the [n, w] ASCII digit fields in `base` (8 or 10), or None if a byte is
    not such a digit."""
    d = fields - np.uint8(48)  # uint8: bytes below '0' wrap round to large values
    if (d >= base).any():
        return None
    return d.astype(np.int64) @ _POWERS[base][12 - fields.shape[1]:]


def _octal(fields: np.ndarray, digits: int) -> np.ndarray | None:
    """Values of tar number fields [n, w] written as `digits` octal digits then NUL (as
    Python's tarfile writes them), or None if any field is not of that form."""
    if fields[:, digits].any():
        return None
    return _digits(fields[:, :digits], 8)


def _row_strides(shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, ...]:
    """C-order strides of one row of `shape`."""
    sizes = np.cumprod((1, *shape[:0:-1]), dtype=np.int64)[::-1] if shape else ()
    return tuple(int(n) * dtype.itemsize for n in sizes)


class _MappedTar:
    """A tar mapped into memory, indexed by member: `keys` are the samples' global indices
    in tar order and offsets[ext] / sizes[ext] the data offset and size of each sample's
    member with that extension.

    A tar whose samples repeat the first sample's layout at a fixed stride (every tar
    this cache writes) is indexed from its first two samples (read with tarfile), its
    last one and its end, without reading the ~6 headers per sample in between: on a
    cold disk those are one random read each, longer than reading the whole tar. Each
    member's header is then checked when its data is first located (its name and key,
    size, checksum and every other byte against the first sample's; the header sits next
    to the data, so this costs no extra read). If one does not fit, or the keys have
    gaps (samples that failed), the tar is indexed by a walk through every member."""

    def __init__(self, path: Path, rel: str):
        self.rel, self.path = rel, path
        try:
            with open(path, "rb") as f:
                self.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # missing, or empty (mmap refuses 0 bytes)
            raise DamagedCacheError(f"{rel}: unreadable tar ({e}); run `pipeline verify` "
                                    "on the cache") from None
        self.views: dict[str, tuple | None] = {}  # by WdsReader._rows
        self.npy_unchecked: dict[str, np.ndarray] = {}  # by WdsReader._same_npy
        self._mapping: Mapping | None = None
        self._unchecked: dict[str, np.ndarray] = {}  # rows whose header is yet to be checked
        if not self._index_by_stride():
            self._index_by_walk()

    @property
    def mapping(self) -> Mapping:
        """The mapped bytes as `prefault` sees them (made on first use)."""
        if self._mapping is None:
            self._mapping = Mapping(self.buf)
        return self._mapping

    def _index_by_walk(self) -> None:
        try:
            rows = _walk_members(self.path)
        except (tarfile.TarError, OSError, ValueError, UnicodeDecodeError) as e:
            raise DamagedCacheError(f"{self.rel}: unreadable tar ({e}); run `pipeline "
                                    "verify` on the cache") from None
        self.keys = np.fromiter(rows, dtype=np.int64, count=len(rows))
        if (np.diff(self.keys) <= 0).any():  # rows are found by binary search on the keys
            raise DamagedCacheError(f"{self.rel}: its samples are not in increasing order "
                                    "(not a tar this cache wrote); run `pipeline verify` on "
                                    "the cache")
        exts = {e for r in rows.values() for e in r}
        self.offsets = {e: np.array([r.get(e, (-1, -1, 0))[1] for r in rows.values()],
                                    np.int64) for e in exts}
        self.sizes = {e: np.array([r.get(e, (-1, -1, 0))[2] for r in rows.values()],
                                  np.int64) for e in exts}
        self.views.clear()
        self.npy_unchecked.clear()
        self._unchecked = {}

    def _index_by_stride(self) -> bool:
        try:
            first = _walk_members(self.path, stop_after_keys=1)
        except (tarfile.TarError, OSError, ValueError, UnicodeDecodeError):
            return False
        if len(first) != 2:
            return False
        members, second = first.values()
        base = min(h for h, _, _ in members.values())
        stride = min(h for h, _, _ in second.values()) - base
        n = (len(self.buf) - base) // stride if stride > 0 else 0
        if n < 2 or any(self.buf[base + n * stride:].rstrip(b"\0")):  # end: zero blocks
            return False
        order = sorted(members.items(), key=lambda kv: kv[1][0])
        at = order[0][1][1] - _BLOCK
        name = self.buf[at:at + 13]
        if b"." not in name:
            return False
        self._digits = name.index(b".")  # the key's width in member names (9: %09d)
        self._stride, self._whole = stride, np.frombuffer(self.buf, np.uint8)
        self._refs: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
        ends = [h for _, (h, _, _) in order[1:]] + [base + stride]
        self._layout = {ext: (head, data, end) for (ext, (head, data, _)), end in zip(order, ends)}
        rows = np.arange(n, dtype=np.int64)
        self.offsets = {ext: data + stride * rows for ext, (_, data, _) in self._layout.items()}
        self.sizes = {ext: np.full(n, size, np.int64) for ext, (_, _, size) in members.items()}
        self.keys = np.zeros(n, np.int64)
        self._unchecked = {ext: np.ones(n, bool) for ext in self._layout}
        ends = [self._headers(order[0][0], r) for r in (0, n - 1)]
        if any(k is None for k in ends):
            return False
        if int(ends[1][0]) - int(ends[0][0]) + 1 == n:  # no gaps: every key follows
            self.keys = int(ends[0][0]) + rows
            return all(self.check(ext, r, r + 1) for ext in self._layout for r in (0, 1, n - 1))
        # gaps (failed samples): read every header now, their keys place the rows
        keys = [self._headers(ext, slice(0, n)) for ext in self._layout]
        if any(k is None or (k != keys[0]).any() for k in keys) or (np.diff(keys[0]) <= 0).any():
            return False
        self.keys = keys[0]
        self._unchecked = {}
        return True

    def _headers(self, ext: str, rows: int | slice) -> np.ndarray | None:
        """Check the headers of member `ext` in `rows` against the first sample's (read by
        tarfile) and record their sizes; their keys, or None if one does not fit."""
        head, data, end = self._layout[ext]
        lo, hi = (rows, rows + 1) if isinstance(rows, int) else (rows.start, rows.stop)
        ref = self._refs.get(ext)
        if ref is None:  # the first sample's pax records and ustar block, and which of
            # their bytes every member shares: all but the key digits, size and checksum
            u, d = data - _BLOCK - head, self._digits  # the ustar block in [head, data)
            fixed = np.ones(data - head, bool)
            for a, b in ((0, d), (124, 136), (148, 156)):
                fixed[u + a:u + b] = False
            ref = self._refs[ext] = (self._whole[head:data].copy(), fixed, u)
        first, fixed, u = ref
        # [head, data) of rows lo..hi-1, one row per member
        v = np.lib.stride_tricks.as_strided(self._whole[head + lo * self._stride:],
                                            (hi - lo, data - head), (self._stride, 1),
                                            writeable=False)
        if ((v != first).any(axis=0) & fixed).any():
            return None
        h = v[:, u:]
        size, chk = _octal(h[:, 124:136], 11), _octal(h[:, 148:156], 6)
        keys = _digits(h[:, :self._digits], 10)
        if size is None or chk is None or keys is None or (h[:, 155] != 32).any():
            return None
        if (h.sum(axis=1, dtype=np.int64) - h[:, 148:156].sum(axis=1, dtype=np.int64)
                + 8 * 32 != chk).any():
            return None
        if (-(-size // _BLOCK) * _BLOCK != end - data).any():  # the next header follows
            return None
        self.sizes[ext][lo:hi] = size
        return keys

    def check(self, ext: str, lo: int, hi: int) -> bool:
        """Check the headers of rows [lo, hi) of `ext` not checked yet; False if one does
        not fit the layout (or holds another key than its row's)."""
        todo = self._unchecked.get(ext)
        if todo is None or not todo[lo:hi].any():
            return True
        keys = self._headers(ext, slice(lo, hi))
        if keys is None or (keys != self.keys[lo:hi]).any():
            return False
        todo[lo:hi] = False
        return True

    def locate(self, start: int, stop: int, ext: str) -> tuple[int, np.ndarray, np.ndarray]:
        """Row of sample `start`, and the offsets and sizes of `ext` for samples
        start..stop-1 (all must be present), their headers checked."""
        p = int(np.searchsorted(self.keys, start))
        n = stop - start
        if p + n > len(self.keys) or self.keys[p] != start or self.keys[p + n - 1] != stop - 1:
            missing = sorted(set(range(start, stop)) - set(self.keys.tolist()))
            raise DamagedCacheError(f"{self.rel}: samples {missing[:10]} are not in this tar "
                                    "(damaged, or a tar from another shard)")
        if ext not in self.offsets or (self.offsets[ext][p:p + n] < 0).any():
            raise DamagedCacheError(f"{self.rel}: a sample in [{start}, {stop}) lacks its "
                                    f".{ext} member")
        if not self.check(ext, p, p + n):
            self._index_by_walk()  # the layout does not hold here: the walk decides
            return self.locate(start, stop, ext)
        return p, self.offsets[ext][p:p + n], self.sizes[ext][p:p + n]

    def checksums(self) -> dict[str, list[int | None]]:
        """CRC32C of every member's bytes, per extension, in row order (None: absent)."""
        if not all(self.check(ext, 0, len(self.keys)) for ext in self._unchecked):
            self._index_by_walk()
        data = np.frombuffer(self.buf, np.uint8)
        return {ext: [None if o < 0 else google_crc32c.value(data[o:o + s])
                      for o, s in zip(self.offsets[ext].tolist(), self.sizes[ext].tolist())]
                for ext in sorted(self.offsets)}


def member_checksums(path: Path, rel: str) -> dict[str, list[int | None]]:
    """What a done marker records for a tar: each member's CRC32C, per extension."""
    return _MappedTar(path, rel).checksums()


def _check_early(mapping: Mapping, rows: list[int], offs: list[int], sizes: list[int],
                 want: list, early: np.ndarray, checked: np.ndarray) -> None:
    """Note in `early` each member of `rows` whose bytes (offset, size) match their recorded
    CRC32C, unless `checked` by then (on the read-ahead thread; raises nothing: what does
    not match is the reader's to find and report)."""
    for j, o, s in zip(rows, offs, sizes):
        if not checked[j] and want[j] is not None and mapping.span(o, s) is not None and \
                google_crc32c.value(mapping.view[o:o + s]) == want[j]:
            early[j] = (o, s)


def _ranges(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The concatenation of arange(p[i], q[i]) over i."""
    n = q - p
    if not n.sum():
        return np.zeros(0, np.int64)
    return np.repeat(p - np.cumsum(n) + n, n) + np.arange(n.sum())


def _joined(mapping: Mapping, starts: np.ndarray, ends: np.ndarray,
            gap: int = 64 << 10) -> list[Span]:
    """The byte ranges [starts, ends) of `mapping` in file order, overlapping ones and those
    at most `gap` apart joined; ranges outside the file are left out."""
    if not len(starts):
        return []
    order = np.argsort(starts, kind="stable")
    starts = starts[order]
    ends = np.maximum.accumulate(np.minimum(ends[order], mapping.size))  # past the end: cut
    first = np.flatnonzero(np.r_[True, starts[1:] - ends[:-1] > gap])
    last = np.r_[first[1:] - 1, len(starts) - 1]
    spans = [mapping.span(a, b - a) for a, b in zip(starts[first].tolist(), ends[last].tolist())]
    return [s for s in spans if s is not None]


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
        self.first_reads = 0  # checks of members read for the first time (maybe on disk)
        # per (shard, ext): (offset, size) of each member a read-ahead found sound, or -1
        self._early: dict[tuple[int, str], np.ndarray] = {}

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
        n = len(offs)
        if checked[row:row + n].all():
            return
        self.first_reads += 1
        early = self._early.get((shard, ext))  # the exact bytes a read-ahead found sound
        if early is not None and len(early) == len(checked):
            checked[row:row + n] |= (early[row:row + n, 0] == offs) & \
                (early[row:row + n, 1] == sizes)
        todo = np.flatnonzero(~checked[row:row + n]).tolist()
        # wait for the bytes without the GIL (a read-ahead may be reading them), not in
        # page faults inside the checksums
        populate(merged([tar.mapping.span(int(offs[j]), int(sizes[j])) for j in todo]))
        data = np.frombuffer(tar.buf, np.uint8)
        for j in todo:
            o, s = int(offs[j]), int(sizes[j])
            if want is None or google_crc32c.value(data[o:o + s]) != want[row + j]:
                raise DamagedCacheError(
                    f"{tar.rel}: member {tar.keys[row + j]:09d}.{ext} fails its checksum "
                    "(damaged, or a tar from another place); run `pipeline verify` on the "
                    "cache")
        checked[row:row + n] = True
        if early is not None and checked.all():  # its notes are of no more use
            self._early.pop((shard, ext), None)

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

    def ahead(self, fields: Sequence[str], plan: list[tuple[int, int, bool]]) -> list:
        """What a read-ahead does for the runs of samples [lo, hi) in `plan` (in index
        order): read the members of `fields` in file order, each shard's in spans joined
        over gaps of up to 64 KiB, then, for the runs marked early, check the members not
        checked yet (`_check_early`). Nothing is checked here: `pieces` checks what it
        reads, and reports what is missing."""
        exts = [member_ext(n) for n in fields if n != INDEX]
        if self._fetched is not None or not exts or not plan:
            return []
        S, items = self.spec.shard_size, []
        runs: dict[int, list[tuple[int, int, int, bool]]] = {}  # per shard, cut at its end
        for lo, hi, early in plan:
            while lo < hi:
                end = min(hi, (lo // S + 1) * S)
                runs.setdefault(lo // S, []).append((lo // S, lo, end, early))
                lo = end
        for shard in sorted(runs):
            part = runs[shard]
            tar = self._tar(shard)
            p, q = np.searchsorted(tar.keys, [[r[1] for r in part], [r[2] for r in part]])
            rows = _ranges(p, q)
            starts, ends = [], []
            for ext in exts:
                if ext in tar.offsets:
                    o, n = tar.offsets[ext][rows], tar.sizes[ext][rows]
                    keep = (o >= 0) & (n > 0)
                    starts.append(o[keep])
                    ends.append(o[keep] + n[keep])
            if starts:
                items += _joined(tar.mapping, np.concatenate(starts), np.concatenate(ends))
            early = _ranges(p[[r[3] for r in part]], q[[r[3] for r in part]])
            if len(early) and self._checksums is not None:
                items += self._early_checks(tar, shard, exts, early)
        return items

    def _early_checks(self, tar: _MappedTar, shard: int, exts: list[str],
                      rows: np.ndarray) -> list[Callable[[], None]]:
        """What checks the members of `exts` in tar rows `rows` not checked yet, once they
        are read in. A member whose bytes match its recorded CRC32C is noted with the offset
        and size checked: `_check` takes it as checked only where it reads those bytes."""
        out = []
        for ext in exts:
            want = self._expected[shard].get(ext)
            if ext not in tar.offsets or want is None or len(want) != len(tar.keys):
                continue
            checked = self._checked.setdefault((shard, ext), np.zeros(len(tar.keys), bool))
            todo = rows[~checked[rows]]
            if len(todo):
                early = self._early.setdefault(
                    (shard, ext), np.full((len(tar.keys), 2), -1, np.int64))
                out.append(functools.partial(
                    _check_early, tar.mapping, todo.tolist(), tar.offsets[ext][todo].tolist(),
                    tar.sizes[ext][todo].tolist(), want, early, checked))
        return out

    def pieces(self, name: str, start: int, stop: int) -> Iterator[np.ndarray]:
        """Rows [start, stop) of field `name`. Members of consecutive samples written by
        this cache sit at a fixed stride in the tar, so a run within one shard is a single
        strided view of the mapped file; otherwise one view per sample."""
        S = self.spec.shard_size
        while start < stop:
            end = min(stop, (start // S + 1) * S)
            yield from self._shard_pieces(name, start, end)
            start = end

    def _rows(self, tar: _MappedTar, name: str) -> tuple[np.ndarray, int, int] | None:
        """(view, member size, .npy header size): every row of field `name` in the tar as
        one strided view of the mapped file, laid out as its first member, when all its
        members sit at one stride (every tar this cache writes); None otherwise. Rows are
        used only once their size and .npy header are found equal to the first's."""
        ext = member_ext(name)
        if ext in tar.views:
            return tar.views[ext]
        hit, f = None, self.spec.fields[name]
        offs, sizes = tar.offsets.get(ext), tar.sizes.get(ext)
        if offs is not None and len(offs) and (offs >= 0).all():
            steps = np.unique(np.diff(offs))
            if len(steps) <= 1:
                step = int(steps[0]) if len(steps) else 0
                data_off, dtype, shape = self._npy_layout(tar.buf, int(offs[0]), int(sizes[0]))
                if shape != f.shape or dtype != np.dtype(f.dtype) or \
                        data_off + f.nbytes > sizes[0]:
                    raise DamagedCacheError(
                        f"{tar.rel}: member {tar.keys[0]:09d}.{ext} holds {dtype}"
                        f"{list(shape)}, expected {f.dtype}{list(f.shape)}")
                view = np.ndarray((len(offs), *shape), dtype=dtype, buffer=tar.buf,
                                  offset=int(offs[0]) + data_off,
                                  strides=(step, *_row_strides(shape, dtype)))
                hit = (view, int(sizes[0]), data_off)
                tar.npy_unchecked[ext] = np.ones(len(offs), bool)
        tar.views[ext] = hit
        return hit

    def _same_npy(self, tar: _MappedTar, ext: str, row: int, offs: np.ndarray,
                  sizes: np.ndarray, size: int, data_off: int) -> bool:
        """Whether the members at `offs` (rows from `row`) have the first member's size
        and .npy header bytes (checked once per row)."""
        todo = tar.npy_unchecked[ext][row:row + len(offs)]
        if not todo.any():
            return True
        first = int(tar.offsets[ext][0])
        heads = np.frombuffer(tar.buf, np.uint8)
        ok = (sizes == size).all() and all(
            (heads[o:o + data_off] == heads[first:first + data_off]).all()
            for o in offs[todo].tolist())
        if ok:
            todo[:] = False
        return ok

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
        regular = self._rows(tar, name)
        if regular is not None and self._same_npy(tar, member_ext(name), row, offs, sizes,
                                                  *regular[1:]):
            yield regular[0][row:row + len(offs)]
            return
        f = self.spec.fields[name]
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
