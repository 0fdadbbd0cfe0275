"""The demo's last picture: for each class, real demo images beside the samples of that
class, with a caption saying which models made them (`python -m pipeline.demo --figure`).

It reads what `train sample` wrote (samples.npz: uint8 images and their labels;
sample.json: the sampler and checkpoint) and the cache's manifest (the VAE and teacher),
never anything from `train` itself, and checks every size it reads before use.
"""

from __future__ import annotations

import json
import math
import textwrap
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cache.format import atomic_file, read_manifest
from cache.tensors import read_npy_header

from .demo_data import DEMO_CLASSES
from .demo_vae import describe_vae
from .preprocess import center_crop_arr

REAL, FAKE = 3, 5          # tiles per row: real images, then samples
TILE_MAX = 128             # larger samples (256 px with the real SD-VAE) are shrunk to this


class FigureError(ValueError):
    """The inputs of the figure are missing or not what `train sample` writes."""


MAX_SAMPLES = 1 << 24      # labels read whole: 128 MiB of int64 at most
MAX_SETTINGS = 1 << 20     # sample.json: bytes


def _member(zf: zipfile.ZipFile, key: str, npz: Path):
    """The .npy member `key` of an .npz opened (left at its first data byte), with its
    header's shape and dtype, which are checked against the member's stored size before
    anything is allocated: a header may claim any shape."""
    try:
        info = zf.getinfo(f"{key}.npy")
        f = zf.open(info)
        shape, fortran, dtype = read_npy_header(f)
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise FigureError(f"{npz}: {key} is not a readable .npy array "
                          f"({(str(e).splitlines() or [''])[0][:200]})") from None
    count = math.prod(shape)
    if fortran or dtype.hasobject or count * dtype.itemsize != info.file_size - f.tell():
        f.close()
        raise FigureError(f"{npz}: {key} is {dtype} {shape}{' (Fortran order)' * fortran} "
                          f"in {info.file_size:,} bytes: not what train sample writes")
    return f, shape, dtype


def _read(f, nbytes: int, npz: Path, key: str) -> bytes:
    try:
        data = f.read(nbytes)
    except (OSError, EOFError, zipfile.BadZipFile) as e:   # a damaged member
        raise FigureError(f"{npz}: {key} is damaged ({type(e).__name__}: {e})") from None
    if len(data) != nbytes:
        raise FigureError(f"{npz}: {key} is truncated")
    return data


