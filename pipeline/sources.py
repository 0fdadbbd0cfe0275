"""Image sources: list an image set as a sorted, stable sequence of (key, label, location).

The global index of a sample is its position in this list; shard k of the cache holds a
fixed contiguous range of it (cache/format.py). Listing never decodes an image: a file that
turns out not to be an image becomes a recorded failure at decode time, in its own slot.

Sources (the `SOURCES` registry):
  imagenet     ILSVRC2012: train/nXXXXXXXX/*.JPEG; label = index of the synset in sorted
               order. val either in synset folders (the usual valprep layout) or flat with
               Kaggle's LOC_val_solution.csv next to it.
  imagefolder  DIR/<class>/**/<file>; label = index of the class folder in sorted order.
  wds          webdataset image tars (a directory of .tar files, a single tar, or a brace
               pattern): image member .jpg/.jpeg/.png/.webp, label member .cls (or .json
               with "label"/"cls").
  demo         a small generated labelled image set (pipeline/demo_data.py), written to
               --data-dir on first use and then read like an imagefolder.

No sample vanishes without being listed:
- Folders: directory symlinks are followed, but every real directory and file is listed
  once. A symlink loop (`cls/loop -> ..`), or a directory or file reached a second time
  through a symlink (its images would be counted twice, or under two labels), is a
  SourceError naming the links: the dataset is broken and only its owner knows which path
  is meant. A directory that cannot be read is a SourceError too (os.walk skips it).
- Tars: a damaged member header no longer ends the tar. tarfile's ignore_zeros skips block
  by block to the next valid (checksummed) header, so the samples after the damage are
  recovered; each byte range that holds neither a member nor zero blocks becomes a failure
  Item in its place (key `<tar>@<byte offset>`, the reason naming the tar and the bytes),
  counted against --max-failures and kept in the manifest's failures, because the samples
  stored there cannot be named. A sample that keeps one of its members is listed with its
  own error (`no image member`). A tar that stops without its end-of-archive marker (cut
  short), or inside a member's data, gets such an item at its end; a damaged pax/long-name
  header pair, after which tarfile cannot resume, makes one item of the rest of the tar.
  A file without any valid tar header is a SourceError (not a tar), and so is a
  compressed tar. Concatenated tars (`cat a.tar b.tar`) are read to the end.
- Sizes read from the files are bounded: a label of MAX_CLASSES or more (the class-name list
  is range(max label + 1)) and a label member over MAX_LABEL_BYTES are that sample's error.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
WDS_LABEL_EXTENSIONS = ("cls", "cls.txt", "label", "json")
TAR_BLOCK = tarfile.BLOCKSIZE   # 512: headers and data start on these boundaries
# first bytes of compressed tars, refused at once (a scan for tar headers would read the
# whole file block by block and find none)
COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
                    b"\x28\xb5\x2f\xfd": "zstd"}

# Limits on sizes read from a source's files; a value beyond one is that sample's failure.
# ImageNet-21k has 21,841 classes and JFT-3B 29,593: 100,000 covers real label sets, while
# the class-name list it implies stays under 1 MB in the manifest.
MAX_CLASSES = 100_000
# a .cls holds a few digits; a webdataset .json a few KB of metadata at most
MAX_LABEL_BYTES = 1 << 20


class SourceError(ValueError):
    """The image source cannot be listed: wrong path, wrong layout, no images."""


@dataclass(frozen=True)
class Item:
    """One sample of a source. `offset`/`size` locate a member inside a tar (`path`);
    for plain files they are -1. `error` marks a sample known to be bad at listing time.
    The failure item of a damaged tar range (key `<tar>@<offset>`) locates those bytes."""
    key: str
    label: int
    path: str
    offset: int = -1
    size: int = -1
    error: str = ""


@dataclass
class Source:
    kind: str
    root: str
    split: str
    items: list[Item]
    class_names: list[str] = field(default_factory=list)
    total: int = 0           # images listed before --limit

    def sha256(self) -> str:
        """Identity of the listed content: keys and labels in order (not file bytes: a
        stat of 1.28M files on a network filesystem would cost minutes)."""
        h = hashlib.sha256()
        for it in self.items:
            h.update(f"{it.key}\t{it.label}\n".encode())
        return h.hexdigest()

    def provenance(self, limit: int | None) -> dict:
        return {"dataset": self.kind, "split": self.split, "num_images": len(self.items),
                "listed": self.total, "limit": limit, "sha256": self.sha256(),
                "num_classes": len(self.class_names), "class_names": self.class_names}


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _walk_files(folders: list[Path]) -> list[list[Path]]:
    """Every non-hidden file under each folder, in sorted path order (one list per folder).

    Directory symlinks are followed (linking class folders in from elsewhere is a common
    way to assemble a dataset), but every real directory and every file is listed once
    across all the folders, so that no image is counted twice or under two labels: a
    symlink loop, or a directory or file reached a second time through a symlink, is a
    SourceError naming the paths. Directories are identified by (st_dev, st_ino); only
    directories and symlinks are stat'ed, never the plain files (a stat of 1.28M files on
    a network filesystem costs minutes). Hard links are separate names and not detected.
    """
    dirs: dict[tuple[int, int], Path] = {}           # real directory -> first path listed
    links: dict[tuple[int, int, str], Path] = {}     # file symlink target -> the link
    out = []
    for folder in folders:
        files = []
        stack = [folder]
        while stack:
            d = stack.pop()
            st = os.stat(d)
            first = dirs.setdefault((st.st_dev, st.st_ino), d)
            if first != d:
                raise _reached_twice(d, first)
            try:
                with os.scandir(d) as it:
                    entries = sorted((e for e in it if _visible(e.name)), key=lambda e: e.name)
            except OSError as e:
                raise SourceError(f"{d}: cannot list this directory ({e.strerror}); its "
                                  "files would be missing: fix its permissions") from None
            subdirs = []
            for e in entries:
                if e.is_dir():  # follows symlinks
                    if e.is_symlink():
                        _check_not_a_loop(Path(e.path))
                    subdirs.append(Path(e.path))
                    continue
                files.append(Path(e.path))
                target = _link_target(e) if e.is_symlink() else None
                if target is not None and links.setdefault(target, files[-1]) != files[-1]:
                    raise _reached_twice(files[-1], links[target], "file")
            # depth-first in sorted order: which of two paths counts as the first is stable
            stack += reversed(subdirs)
        out.append(sorted(files))
    # a file symlink whose target sits in a listed directory lists that file a second time
    # (checked at the end: the target's directory may be walked after the link)
    for (dev, ino, name), link in links.items():
        if (dev, ino) in dirs and _visible(name):
            raise _reached_twice(link, dirs[dev, ino] / name, "file")
    return out


def _check_not_a_loop(link: Path) -> None:
    """A directory symlink that leads to the folder holding it or above (`cls/loop -> ..`)."""
    target, here = Path(os.path.realpath(link)), Path(os.path.realpath(link.parent))
    if target == here or target in here.parents:
        raise SourceError(
            f"symlink loop: {link} -> {os.readlink(link)} leads back to {target}, a directory "
            "above it, so the files there would be listed again and again (under wrong "
            "labels); remove the link")


def _link_target(entry: os.DirEntry) -> tuple[int, int, str] | None:
    """(st_dev, st_ino) of the directory holding a file symlink's final target, and the
    target's name; None for a broken link (listed anyway: decoding records it as a failure)."""
    real = os.path.realpath(entry.path)
    try:
        st = os.stat(os.path.dirname(real))
        os.stat(real)
    except OSError:
        return None
    return st.st_dev, st.st_ino, os.path.basename(real)


