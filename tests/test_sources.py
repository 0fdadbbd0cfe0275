"""Listing image sources: sorted, stable, labelled; wrong layouts fail with clear errors."""

import io
import tarfile

import pytest
from conftest import write_jpeg_folder
from PIL import Image

from pipeline.demo_data import ensure_demo_images
from pipeline.preprocess import decode_items
from pipeline.sources import (MAX_CLASSES, MAX_LABEL_BYTES, SourceError, list_source,
                              read_bytes)


def test_imagefolder_sorted_labels(tmp_path):
    write_jpeg_folder(tmp_path / "data", classes=3, per_class=2)
    (tmp_path / "data" / ".hidden").mkdir()
    (tmp_path / "data" / "class_1" / ".DS_Store").write_bytes(b"x")
    src = list_source("imagefolder", tmp_path / "data")
    assert src.class_names == ["class_0", "class_1", "class_2"]
    assert [it.key for it in src.items] == [f"class_{c}/img_{i:03d}.JPEG"
                                            for c in range(3) for i in range(2)]
    assert [it.label for it in src.items] == [0, 0, 1, 1, 2, 2]
    # listing twice gives the same identity; a renamed file changes it
    again = list_source("imagefolder", tmp_path / "data")
    assert again.sha256() == src.sha256()
    (tmp_path / "data/class_2/img_001.JPEG").rename(tmp_path / "data/class_2/img_009.JPEG")
    assert list_source("imagefolder", tmp_path / "data").sha256() != src.sha256()


def test_imagenet_train_and_val_layouts(tmp_path):
    root = tmp_path / "ILSVRC"
    for syn in ("n02000002", "n01000001"):
        write_jpeg_folder(root / "train" / syn, classes=1, per_class=2)
    # files are found at any depth under their synset folder
    src = list_source("imagenet", root, "train")
    assert src.class_names == ["n01000001", "n02000002"]
    assert [it.label for it in src.items] == [0, 0, 1, 1]
    # flat val with Kaggle's solution file two levels up
    val = root / "val"
    val.mkdir()
    for i in (1, 2, 3):
        (val / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(b"x")
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000002,n01000001 1 2 3 4\n"
        "ILSVRC2012_val_00000001,n02000002 1 2 3 4 n02000002 5 6 7 8\n"
        "ILSVRC2012_val_00000003,n01000001 1 2 3 4\n")
    v = list_source("imagenet", root, "val")
    assert [(it.key, it.label) for it in v.items] == [
        ("ILSVRC2012_val_00000001.JPEG", 1), ("ILSVRC2012_val_00000002.JPEG", 0),
        ("ILSVRC2012_val_00000003.JPEG", 0)]


