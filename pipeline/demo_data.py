"""The demo image set: small labelled JPEGs generated on the spot (no download).

Ten classes, each a shape in its own colour family on a greyish textured background, at varied
sizes and aspect ratios so that the ADM centre crop has real work to do. Generation is
deterministic (seeded per image), so two machines produce the same files byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .sources import SourceError

DEMO_CLASSES = ("circle", "square", "triangle", "ring", "cross",
                "stripes", "checker", "diamond", "dots", "bars")
_DONE = ".complete"


def _hue_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return int(r * 255), int(g * 255), int(b * 255)


def demo_image(label: int, index: int, seed: int = 0) -> Image.Image:
    """Image `index` of class `label`: an RGB PIL image of 80-240 px per side."""
    rng = np.random.default_rng([seed, label, index])
    w, h = (int(x) for x in rng.integers(80, 241, size=2))
    # a greyish background (random brightness, a slight tint) under a saturated shape
    base = rng.uniform(30, 225) + rng.uniform(-20, 20, size=3)
    noise = rng.normal(0, 12, size=(h, w, 3)) + base
    img = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    color = _hue_rgb((label / len(DEMO_CLASSES) + rng.uniform(-0.03, 0.03)) % 1.0,
                     rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0))
    cx, cy = w * rng.uniform(0.35, 0.65), h * rng.uniform(0.35, 0.65)
    r = min(w, h) * rng.uniform(0.2, 0.4)
    box = (cx - r, cy - r, cx + r, cy + r)
    name = DEMO_CLASSES[label % len(DEMO_CLASSES)]
    if name == "circle":
        draw.ellipse(box, fill=color)
    elif name == "square":
        draw.rectangle(box, fill=color)
    elif name == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    elif name == "ring":
        draw.ellipse(box, outline=color, width=max(2, int(r / 3)))
    elif name == "cross":
        draw.rectangle((cx - r, cy - r / 4, cx + r, cy + r / 4), fill=color)
        draw.rectangle((cx - r / 4, cy - r, cx + r / 4, cy + r), fill=color)
    elif name == "stripes":
        step = max(4, int(r / 3))
        for x in range(0, w, 2 * step):
            draw.rectangle((x, 0, x + step - 1, h), fill=color)
    elif name == "checker":
        step = max(4, int(r / 2))
        for y in range(0, h, step):
            for x in range((y // step % 2) * step, w, 2 * step):
                draw.rectangle((x, y, x + step - 1, y + step - 1), fill=color)
    elif name == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)
    elif name == "dots":
        for _ in range(12):
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            d = r / 4
            draw.ellipse((x - d, y - d, x + d, y + d), fill=color)
    else:  # bars
        step = max(4, int(r / 3))
        for y in range(0, h, 2 * step):
            draw.rectangle((0, y, w, y + step - 1), fill=color)
    return img


def write_demo_images(root: str | Path, per_class: int = 32, num_classes: int = 10,
                      seed: int = 0) -> Path:
    """Write root/<class>/<class>_<i>.jpg; a marker file written last says it finished."""
    root = Path(root)
    for label in range(num_classes):
        folder = root / f"{label:02d}_{DEMO_CLASSES[label % len(DEMO_CLASSES)]}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            demo_image(label, i, seed).save(folder / f"{folder.name}_{i:04d}.jpg", quality=90)
    (root / _DONE).write_text(f"{num_classes} classes x {per_class} images, seed {seed}\n")
    return root


def ensure_demo_images(root: str | Path, per_class: int = 32, num_classes: int = 10) -> Path:
    """Generate the demo set in `root` unless a finished one is already there. Nothing is
    ever deleted: an interrupted generation is simply written over (same bytes), and a
    directory holding anything else is refused."""
    root = Path(root)
    if not (root / _DONE).exists():
        ours = {f"{label:02d}_{DEMO_CLASSES[label % len(DEMO_CLASSES)]}"
                for label in range(num_classes)}
        other = [p.name for p in root.iterdir() if p.name not in ours] if root.exists() else []
        if other:
            raise SourceError(f"--data-dir {root} holds other files ({other[:3]}); give the "
                              "demo a new or empty directory")
        write_demo_images(root, per_class, num_classes)
    return root