def _reached_twice(path: Path, first: Path, what: str = "directory") -> SourceError:
    """The error for a directory or file listed at `first` and met again at `path`; it names
    the symlinks below the two paths' common folder, one of which is the culprit."""
    common = Path(os.path.commonpath([path, first]))
    links = dict.fromkeys(q for p in (path, first) for q in (p, *p.parents)
                          if common in q.parents and q.is_symlink())
    via = ", ".join(f"{q} -> {os.readlink(q)}" for q in links) or "a bind mount"
    if what == "directory" and first in path.parents:
        return SourceError(
            f"symlink loop: {via} lead{'s' if len(links) < 2 else ''} back to {first}, a "
            "directory above, so its files would be listed again and again (under wrong "
            f"labels); remove {'the link' if len(links) < 2 else 'one of the links'}")
    return SourceError(
        f"{path} and {first} are the same {what} ({os.path.realpath(path)}), reached twice "
        f"through {via}: {'its files' if what == 'directory' else 'it'} would be listed "
        "twice (under two labels when the paths are in two class folders); remove the extra "
        "link")


def _class_folders(root: Path) -> list[Path]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p.name))
    if not folders:
        raise SourceError(f"{root}: no class folders (expected {root}/<class>/<image files>)")
    return folders


def _split_dir(data_dir: Path, split: str) -> Path:
    """`DIR/<split>` when it exists, else DIR itself (already a split directory), unless
    DIR holds the other split only (then --split names a folder that is missing)."""
    if not data_dir.is_dir():
        raise SourceError(f"--data-dir {data_dir} does not exist or is not a directory")
    if (data_dir / split).is_dir():
        return data_dir / split
    others = [s for s in ("train", "val") if s != split and (data_dir / s).is_dir()]
    if others:
        raise SourceError(f"--data-dir {data_dir} has {others[0]}/ but no {split}/ for "
                          f"--split {split}")
    return data_dir