def test_wrong_layouts_fail_clearly(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        list_source("imagefolder", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no class folders"):
        list_source("imagefolder", tmp_path / "empty")
    write_jpeg_folder(tmp_path / "cats", classes=1)
    with pytest.raises(SourceError, match="not ImageNet synsets|no synset"):
        list_source("imagenet", tmp_path / "cats")
    (tmp_path / "flatval" / "val").mkdir(parents=True)
    (tmp_path / "flatval" / "val" / "x.JPEG").write_bytes(b"x")
    with pytest.raises(SourceError, match="LOC_val_solution.csv"):
        list_source("imagenet", tmp_path / "flatval", "val")
    with pytest.raises(SourceError, match="unknown --dataset"):
        list_source("coco", tmp_path)


def test_limit_spreads_over_classes(tmp_path):
    write_jpeg_folder(tmp_path / "d", classes=4, per_class=5)
    src = list_source("imagefolder", tmp_path / "d", limit=4)
    assert [it.label for it in src.items] == [0, 1, 2, 3]
    assert src.total == 20 and src.provenance(4)["num_images"] == 4
    assert len(list_source("imagefolder", tmp_path / "d", limit=100).items) == 20


def _add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_wds_tars(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "JPEG")
    jpg = buf.getvalue()
    d = tmp_path / "tars"
    d.mkdir()
    with tarfile.open(d / "shard-000001.tar", "w") as tf:
        _add(tf, "c.jpg", jpg)
        _add(tf, "c.cls", b"7")
    with tarfile.open(d / "shard-000000.tar", "w") as tf:
        _add(tf, "a.jpg", jpg)
        _add(tf, "a.cls", b"3")
        _add(tf, "b.json", b'{"label": 5}')     # no image member
        _add(tf, "dir/e.png", jpg)
        _add(tf, "dir/e.json", b'{"cls": 2}')
    src = list_source("wds", d)
    assert [it.key for it in src.items] == ["shard-000000.tar/a", "shard-000000.tar/b",
                                            "shard-000000.tar/dir/e", "shard-000001.tar/c"]
    assert [it.label for it in src.items] == [3, 5, 2, 7]
    assert "no image member" in src.items[1].error
    assert read_bytes(src.items[0]) == jpg and read_bytes(src.items[3]) == jpg
    with tarfile.open(d / "shard-000002.tar", "w") as tf:
        for key, label in (("f", b"[1]"), ("g", b'{"label": null}'), ("h", b'{"label": -2}')):
            _add(tf, f"{key}.jpg", jpg)
            _add(tf, f"{key}.json", label)
    odd = list_source("wds", d).items[4:]
    assert [it.key for it in odd] == [f"shard-000002.tar/{k}" for k in "fgh"]
    assert all("unreadable label member" in it.error for it in odd), odd
    (d / "shard-000002.tar").unlink()
    pattern = list_source("wds", tmp_path / "tars" / "shard-{000000..000001}.tar")
    assert pattern.sha256() == src.sha256()
    with pytest.raises(SourceError, match="no webdataset tars"):
        list_source("wds", tmp_path / "tars" / "shard-{000000..000005}.tar")


def test_demo_images_are_deterministic(tmp_path):
    a = ensure_demo_images(tmp_path / "a", per_class=2, num_classes=3)
    b = ensure_demo_images(tmp_path / "b", per_class=2, num_classes=3)
    fa, fb = sorted(a.rglob("*.jpg")), sorted(b.rglob("*.jpg"))
    assert len(fa) == 6 and [p.read_bytes() for p in fa] == [p.read_bytes() for p in fb]
    src = list_source("demo", a)
    assert src.kind == "demo" and len(src.class_names) == 3
    sizes = {Image.open(p).size for p in fa}
    assert len(sizes) > 1  # varied sizes, so the crop has work to do



def test_compressed_tars_are_refused(tmp_path):
    with tarfile.open(tmp_path / "a.tar", "w:gz") as tf:
        _add(tf, "a.jpg", b"x")
    with pytest.raises(SourceError, match="compressed tars"):
        list_source("wds", tmp_path / "a.tar")


def test_missing_split_is_not_mistaken_for_the_root(tmp_path):
    write_jpeg_folder(tmp_path / "ds" / "train", classes=2, per_class=1)
    with pytest.raises(SourceError, match="no val/"):
        list_source("imagefolder", tmp_path / "ds", "val")


def test_demo_never_deletes_foreign_files(tmp_path):
    (tmp_path / "photos" / "2023_trip").mkdir(parents=True)
    (tmp_path / "photos" / "notes.md").write_text("mine")
    with pytest.raises(SourceError, match="holds other files"):
        ensure_demo_images(tmp_path / "photos", per_class=1, num_classes=2)
    assert (tmp_path / "photos" / "notes.md").read_text() == "mine"
    # an interrupted generation (no completion marker) is finished, not wiped
    partial = tmp_path / "demo"
    (partial / "00_circle").mkdir(parents=True)
    ensure_demo_images(partial, per_class=1, num_classes=2)
    assert len(list(partial.rglob("*.jpg"))) == 2


def _jpeg(i: int) -> bytes:
    """A real JPEG whose colour encodes i."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i, 2 * i, 3 * i)).save(buf, "JPEG")
    return buf.getvalue()


def _write_wds(path, keys):
    """A tar of samples <key>.jpg + <key>.cls (label = position); {member: header offset}."""
    with tarfile.open(path, "w") as tf:
        for i, key in enumerate(keys):
            _add(tf, f"{key}.jpg", _jpeg(i))
            _add(tf, f"{key}.cls", str(i).encode())
    with tarfile.open(path) as tf:
        return {m.name: m.offset for m in tf}


def _damage_headers(path, *offsets):
    raw = bytearray(path.read_bytes())
    for o in offsets:
        raw[o:o + 100] = b"\xff" * 100   # name field: the header checksum no longer matches
    path.write_bytes(raw)


def test_wds_damaged_headers_recover_the_rest_and_are_listed(tmp_path):
    keys = ["a", "b", "c", "d", "e", "f"]
    tar = tmp_path / "s.tar"
    offsets = _write_wds(tar, keys)
    _damage_headers(tar, offsets["c.jpg"])
    items = list_source("wds", tar).items
    # the damaged member's range is listed in its place, naming the tar and the byte offset
    damage = items[2]
    assert damage.key == f"s.tar@{offsets['c.jpg']}" and damage.label == -1
    assert str(tar) in damage.error and f"bytes {offsets['c.jpg']:,}-" in damage.error
    # c keeps its label member, so it is listed too; every sample after is recovered
    assert [it.key for it in items[3:]] == [f"s.tar/{k}" for k in "cdef"]
    assert "no image member" in items[3].error
    for i, it in zip(range(3, 6), items[4:]):
        assert not it.error and it.label == i and read_bytes(it) == _jpeg(i)
    # a sample whose every member header is damaged cannot be named, but does not vanish:
    # the damaged range stands for it and counts as a failure
    tar2 = tmp_path / "t.tar"
    offsets = _write_wds(tar2, keys)
    _damage_headers(tar2, offsets["b.jpg"], offsets["b.cls"])
    items = list_source("wds", tar2).items
    assert [it.key for it in items] == ["t.tar/a", f"t.tar@{offsets['b.jpg']}", "t.tar/c",
                                        "t.tar/d", "t.tar/e", "t.tar/f"]
    assert "no readable member header" in items[1].error
    assert all(not it.error for i, it in enumerate(items) if i != 1)
    # the damage shows as a decode failure with its reason, like any failed sample
    _, failures = decode_items(items, 16)
    assert list(failures) == [1] and failures[1] == items[1].error


def test_wds_cut_short_or_concatenated(tmp_path):
    keys = ["a", "b", "c", "d"]
    whole = tmp_path / "whole.tar"
    offsets = _write_wds(whole, keys)
    raw = whole.read_bytes()
    d = tmp_path / "cut"
    d.mkdir()
    # cut inside the data of c.jpg: c is listed as cut short, and the end as a failure
    (d / "x.tar").write_bytes(raw[:offsets["c.jpg"] + 600])
    items = list_source("wds", d).items
    assert [it.key for it in items] == ["x.tar/a", "x.tar/b", "x.tar/c",
                                        f"x.tar@{offsets['c.jpg'] + 600}"]
    assert "c.jpg is cut short" in items[2].error and "cut short" in items[3].error
    # cut exactly between two members: only the missing end-of-archive marker tells
    (d / "x.tar").write_bytes(raw[:offsets["c.jpg"]])
    items = list_source("wds", d).items
    assert [it.key for it in items] == ["x.tar/a", "x.tar/b", f"x.tar@{offsets['c.jpg']}"]
    assert "without the end-of-archive marker" in items[2].error
    # two tars concatenated (`cat a.tar b.tar`): the zero blocks between them are not the end
    other = tmp_path / "other.tar"
    _write_wds(other, ["e", "f"])
    (d / "x.tar").write_bytes(raw + other.read_bytes())
    items = list_source("wds", d).items
    assert [it.key for it in items] == [f"x.tar/{k}" for k in "abcdef"]
    assert not any(it.error for it in items)
    # a file with no valid tar header at all is not a damaged tar but a wrong input
    (d / "x.tar").write_bytes(bytes(range(256)) * 40)
    with pytest.raises(SourceError, match="not a tar: no valid member header"):
        list_source("wds", d)


def test_wds_label_limits(tmp_path):
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for key, label in (("a", MAX_CLASSES - 1), ("b", MAX_CLASSES), ("c", 1_000_000)):
            _add(tf, f"{key}.jpg", _jpeg(1))
            _add(tf, f"{key}.cls", str(label).encode())
        _add(tf, "d.jpg", _jpeg(1))
        _add(tf, "d.cls", b"7" + b" " * MAX_LABEL_BYTES)   # a label member of 1 MiB + 1
    src = list_source("wds", tmp_path / "s.tar")
    a, b, c, d = src.items
    assert a.label == MAX_CLASSES - 1 and not a.error
    assert len(src.class_names) == MAX_CLASSES
    for it, label in ((b, MAX_CLASSES), (c, 1_000_000)):
        assert it.label == -1 and f"label {label:,} in {it.key[-1]}.cls" in it.error
        assert "MAX_CLASSES" in it.error
    assert d.label == -1 and "MAX_LABEL_BYTES" in d.error


def test_symlink_loops_are_refused_naming_the_link(tmp_path):
    data = write_jpeg_folder(tmp_path / "data", classes=2, per_class=1)
    (data / "class_0" / "loop").symlink_to("..")
    with pytest.raises(SourceError, match="symlink loop: .*class_0/loop -> \\.\\."):
        list_source("imagefolder", data)
    (data / "class_0" / "loop").unlink()
    (data / "class_1" / "sub").mkdir()
    (data / "class_1" / "sub" / "up").symlink_to(data / "class_1")
    with pytest.raises(SourceError, match="symlink loop: .*class_1/sub/up -> "):
        list_source("imagefolder", data)
    (data / "class_1" / "sub" / "up").unlink()
    # a loop through two links, neither pointing above itself: out -> elsewhere -> back
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "back").symlink_to(data / "class_0")
    (data / "class_0" / "out").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SourceError, match="symlink loop: .*class_0/out/back -> .*class_0, "
                                          ".*class_0/out -> .*elsewhere lead back"):
        list_source("imagefolder", data)


def test_nothing_is_listed_twice_through_symlinks(tmp_path):
    data = write_jpeg_folder(tmp_path / "data", classes=2, per_class=2)
    outside = write_jpeg_folder(tmp_path / "outside", classes=2, per_class=1)
    # links out of the tree assemble a dataset: a class folder, a subfolder, a file
    (data / "class_2").symlink_to(outside / "class_0")
    (data / "class_0" / "extra").symlink_to(outside / "class_1")
    (tmp_path / "loose.JPEG").write_bytes(_jpeg(1))
    (data / "class_1" / "ext.JPEG").symlink_to(tmp_path / "loose.JPEG")
    src = list_source("imagefolder", data)
    assert [(it.key, it.label) for it in src.items] == [
        ("class_0/extra/img_000.JPEG", 0), ("class_0/img_000.JPEG", 0),
        ("class_0/img_001.JPEG", 0), ("class_1/ext.JPEG", 1), ("class_1/img_000.JPEG", 1),
        ("class_1/img_001.JPEG", 1), ("class_2/img_000.JPEG", 2)]
    (data / "class_1" / "ext.JPEG").unlink()
    # a directory reached twice: its files would get two labels
    (data / "class_0" / "also_1").symlink_to("../class_1")
    with pytest.raises(SourceError, match="same directory .*class_0/also_1 -> \\.\\./class_1"):
        list_source("imagefolder", data)
    (data / "class_0" / "also_1").unlink()
    # a file reached twice: through a link into the tree, or through two links
    (data / "class_0" / "dup.JPEG").symlink_to("../class_1/img_000.JPEG")
    with pytest.raises(SourceError, match="same file .*class_0/dup.JPEG -> "):
        list_source("imagefolder", data)
    (data / "class_0" / "dup.JPEG").unlink()
    (data / "class_0" / "one.JPEG").symlink_to(tmp_path / "outside" / "class_0" / "img_000.JPEG")
    (data / "class_1" / "two.JPEG").symlink_to(tmp_path / "outside" / "class_0" / "img_000.JPEG")
    (data / "class_2").unlink()
    with pytest.raises(SourceError, match="class_1/two.JPEG and .*class_0/one.JPEG are the "
                                          "same file"):
        list_source("imagefolder", data)
