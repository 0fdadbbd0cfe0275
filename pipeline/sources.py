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
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
WDS_LABEL_EXTENSIONS = ("cls", "cls.txt", "label", "json")


class SourceError(ValueError):
    """The image source cannot be listed: wrong path, wrong layout, no images."""


@dataclass(frozen=True)
class Item:
    """One sample of a source. `offset`/`size` locate a member inside a tar (`path`);
    for plain files they are -1. `error` marks a sample known to be bad at listing time."""
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


def _walk_files(folder: Path) -> list[Path]:
    """Every regular, non-hidden file under `folder`, in sorted path order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        out += [Path(dirpath) / f for f in sorted(filenames) if _visible(f)]
    return sorted(out)


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
             for label, folder in enumerate(folders) for p in _walk_files(folder)]
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
    for p in _walk_files(root):
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


def _read_label(tf: tarfile.TarFile, member: tarfile.TarInfo, ext: str) -> int:
    data = tf.extractfile(member).read().decode().strip()
    if ext == "json":
        obj = json.loads(data)
        value = obj["label"] if "label" in obj else obj["cls"]
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"label {value!r} is not an integer")
        data = str(value)
    label = int(data)
    if label < 0:
        raise ValueError(f"negative label {label}")
    return label


def list_wds(data_dir: Path, split: str = "train") -> Source:
    items = []
    labels_seen = set()
    for tar in _tar_paths(data_dir):
        samples: dict[str, dict] = {}
        order: list[str] = []
        try:
            # "r:" = uncompressed only: samples are read later at their byte offsets
            with tarfile.open(tar, "r:") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    base = m.name.rsplit("/", 1)[-1]
                    stem, _, ext = base.partition(".")
                    key = m.name[:len(m.name) - len(base)] + stem
                    if key not in samples:
                        samples[key] = {}
                        order.append(key)
                    ext = ext.lower()
                    if ext in WDS_IMAGE_EXTENSIONS and "image" not in samples[key]:
                        samples[key]["image"] = (m.offset_data, m.size)
                    elif ext in WDS_LABEL_EXTENSIONS and "label" not in samples[key]:
                        try:
                            samples[key]["label"] = _read_label(tf, m, ext)
                        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
                            samples[key]["error"] = f"unreadable label member {base}: {e}"
        except (tarfile.TarError, OSError) as e:
            raise SourceError(f"{tar}: not a readable uncompressed tar ({e}); compressed "
                              "tars (.tar.gz) need unpacking first: samples are read at "
                              "their byte offsets") from e
        for key in order:
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
