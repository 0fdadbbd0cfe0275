"""Listing image sources: sorted, stable, labelled; wrong layouts fail with clear errors."""

import io
import tarfile

import pytest
from conftest import write_jpeg_folder
from PIL import Image

from pipeline.demo_data import ensure_demo_images
from pipeline.sources import SourceError, list_source, read_bytes


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