def _samples(folder: Path) -> tuple[dict[int, list[np.ndarray]], int, int, dict]:
    """train sample's output: the first FAKE samples of each demo class (the images are
    streamed: a 50K-sample file is never in memory), their size, the number of samples
    and the settings. Every size is read from the .npy headers and checked first."""
    npz, record = folder / "samples.npz", folder / "sample.json"
    for f in (npz, record):
        if not f.is_file():
            raise FigureError(f"{f}: missing; run `train sample ... --out {folder}` first")
    if record.stat().st_size > MAX_SETTINGS:
        raise FigureError(f"{record}: {record.stat().st_size:,} bytes, not train sample's "
                          "settings (a few hundred bytes)")
    try:
        settings = json.loads(record.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise FigureError(f"{record}: not readable as train sample's output ({e})") from None
    if not isinstance(settings, dict):
        raise FigureError(f"{record}: expected a JSON object (train sample's settings), "
                          f"found {type(settings).__name__}")
    expected = ("expected uint8 [N, S, S, 3] square images (8 <= S <= 1024) and N "
                "integer labels")
    try:
        with zipfile.ZipFile(npz) as zf:
            f, lshape, ldtype = _member(zf, "arr_1", npz)
            with f:
                if len(lshape) != 1 or ldtype.kind not in "iu" or lshape[0] > MAX_SAMPLES:
                    raise FigureError(f"{npz}: {expected}, found labels {ldtype} {lshape}")
                labels = np.frombuffer(_read(f, lshape[0] * ldtype.itemsize, npz, "arr_1"),
                                       ldtype)
            f, shape, dtype = _member(zf, "arr_0", npz)
            with f:
                if not (dtype == np.uint8 and len(shape) == 4 and shape[-1] == 3
                        and 8 <= shape[1] == shape[2] <= 1024 and shape[0] == len(labels)):
                    raise FigureError(f"{npz}: {expected}, found {dtype} {shape} and "
                                      f"{ldtype} {lshape}")
                row = math.prod(shape[1:])
                wanted = {c: min(FAKE, int((labels == c).sum()))
                          for c in range(len(DEMO_CLASSES))}
                mine: dict[int, list[np.ndarray]] = {c: [] for c in wanted}
                for i, label in enumerate(labels.tolist()):
                    if all(len(mine[c]) == wanted[c] for c in wanted):
                        break
                    data = _read(f, row, npz, "arr_0")
                    if label in mine and len(mine[label]) < FAKE:
                        mine[label].append(np.frombuffer(data, np.uint8).reshape(shape[1:]))
    except (OSError, zipfile.BadZipFile) as e:
        raise FigureError(f"{npz}: not readable as train sample's output ({e})") from None
    return mine, shape[1], len(labels), settings


def _text(value, default: str = "-") -> str:
    """A recorded setting as caption text (a damaged file may hold any JSON there)."""
    return default if value is None or isinstance(value, (dict, list)) else str(value)[:80]


def _caption(settings: dict, manifest: dict, vae: str) -> list[str]:
    prov = manifest.get("provenance")
    prov = prov if isinstance(prov, dict) else {}
    teacher = prov.get("teacher")
    teacher = teacher if isinstance(teacher, dict) else {}
    random_all, random_teacher = prov.get("random_weights"), prov.get("random_teacher")
    interval = settings.get("interval")
    if not (isinstance(interval, list) and len(interval) == 2):
        interval = [None, None]
    s = {k: _text(settings.get(k)) for k in ("arch", "method", "step", "weights", "mode",
                                             "steps", "cfg", "seed")}
    return [
        f"Left: {REAL} real demo images of the class (ADM centre crop). Right: samples "
        "generated for that class label.",
        f"Generator: {s['arch']} trained with {s['method']} for "
        f"{s['step']} steps ({s['weights']} weights); sampler: "
        f"{s['mode']}, {s['steps']} steps, CFG {s['cfg']} "
        f"on t in [{_text(interval[0])}, {_text(interval[1])}], seed {s['seed']}.",
        f"Decoder: {vae}" + (" (the cache's VAE was RANDOM-init)" if random_all else "")
        + f". Teacher: {_text(teacher.get('name'), 'None')}"
        + (", RANDOM-init (the alignment targets are noise)" if random_all or random_teacher
           else ", pretrained") + ".",
    ]


def write_figure(out: str | Path, *, cache: Path | None = None, images: Path | None = None,
                 samples: Path | None = None) -> Path:
    """out/figure.png from out/samples, out/images and out/cache (the demo's layout)."""
    out = Path(out)
    cache, images, samples = (cache or out / "cache", images or out / "images",
                              samples or out / "samples")
    fake, size, num, settings = _samples(samples)
    manifest = read_manifest(cache)
    tile = min(TILE_MAX, size)
    font = ImageFont.load_default(size=13)
    name_w, gap, pad, line = 96, 12, 6, 18
    prov, vae = manifest.get("provenance"), settings.get("vae")
    caption = _caption(settings, manifest, describe_vae(
        vae if isinstance(vae, str) and len(vae) <= 4096 else None,
        prov if isinstance(prov, dict) else {}))
    width = name_w + (REAL + FAKE) * (tile + pad) + gap + pad
    # wrap the caption to the figure's width (the default font is ~7.5 px per character)
    per_line = max(40, int(width / 7.5))
    wrapped = [chunk for text in caption for chunk in textwrap.wrap(text, per_line)]
    top, bottom = line + pad, len(wrapped) * line + 2 * pad
    height = top + len(DEMO_CLASSES) * (tile + pad) + bottom
    fig = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(fig)
    draw.text((name_w, pad // 2), "real", fill="black", font=font)
    draw.text((name_w + REAL * (tile + pad) + gap, pad // 2), "generated", fill="black",
              font=font)
    for label, name in enumerate(DEMO_CLASSES):
        y = top + label * (tile + pad)
        draw.text((pad, y + tile // 2 - line // 2), f"{label} {name}", fill="black", font=font)
        folder = images / f"{label:02d}_{name}"
        real = sorted(folder.glob("*.jpg"))[:REAL] if folder.is_dir() else []
        for i, path in enumerate(real):
            try:
                with Image.open(path) as im:
                    arr = center_crop_arr(im.convert("RGB"), tile)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise FigureError(f"{path}: not a readable image ({e}); the demo's images "
                                  "are remade by `python -m pipeline.demo`") from None
            fig.paste(Image.fromarray(arr), (name_w + i * (tile + pad), y))
        mine = fake[label]
        x0 = name_w + REAL * (tile + pad) + gap
        for i, arr in enumerate(mine):
            im = Image.fromarray(arr)
            if im.size[0] != tile:
                im = im.resize((tile, tile), Image.Resampling.BICUBIC)
            fig.paste(im, (x0 + i * (tile + pad), y))
        if len(mine) < FAKE:
            draw.text((x0 + len(mine) * (tile + pad) + pad, y + tile // 2 - line // 2),
                      f"({len(mine)} of {num} drew it)",
                      fill="gray", font=font)
    y = top + len(DEMO_CLASSES) * (tile + pad) + pad
    for text in wrapped:
        draw.text((pad, y), text, fill="black", font=font)
        y += line
    path = out / "figure.png"
    with atomic_file(path) as f:
        fig.save(f, format="PNG")
    return path

