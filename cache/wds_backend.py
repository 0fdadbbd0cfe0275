"""webdataset backend: one uncompressed tar per shard, readable by plain `webdataset`.

Each sample is keyed by its global index (`%09d`) and has the members

    <key>.moments.npy  <key>.tokens.npy  [<key>.tokens_scale.npy]  <key>.cls.npy
    <key>.label.cls (class index as text, webdataset's convention)  <key>.key.txt

so `wds.WebDataset(url).decode()` yields numpy arrays and an int label. Samples that failed
at encode time are left out of the tar (plain webdataset users never see a placeholder);
the manifest lists them.

Our reader does random access without unpacking: the stdlib `tarfile` gives each member's
data offset, the tar is memory-mapped and each `.npy` payload is viewed in place.
"""

from __future__ import annotations

import io
import mmap
import os
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import webdataset as wds

from .format import INDEX, KEY, LABEL, CacheSpec

DIR = "wds"
_EXT = {"label": "label.cls", "key": "key.txt"}  # every other field: "<name>.npy"


def member_ext(name: str) -> str:
    return _EXT.get(name, f"{name}.npy")


def shard_path(root: Path, shard: int) -> Path:
    return Path(root) / DIR / f"shard-{shard:06d}.tar"


class WdsWriter:
    name = "wds"

    def __init__(self, root: Path, spec: CacheSpec):
        self.root, self.spec = Path(root), spec

    def create(self) -> None:
        (self.root / DIR).mkdir(parents=True, exist_ok=True)

    def write_shard(self, shard: int, arrays: dict[str, np.ndarray],
                    failed: set[int] = frozenset()) -> list[Path]:
        """Write a shard's tar under a temporary name, then rename it into place.
        `failed` holds the local offsets of samples to leave out."""
        start, stop = self.spec.shard_range(shard)
        path = shard_path(self.root, shard)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fields = [n for n in self.spec.fields if n != INDEX]
        try:
            with open(tmp, "wb") as f:
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
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return [path]


class _MappedTar:
    """A tar file mapped into memory with an index {global index: {ext: (offset, size)}}."""

    def __init__(self, path: Path):
        self.members: dict[int, dict[str, tuple[int, int]]] = {}
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                stem, _, ext = m.name.partition(".")
                self.members.setdefault(int(stem), {})[ext] = (m.offset_data, m.size)
        with open(path, "rb") as f:
            self.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


class WdsReader:
    name = "wds"

    def __init__(self, root: Path, spec: CacheSpec, max_open_shards: int = 512):
        self.root, self.spec = Path(root), spec
        self._tars: dict[int, _MappedTar] = {}
        self._max_open = max_open_shards
        self._headers: dict[bytes, tuple[int, np.dtype, tuple[int, ...]]] = {}

    def _tar(self, shard: int) -> _MappedTar:
        t = self._tars.get(shard)
        if t is None:
            if len(self._tars) >= self._max_open:
                self._tars.pop(next(iter(self._tars)))
            t = self._tars[shard] = _MappedTar(shard_path(self.root, shard))
        return t

    def _npy(self, buf: mmap.mmap, offset: int, size: int) -> np.ndarray:
        """View an .npy payload in place; headers are parsed by numpy once per layout."""
        head = bytes(buf[offset:offset + 128])
        hit = self._headers.get(head)
        if hit is None:
            f = io.BytesIO(bytes(buf[offset:offset + min(size, 4096)]))
            major, _ = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if major == 1
                    else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read(f)
            if fortran:
                raise ValueError("fortran-ordered .npy members are not written by this cache")
            hit = self._headers[head] = (f.tell(), dtype, shape)
        data_off, dtype, shape = hit
        return np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape)),
                             offset=offset + data_off).reshape(shape)

    def _member(self, index: int, name: str) -> tuple[_MappedTar, int, int]:
        tar = self._tar(index // self.spec.shard_size)
        try:
            off, size = tar.members[index][member_ext(name)]
        except KeyError:
            raise KeyError(f"sample {index} has no {member_ext(name)} member in "
                           f"{shard_path(self.root, index // self.spec.shard_size)}") from None
        return tar, off, size

    def pieces(self, name: str, start: int, stop: int) -> Iterator[np.ndarray]:
        """Rows [start, stop) of field `name`, one single-row piece per sample."""
        for i in range(start, stop):
            if name == INDEX:
                yield np.array([i], dtype=np.int64)
                continue
            tar, off, size = self._member(i, name)
            if name == LABEL:
                yield np.array([int(bytes(tar.buf[off:off + size]))], dtype=np.int64)
            else:
                yield self._npy(tar.buf, off, size)[None]

    def read_keys(self, start: int, stop: int) -> list[str]:
        out = []
        for i in range(start, stop):
            tar, off, size = self._member(i, KEY)
            out.append(bytes(tar.buf[off:off + size]).decode())
        return out

    def read_shard(self, shard: int) -> dict[str, np.ndarray]:
        """Every field of a shard's present samples via plain `tarfile` + `np.load` (the
        reference reader used by verify); `index` comes from the member keys."""
        ext_to_field = {member_ext(n): n for n in self.spec.fields if n != INDEX}
        samples: dict[int, dict] = {}
        with tarfile.open(shard_path(self.root, shard), "r:") as tf:
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
                out[field] = np.asarray([samples[i][field] for i in indices])
            except KeyError:
                raise ValueError(f"a sample lacks its {member_ext(field)} member") from None
        return out
