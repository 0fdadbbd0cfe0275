"""Decode + ADM centre crop: exact recipe, every odd input either decoded or explained."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_bad_folder
from PIL import Image

from pipeline.preprocess import DecodeError, center_crop_arr, decode_items, load_rgb
from pipeline.sources import Item, list_source


def test_adm_crop_recipe():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 520, 3), dtype=np.uint8))
    out = center_crop_arr(img, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    # 300x520 -> BOX halvings while short side >= 128: 150x260 -> 75x130 (stops: 75 < 128);
    # then BICUBIC to short side 64: 64 x round(130 * 64/75) = 111; crop at (111-64)//2 = 23
    ref = img.resize((260, 150), Image.Resampling.BOX).resize((130, 75), Image.Resampling.BOX)
    ref = np.asarray(ref.resize((111, 64), Image.Resampling.BICUBIC))[:, 23:23 + 64]
    np.testing.assert_array_equal(out, ref)
    # a small image is upscaled, never padded
    assert center_crop_arr(Image.new("RGB", (3, 2), (9, 8, 7)), 32).shape == (32, 32, 3)


def test_bad_inputs_each_decoded_or_explained(tmp_path):
    root, cases = write_bad_folder(tmp_path / "bad")
    src = list_source("imagefolder", root)
    assert len(src.items) == len(cases)
    images, failures = decode_items(src.items, 32, views=2)
    assert images.shape == (len(cases), 2, 32, 32, 3)
    for i, it in enumerate(src.items):
        name = it.key.split("/")[-1]
        data, reason = cases[name]
        if reason is None:
            assert i not in failures, (name, failures.get(i))
            want = center_crop_arr(load_rgb(data), 32)
            np.testing.assert_array_equal(images[i, 0], want)
            np.testing.assert_array_equal(images[i, 1], want[:, ::-1])
        else:
            assert reason in failures[i], (name, failures[i])
            assert not images[i].any()


def test_modes_convert_like_pil():
    rng = np.random.default_rng(2)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    for mode in ("L", "RGBA", "CMYK", "P", "LA"):
        buf = io.BytesIO()
        rgb.convert(mode).save(buf, "PNG" if mode != "CMYK" else "TIFF")
        got = load_rgb(buf.getvalue())
        assert got.mode == "RGB" and got.size == (30, 20)
        np.testing.assert_array_equal(np.asarray(got),
                                      np.asarray(Image.open(buf).convert("RGB")))
    # 16-bit grayscale is rescaled by 65535 -> 255 whatever its content (PIL's own convert
    # would saturate everything above 255 to white)
    buf = io.BytesIO()
    Image.fromarray(np.array([[0, 200, 256, 32768, 65535]], np.uint16)).save(buf, "PNG")
    assert np.asarray(load_rgb(buf.getvalue()))[0, :, 0].tolist() == [0, 1, 1, 128, 255]


def test_listing_time_errors_pass_through():
    with pytest.raises(DecodeError, match="empty"):
        load_rgb(b"")
    _, failures = decode_items([Item("t/x", -1, "/t.tar", 0, 0, "no image member")], 16)
    assert failures == {0: "no image member"}


def test_huge_image_refused_from_its_header(tmp_path):
    # 12000 x 12000 = 144 M pixels, 41 KB on disk in mode "1": under PIL's own bomb error
    # (179 M), it used to be decoded at 1.1 GB
    path = tmp_path / "huge.png"
    Image.new("1", (12000, 12000), 1).save(path)
    _, failures = decode_items([Item("huge.png", 0, str(path))], 32)
    assert "12000x12000" in failures.get(0, "") and "MAX_PIXELS" in failures[0], failures
    # refused before the pixels are decoded: the peak memory of a fresh process barely
    # moves (the decoded image alone would be 144 MB, its RGB copy 432 MB more)
    script = ("import resource, sys\n"
              "from pipeline.preprocess import DecodeError, load_rgb\n"
              "data = open(sys.argv[1], 'rb').read()\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "try:\n"
              "    load_rgb(data)\n"
              "except DecodeError:\n"
              "    pass\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", script, str(path)], cwd=root, check=True,
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(root)})
    grown_kb = int(out.stdout.split()[-1])   # ru_maxrss is in KB on Linux
    assert grown_kb < 32 << 10, f"peak memory grew by {grown_kb >> 10} MB"