def list_imagefolder(data_dir: Path, split: str = "train") -> Source:
    root = _split_dir(data_dir, split)
    folders = _class_folders(root)
    items = [Item(str(p.relative_to(root)), label, str(p))
             for label, files in enumerate(_walk_files(folders)) for p in files]
    if not items:
        raise SourceError(f"{root}: the class folders hold no files")
    return Source("imagefolder", str(root), split, items, [f.name for f in folders])


def _is_synset(name: str) -> bool:
    return len(name) == 9 and name[0] == "n" and name[1:].isdigit()


def _find_val_solution(root: Path) -> Path | None:
    for d in (root, *list(root.parents)[:4]):
        if (d / "LOC_val_solution.csv").is_file():
            return d / "LOC_val_solution.csv"
    return None


def list_imagenet(data_dir: Path, split: str = "train") -> Source:
    root = _split_dir(data_dir, split)
    synsets = [p for p in root.iterdir() if p.is_dir() and _is_synset(p.name)]
    if synsets:
        src = list_imagefolder(root, split)
        odd = [n for n in src.class_names if not _is_synset(n)]
        if odd:
            raise SourceError(f"{root}: folders {odd[:5]} are not ImageNet synsets "
                              "(nXXXXXXXX); use --dataset imagefolder for other layouts")
        src.kind = "imagenet"
        return src
    if split != "val":
        raise SourceError(f"{root}: no synset folders (nXXXXXXXX/); --data-dir should be the "
                          "ImageNet root holding train/ and val/, or the split directory")
    solution = _find_val_solution(root)
    if solution is None:
        raise SourceError(
            f"{root}: flat ImageNet val images need their labels: put LOC_val_solution.csv "
            "(Kaggle) next to them, or move the images into synset folders (valprep.sh)")
    with open(solution, newline="") as f:
        labels = {row["ImageId"]: row["PredictionString"].split()[0]
                  for row in csv.DictReader(f)}
    classes = sorted(set(labels.values()))
    index = {s: i for i, s in enumerate(classes)}
    items = []
    for p in _walk_files([root])[0]:
        synset = labels.get(p.name.split(".")[0])
        if synset is not None:
            items.append(Item(p.name, index[synset], str(p)))
    if not items:
        raise SourceError(f"{root}: no image in {solution} was found in this directory")
    return Source("imagenet", str(root), split, items, classes)


def _tar_paths(data_dir: Path) -> list[Path]:
    spec = str(data_dir)
    if "{" in spec:
        from braceexpand import braceexpand
        paths = [Path(p) for p in braceexpand(spec)]
    elif data_dir.is_dir():
        paths = sorted(data_dir.glob("*.tar"))
    else:
        paths = [data_dir]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        raise SourceError(f"--data-dir {spec}: no webdataset tars found"
                          f"{' (missing: ' + ', '.join(missing[:3]) + ')' if missing else ''}")
    return paths


def _parse_label(data: bytes, ext: str) -> int:
    text = data.decode().strip()
    if ext == "json":
        obj = json.loads(text)
        value = obj["label"] if "label" in obj else obj["cls"]
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"label {value!r} is not an integer")
        text = str(value)
    label = int(text)
    if label < 0:
        raise ValueError(f"negative label {label}")
    return label


