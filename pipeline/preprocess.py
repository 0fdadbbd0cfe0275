"""Decode and crop (the CPU stage): image bytes -> uint8 [n, V, R, R, 3] plus failures.

Exactly REPA's preprocessing (methods.md section 1): decode with PIL, convert to RGB
(CMYK, grayscale, palette and RGBA all go through `Image.convert("RGB")`, which drops
alpha as REPA does), then the ADM centre crop. No EXIF rotation and no augmentation;
view 1, when asked for, is the horizontal flip of the crop.

A sample that cannot be decoded is not an error of the job: its reason is returned and
its slot stays zero. Sizes read from a file are bounded before memory is spent on them: an
image above MAX_PIXELS is refused from its header, before its pixels are decoded, and one
whose aspect ratio exceeds MAX_ASPECT before it is resized. Nothing here touches torch or Ray.
"""

from __future__ import annotations

import io
import warnings
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .sources import Item, read_bytes

# an image whose long side would exceed this many crop sizes after resizing is refused
# (a 1 x 100000 strip would otherwise ask for a 256 x 25.6M intermediate image)
MAX_ASPECT = 32
# an image with more pixels than this is refused from its header, before its pixels are
# decoded: a single-colour 12000 x 12000 PNG is a few hundred KB on disk and took 1.1 GB
# to decode. 8192 x 8192 (67.1 M) is above any camera photo found in datasets (a 61 MP
# full-frame sensor is 9504 x 6336 = 60.2 M) and bounds one decode of 8-bit RGB to ~400 MB
# (the image and its RGB copy), inside the decode stage's 512 MB per-task headroom. PIL's
# own bomb check (Image.MAX_IMAGE_PIXELS, 89.5 M; an error only above twice that, 179 M)
# let 144 M through with a warning.
MAX_PIXELS = 8192 * 8192


class DecodeError(ValueError):
    """This sample cannot become an image; the message is the reason kept in the manifest."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit integer (PNG/TIFF, opened as I;16 or I) or float [0, 1] grayscale: PIL's
        # convert would clip at 255; rescale to 8 bits, independently of the content
        a = np.asarray(img, dtype=np.float64)
        a = a * 255.0 if img.mode == "F" else a / 257.0   # 65535 -> 255
        img = Image.fromarray(np.round(np.clip(a, 0, 255)).astype(np.uint8), "L")
    with warnings.catch_warnings():  # "palette images with transparency" is expected
        warnings.simplefilter("ignore", UserWarning)
        return img.convert("RGB")


def load_rgb(data: bytes) -> Image.Image:
    """Decode image bytes fully (truncation is detected here) and convert to RGB."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns from 89.5 M pixels; MAX_PIXELS refuses such images just below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
        with img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise DecodeError(
                    f"image of {w}x{h} pixels ({w * h / 1e6:.1f} M) is above the limit of "
                    f"{MAX_PIXELS / 1e6:.1f} M pixels (MAX_PIXELS in pipeline/preprocess.py), "
                    "refused before decoding; downscale it to include it")
            img.load()
            return _to_rgb(img)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError(f"not an image (unrecognized format, {len(data)} bytes)") from None
    except Image.DecompressionBombError as e:
        raise DecodeError(f"refused as a decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DecodeError(f"corrupt image: {e}") from None


def center_crop_arr(img: Image.Image, size: int) -> np.ndarray:
    """ADM centre crop: halve with BOX while the short side is >= 2*size, resize the short
    side to `size` with BICUBIC (each side rounded), crop size x size at the floor centre."""
    w, h = img.size
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise DecodeError(f"aspect ratio {w}x{h} exceeds {MAX_ASPECT}:1")
    while min(img.size) >= 2 * size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.Resampling.BOX)
    scale = size / min(img.size)
    img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)),
                     resample=Image.Resampling.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def decode_item(item: Item, resolution: int) -> np.ndarray:
    """One item -> uint8 [R, R, 3]; raises DecodeError with the reason."""
    if item.error:
        raise DecodeError(item.error)
    try:
        data = read_bytes(item)
    except OSError as e:
        raise DecodeError(f"unreadable file: {e.strerror or e}") from None
    return center_crop_arr(load_rgb(data), resolution)


def decode_items(items: Sequence[Item], resolution: int, views: int = 1
                 ) -> tuple[np.ndarray, dict[int, str]]:
    """Decode a shard's items -> (uint8 [n, views, R, R, 3], {offset: reason}).

    Rows of failed items are zero. View 1 is the horizontal flip of view 0's crop."""
    if views not in (1, 2):
        raise ValueError(f"views must be 1 or 2, got {views}")
    out = np.zeros((len(items), views, resolution, resolution, 3), dtype=np.uint8)
    failures: dict[int, str] = {}
    for i, item in enumerate(items):
        try:
            out[i, 0] = decode_item(item, resolution)
        except DecodeError as e:
            failures[i] = str(e)
            continue
        if views == 2:
            out[i, 1] = out[i, 0, :, ::-1]
    return out, failures
