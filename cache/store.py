"""Where a cache lives: a local directory, or an fsspec URL (s3://, gs://, memory://, file://).

Every file of a cache is named by a '/'-separated path relative to its root
("manifest.json", "_done/zarr/000003.json", "wds/shard-000003.tar"); a `Store` maps those
names onto the storage:

- a plain path is a local directory: files are written through a temporary name and a
  rename, and the readers memory-map them (the fast path);
- a URL goes through fsspec. Every object is written whole in one call, which object
  stores (S3, GCS) make visible atomically; `file://` URLs keep the temporary name and
  rename, but are otherwise read like a remote store (no memory-mapping). Credentials
  come the usual fsspec ways (the environment, e.g. AWS_PROFILE or
  GOOGLE_APPLICATION_CREDENTIALS, or fsspec's config: FSSPEC_S3_<KEY> variables); s3://
  and gs:// need `pip install s3fs` / `gcsfs`.

Remote reads never download a whole cache: zarr reads the chunks it needs with ranged
requests, and a webdataset shard is fetched when a sample of it is first read.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    """What a file of this st_mode is, in words ("a FIFO", "a symbolic link", ...)."""
    return next((name for test, name in _KINDS if test(mode)), f"file type {mode:o}")


class NotRegularFileError(OSError):
    """A path that must be a regular file is a link, FIFO, device or directory."""


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """A local file opened for reading only if it is a regular file: no link is followed
    (O_NOFOLLOW), a FIFO opens without waiting for a writer (O_NONBLOCK) and fstat judges
    what was opened, so a name swapped after an lstat check cannot make a read block or
    never end. Raises FileNotFoundError, NotRegularFileError, OSError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotRegularFileError(errno.ELOOP, "a symbolic link, not a regular file",
                                      str(path)) from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegularFileError(errno.EINVAL, f"{file_kind(mode)}, not a regular file",
                                  str(path))
    return os.fdopen(fd, "rb")


def is_url(root: str | os.PathLike) -> bool:
    return isinstance(root, str) and ("://" in root or "::" in root)