def _label_or_error(f: BinaryIO, member: tarfile.TarInfo, base: str, ext: str
                    ) -> tuple[int, str]:
    """(label, "") or (-1, the reason this label member cannot be used)."""
    if member.size > MAX_LABEL_BYTES:
        return -1, (f"label member {base} is {member.size:,} bytes, more than the "
                    f"{MAX_LABEL_BYTES:,} a label member may hold (MAX_LABEL_BYTES)")
    f.seek(member.offset_data)
    try:
        label = _parse_label(f.read(member.size), ext)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return -1, f"unreadable label member {base}: {e}"
    if label >= MAX_CLASSES:
        # the class-name list is range(max label + 1): one stray 99,999,999 would cost
        # minutes and gigabytes to list and a 44 MB manifest
        return -1, (f"label {label:,} in {base} is above the limit of {MAX_CLASSES:,} "
                    "classes (MAX_CLASSES in pipeline/sources.py); labels are class "
                    "indices 0..N-1: remap them")
    return label, ""


def _blocks(n: int) -> int:
    return -(-n // TAR_BLOCK) * TAR_BLOCK


def _nonzero_range(f: BinaryIO, start: int, end: int) -> tuple[int, int] | None:
    """The blocks of [start, end) from the first to the last non-zero byte, or None when
    the range is all zeros (end-of-archive blocks, the padding between concatenated tars)."""
    first = last = -1
    f.seek(start)
    pos = start
    while pos < end:
        chunk = f.read(min(1 << 20, end - pos))
        if not chunk:
            break
        head = len(chunk) - len(chunk.lstrip(b"\0"))
        if head < len(chunk):
            first = pos + head if first < 0 else first
            last = pos + len(chunk.rstrip(b"\0"))
        pos += len(chunk)
    if first < 0:
        return None
    return first // TAR_BLOCK * TAR_BLOCK, min(end, _blocks(last))


def _damage(tar: Path, start: int, end: int, what: str) -> Item:
    """A failure item standing for the samples lost in bytes [start, end) of a tar: listed
    in their place, counted against --max-failures and kept in the manifest's failures."""
    return Item(f"{tar.name}@{start}", -1, str(tar), start, end - start,
                f"damaged tar {tar}: {what}; re-download or re-create the tar to encode them")


def _lost(tar: Path, start: int, end: int) -> Item:
    return _damage(tar, start, end, f"bytes {start:,}-{end:,} hold no readable member header "
                   "(a corrupt header, or the data of a member whose header is lost); the "
                   "members stored there are missing, and so are their samples unless "
                   "another member of the sample is listed with an error")


def _scan_tar(tar: Path, f: BinaryIO, size: int) -> Iterator[tarfile.TarInfo | Item]:
    """The members of an uncompressed tar in order, with a failure Item (`_damage`) in the
    place of every byte range that holds neither a member nor zero blocks, and one at the
    end when the tar stops without its end-of-archive marker (it was cut short)."""
    first_block = f.read(TAR_BLOCK)
    try:
        tarfile.TarInfo.frombuf(first_block, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        kind = next((k for magic, k in COMPRESSED_MAGIC.items()
                     if first_block.startswith(magic)), None)
        if kind is not None:
            raise SourceError(f"{tar}: a {kind}-compressed tar; compressed tars need "
                              "unpacking first: samples are read at their byte offsets")
    f.seek(0)
    # ignore_zeros: tarfile skips block by block over zero and invalid blocks to the next
    # valid header (checksummed), so the members after a damaged header are recovered;
    # the byte ranges it skipped are found below by comparing each member's offset with
    # the end of the one before.
    tf = tarfile.open(fileobj=f, mode="r:", ignore_zeros=True)
    pos = 0         # the end of the last member (header, data, padding)
    data_end = 0    # the end of its data
    found = False
    while pos < size:
        try:
            m = tf.next()
        except tarfile.ReadError as e:
            # a pax or GNU long-name header whose member header is damaged: tarfile does
            # not resume after it, so the rest of the tar is one damaged range
            yield _damage(tar, pos, size, f"it cannot be read past byte {pos:,} ({e}); the "
                          "samples after that byte are missing")
            return
        if m is None:
            break
        if m.offset > pos and (bad := _nonzero_range(f, pos, m.offset)):
            yield _lost(tar, *bad)
        if m.issparse():
            raise SourceError(f"{tar}: member {m.name} is a GNU sparse file, which a "
                              "webdataset tar never holds; re-create the tar without --sparse")
        found = True
        yield m
        has_data = m.isreg() or m.type not in tarfile.SUPPORTED_TYPES
        data_end = m.offset_data + (m.size if has_data else 0)
        pos = m.offset_data + (_blocks(m.size) if has_data else 0)
    tail = _nonzero_range(f, pos, size) if pos < size else None
    if not found and tail:
        raise SourceError(f"{tar}: not a tar: no valid member header in its {size:,} bytes "
                          "(webdataset tars are uncompressed tar files)")
    if tail:
        yield _lost(tar, *tail)
    elif data_end > size:
        yield _damage(tar, size, size, f"the file ends at byte {size:,}, inside the data of "
                      f"its last member (which runs to byte {data_end:,}): it was cut short "
                      "and any samples after that member are missing")
    elif size - pos < TAR_BLOCK:
        yield _damage(tar, pos, size, f"the file ends at byte {size:,} without the "
                      "end-of-archive marker (zero blocks) after its last member: it was "
                      "probably cut short and any samples after that member are missing")


def list_wds(data_dir: Path, split: str = "train") -> Source:
    items = []
    labels_seen = set()
    for tar in _tar_paths(data_dir):
        samples: dict[str, dict] = {}
        order: list[str | Item] = []   # sample keys by first member, and damaged ranges
        try:
            tar_size = tar.stat().st_size
            with open(tar, "rb") as f:
                for m in _scan_tar(tar, f, tar_size):
                    if isinstance(m, Item):
                        order.append(m)
                        continue
                    if not m.isfile():
                        continue
                    base = m.name.rsplit("/", 1)[-1]
                    stem, _, ext = base.partition(".")
                    key = m.name[:len(m.name) - len(base)] + stem
                    if key not in samples:
                        samples[key] = {}
                        order.append(key)
                    s = samples[key]
                    ext = ext.lower()
                    if m.offset_data + m.size > tar_size:
                        s["error"] = (f"member {base} is cut short: the tar ends at byte "
                                      f"{tar_size:,}, {m.offset_data + m.size - tar_size:,} "
                                      "bytes before the end of its data")
                    elif ext in WDS_IMAGE_EXTENSIONS and "image" not in s:
                        s["image"] = (m.offset_data, m.size)
                    elif ext in WDS_LABEL_EXTENSIONS and "label" not in s:
                        label, error = _label_or_error(f, m, base, ext)
                        if error:
                            s["error"] = error
                        else:
                            s["label"] = label
        except (tarfile.TarError, OSError) as e:
            raise SourceError(f"{tar}: not a readable uncompressed tar ({e}); compressed "
                              "tars (.tar.gz) need unpacking first: samples are read at "
                              "their byte offsets") from e
        for key in order:
            if isinstance(key, Item):
                items.append(key)
                continue
            s = samples[key]
            offset, size = s.get("image", (-1, -1))
            error = s.get("error", "")
            if not error and "image" not in s:
                error = f"no image member ({'/'.join(WDS_IMAGE_EXTENSIONS)})"
            if not error and "label" not in s:
                error = "no label member (.cls or .json)"
            label = s.get("label", -1)
            labels_seen.add(label)
            items.append(Item(f"{tar.name}/{key}", label, str(tar), offset, size, error))
    if not items:
        raise SourceError(f"--data-dir {data_dir}: the tars hold no samples")
    num_classes = max(labels_seen) + 1 if labels_seen else 0
    return Source("wds", str(data_dir), split, items, [str(i) for i in range(num_classes)])


def list_demo(data_dir: Path, split: str = "train") -> Source:
    from .demo_data import ensure_demo_images
    ensure_demo_images(data_dir)
    src = list_imagefolder(data_dir, split)
    src.kind = "demo"
    return src


SOURCES: dict[str, Callable[[Path, str], Source]] = {
    "imagenet": list_imagenet,
    "imagefolder": list_imagefolder,
    "wds": list_wds,
    "demo": list_demo,
}


def list_source(kind: str, data_dir: str | Path, split: str = "train",
                limit: int | None = None) -> Source:
    """List a source; `limit` keeps N samples evenly spread over the sorted list (every
    class of a class-sorted set stays represented), in their original order."""
    if kind not in SOURCES:
        raise SourceError(f"unknown --dataset {kind!r}; choose from {sorted(SOURCES)}")
    src = SOURCES[kind](Path(data_dir), split)
    src.total = len(src.items)
    if limit is not None:
        if limit < 1:
            raise SourceError(f"--limit must be >= 1, got {limit}")
        n = len(src.items)
        if limit < n:
            src.items = [src.items[i * n // limit] for i in range(limit)]
    return src


def read_bytes(item: Item) -> bytes:
    """The encoded image bytes of an item (a file, or a member of a tar)."""
    with open(item.path, "rb") as f:
        if item.offset >= 0:
            f.seek(item.offset)
            return f.read(item.size)
        return f.read()
