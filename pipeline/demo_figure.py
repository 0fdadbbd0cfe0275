"""The demo's last picture: for each class, real demo images beside the samples of that
class, with a caption saying which models made them (`python -m pipeline.demo --figure`).

It reads what `train sample` wrote (samples.npz: uint8 images and their labels;
sample.json: the sampler and checkpoint) and the cache's manifest (the VAE and teacher),
never anything from `train` itself, and checks every size it reads before use.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cache.format import atomic_file, read_manifest

from .demo_data import DEMO_CLASSES
from .demo_vae import describe_vae
from .preprocess import center_crop_arr

REAL, FAKE = 3, 5          # tiles per row: real images, then samples
TILE_MAX = 128             # larger samples (256 px with the real SD-VAE) are shrunk to this


class FigureError(ValueError):
    """The inputs of the figure are missing or not what `train sample` writes."""


def _samples(folder: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    npz, record = folder / "samples.npz", folder / "sample.json"
    for f in (npz, record):
        if not f.is_file():
            raise FigureError(f"{f}: missing; run `train sample ... --out {folder}` first")
    try:
        with np.load(npz, allow_pickle=False) as z:
            images, labels = z["arr_0"], z["arr_1"]
        settings = json.loads(record.read_text())
    except (OSError, ValueError, KeyError) as e:
        raise FigureError(f"{folder}: not readable as train sample's output ({e})") from None
    ok = (images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3
          and 8 <= images.shape[1] == images.shape[2] <= 1024
          and labels.ndim == 1 and labels.shape[0] == images.shape[0]
          and np.issubdtype(labels.dtype, np.integer) and isinstance(settings, dict))
    if not ok:
        raise FigureError(f"{npz}: expected uint8 [N, S, S, 3] square images and N integer "
                          f"labels, found {images.dtype} {images.shape} and "
                          f"{labels.dtype} {labels.shape}")
    return images, labels, settings


def _caption(settings: dict, manifest: dict, vae: str) -> list[str]:
    prov = manifest.get("provenance", {})
    teacher = prov.get("teacher", {})
    random_teacher = prov.get("random_weights") or prov.get("random_teacher")
    interval = settings.get("interval") or ["-", "-"]
    return [
        f"Left: {REAL} real demo images of the class (ADM centre crop). Right: samples "
        "generated for that class label.",
        f"Generator: {settings.get('arch')} trained with {settings.get('method')} for "
        f"{settings.get('step')} steps ({settings.get('weights')} weights); sampler: "
        f"{settings.get('mode')}, {settings.get('steps')} steps, CFG {settings.get('cfg')} "
        f"on t in [{interval[0]}, {interval[1]}], seed {settings.get('seed')}.",
        f"Decoder: {vae}. Teacher: {teacher.get('name')}"
        + (", RANDOM-init (the alignment targets are noise)" if random_teacher
           else ", pretrained") + ".",
    ]


def write_figure(out: str | Path, *, cache: Path | None = None, images: Path | None = None,
                 samples: Path | None = None) -> Path:
    """out/figure.png from out/samples, out/images and out/cache (the demo's layout)."""
    out = Path(out)
    cache, images, samples = (cache or out / "cache", images or out / "images",
                              samples or out / "samples")
    fake, labels, settings = _samples(samples)
    manifest = read_manifest(cache)
    tile = min(TILE_MAX, fake.shape[1])
    font = ImageFont.load_default(size=13)
    name_w, gap, pad, line = 96, 12, 6, 18
    caption = _caption(settings, manifest, describe_vae(settings.get("vae"),
                                                        manifest.get("provenance", {})))
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
            with Image.open(path) as im:
                arr = center_crop_arr(im.convert("RGB"), tile)
            fig.paste(Image.fromarray(arr), (name_w + i * (tile + pad), y))
        mine = fake[labels == label][:FAKE]
        x0 = name_w + REAL * (tile + pad) + gap
        for i, arr in enumerate(mine):
            im = Image.fromarray(arr)
            if im.size[0] != tile:
                im = im.resize((tile, tile), Image.Resampling.BICUBIC)
            fig.paste(im, (x0 + i * (tile + pad), y))
        if len(mine) < FAKE:
            draw.text((x0 + len(mine) * (tile + pad) + pad, y + tile // 2 - line // 2),
                      f"({len(mine)} of {len(labels)} drew it)",
                      fill="gray", font=font)
    y = top + len(DEMO_CLASSES) * (tile + pad) + pad
    for text in wrapped:
        draw.text((pad, y), text, fill="black", font=font)
        y += line
    path = out / "figure.png"
    with atomic_file(path) as f:
        fig.save(f, format="PNG")
    return path