class Store:
    """A cache root. Cheap to build, picklable; build one from the same string anywhere
    (a Ray worker, a DataLoader worker) to reach the same files."""

    def __init__(self, root: str | os.PathLike | Store):
        if isinstance(root, Store):
            root = root.name
        self.name = os.fspath(root)
        if is_url(self.name):
            try:
                self.fs, path = fsspec.core.url_to_fs(self.name)
            except (ImportError, ValueError) as e:  # unknown protocol, s3fs not installed
                raise ValueError(f"{self.name}: cannot open this URL ({e})") from e
            self.path = path.rstrip("/")
            self.local: Path | None = None
        else:
            self.fs, self.local = LocalFileSystem(), Path(self.name)
            self.path = str(self.local.absolute())
        self.posix = isinstance(self.fs, LocalFileSystem)  # renames are atomic

    @classmethod
    def of(cls, root: str | os.PathLike | Store) -> Store:
        return root if isinstance(root, Store) else cls(root)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Store({self.name!r})"

    def full(self, rel: str = "") -> str:
        """The storage path of `rel` (what the fsspec filesystem takes). `rel` must name
        something inside the cache: no absolute path, URL, `..` or empty part."""
        if rel:
            parts = rel.split("/")
            if (not isinstance(rel, str) or "\\" in rel or ":" in rel or "\0" in rel
                    or any(p in ("", ".", "..") for p in parts)):
                raise ValueError(f"{rel!r} is not a name inside the cache {self.name}")
        return f"{self.path}/{rel}" if rel else self.path

    def local_path(self, rel: str = "") -> Path | None:
        """The local file of `rel` when the cache is a plain local directory, else None."""
        if self.local is None:
            return None
        self.full(rel)  # the name check
        return self.local / rel if rel else self.local

    # ------------------------------------------------------------------ queries
    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self.full(rel))

    def is_file(self, rel: str) -> bool:
        return self.fs.isfile(self.full(rel))

    def is_regular(self, rel: str) -> bool:
        """A regular file, not a link (locally: checked without following links, so a
        marker linked to /dev/zero, a FIFO or a file elsewhere is never read)."""
        if self.local is None:
            return self.is_file(rel)
        try:
            return stat.S_ISREG(os.lstat(self.full(rel)).st_mode)
        except OSError:
            return False

    def listdir(self, rel: str = "") -> list[str]:
        """Names in the folder `rel` (empty when it does not exist)."""
        try:
            entries = self.fs.ls(self.full(rel), detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.full(rel)))

    def du(self, rel: str = "") -> int:
        """Bytes of every file under `rel`."""
        return int(self.fs.du(self.full(rel))) if self.exists(rel) else 0

    # ------------------------------------------------------------------ reads
    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.full(rel))

    def open(self, rel: str, **kw: Any) -> BinaryIO:
        return self.fs.open(self.full(rel), "rb", **kw)

    def fetch(self, rel: str, dest: Path) -> None:
        """Copy the file `rel` to the local file `dest`."""
        self.fs.get_file(self.full(rel), str(dest))

    # ------------------------------------------------------------------ writes
    def makedirs(self, rel: str = "") -> None:
        if self.posix:  # object stores have no folders
            self.fs.makedirs(self.full(rel), exist_ok=True)

    @contextlib.contextmanager
    def writer(self, rel: str) -> Iterator[BinaryIO]:
        """Write the file `rel` atomically: readers see the old file or the whole new one.
        Locally through a temporary name and a rename; on a remote store from a local
        temporary file uploaded in one call when the block ends without error."""
        if self.posix:
            from .format import atomic_file
            with atomic_file(Path(self.full(rel))) as f:
                yield f
            return
        with tempfile.NamedTemporaryFile(prefix="urepa-upload-", suffix=".tmp") as f:
            yield f
            f.flush()
            self.fs.put_file(f.name, self.full(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.posix:
            with self.writer(rel) as f:
                f.write(data)
        else:
            self.fs.pipe_file(self.full(rel), data)

    def remove(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.full(rel))

    def remove_stale_tmp(self, rel: str) -> None:
        """Remove temporary files that killed writers of `rel` left (local stores only:
        remote writes leave nothing behind)."""
        if self.posix:
            from .format import remove_stale_tmp
            remove_stale_tmp(Path(self.full(rel)))

    # ------------------------------------------------------------------ zarr
    def zarr_store(self, rel: str, read_only: bool):
        """A zarr store for the group at `rel`."""
        from zarr.storage import FsspecStore, LocalStore
        if self.local is not None:
            return LocalStore(self.local / rel, read_only=read_only)
        # zarr makes its own (asynchronous) filesystem from the URL; for file:// let it
        # create the nested folders of chunk keys
        options = {"auto_mkdir": True} if self.posix and not read_only else None
        return FsspecStore.from_url(f"{self.name.rstrip('/')}/{rel}", storage_options=options,
                                    read_only=read_only)


class ShardFiles:
    """Local copies of remote files, fetched on first use into a private temporary folder
    that goes away with this object (the wds reader keeps a few shards this way)."""

    def __init__(self, store: Store):
        self.store = store
        self._dir: tempfile.TemporaryDirectory | None = None

    def get(self, rel: str) -> Path:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="urepa-shards-")
        path = Path(self._dir.name) / rel.replace("/", "__")
        if not path.exists():
            tmp = path.with_name(path.name + ".part")
            self.store.fetch(rel, tmp)
            os.replace(tmp, path)
        return path

    def drop(self, rel: str) -> None:
        """Delete the local copy (an open memory map of it stays valid)."""
        if self._dir is not None:
            (Path(self._dir.name) / rel.replace("/", "__")).unlink(missing_ok=True)
