"""The demo's own parts: the pooling VAE that makes its pictures readable, and the figure
of real images beside the samples of each class (issue 17)."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import write_structured_cache
from PIL import Image

from cache import CacheSpec
from pipeline import demo
from pipeline.demo_data import DEMO_CLASSES, ensure_demo_images
from pipeline.demo_figure import FAKE, REAL, FigureError, write_figure
from pipeline.demo_vae import (LOGVAR, block_average, is_pooling_vae, pooling_vae,
                               write_pooling_vae)
from pipeline.preprocess import center_crop_arr


def _images(n=3, size=64, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@torch.no_grad()
def test_pooling_vae_encodes_block_averages_and_decodes_them():
    vae, x = pooling_vae(), _images()
    post = vae.encode(x).latent_dist
    assert post.mean.shape == (3, 4, 8, 8)
    torch.testing.assert_close(post.mean[:, :3], torch.nn.functional.avg_pool2d(x, 8),
                               atol=2e-4, rtol=0)
    assert post.mean[:, 3].abs().max() == 0
    same = pooling_vae().state_dict()            # deterministic: no random init left
    assert all(torch.equal(v, same[k]) for k, v in vae.state_dict().items())
    torch.testing.assert_close(post.std, torch.full_like(post.std, np.exp(LOGVAR / 2)))
    out = vae.decode(post.mean).sample
    torch.testing.assert_close(out, block_average(x), atol=5e-4, rtol=0)
    # as the encode job runs it on a GPU (bf16 autocast): within one grey level
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = vae.decode(vae.encode(x).latent_dist.mean).sample.float()
    assert (low - block_average(x)).abs().max() < 1 / 127.5


def test_the_saved_vae_is_what_encode_and_sample_load(tmp_path):
    from pipeline.encoders import build_vae, weights_sha256
    from train.vae import Decoder

    folder = write_pooling_vae(tmp_path / "vae")
    assert is_pooling_vae(folder) and not is_pooling_vae(tmp_path)
    stamp = os.stat(folder / "config.json").st_mtime_ns
    assert write_pooling_vae(folder) == folder      # kept: nothing rewritten
    assert os.stat(folder / "config.json").st_mtime_ns == stamp
    x = _images(2)
    encoder = build_vae(str(folder))                 # as pipeline encode --vae DIR loads it
    with torch.no_grad():
        mean = encoder.encode(x).latent_dist.mean
    decoder = Decoder(str(folder), {"vae": {"weights_sha256": weights_sha256(encoder)}},
                      scale=1.6)
    assert not decoder.warnings                      # the encoder half is the one recorded
    pixels = decoder(mean * 1.6)                     # uint8 [B, H, W, 3]
    expect = (255 * (block_average(x) + 1) / 2).clamp(0, 255).permute(0, 2, 3, 1)
    assert (pixels.float() - expect).abs().max() <= 1
    # a damaged config is not taken for it, and is rewritten
    (folder / "config.json").write_text("{")
    assert not is_pooling_vae(folder) and is_pooling_vae(write_pooling_vae(folder))
    # so are damaged weights under a good config, and a file where the folder should be
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    write_pooling_vae(folder)
    assert build_vae(str(folder)) is not None and weights.stat().st_size > 100
    (tmp_path / "file").write_text("x")
    assert is_pooling_vae(write_pooling_vae(tmp_path / "file"))


@pytest.fixture
def demo_dir(tmp_path):
    """The demo's layout: images/, cache/ (a small cache) and samples/ (train sample's
    files, here with a few samples per class, class 9 missing)."""
    ensure_demo_images(tmp_path / "images", per_class=REAL, num_classes=len(DEMO_CLASSES))
    write_structured_cache(tmp_path / "cache", CacheSpec(num_samples=8, shard_size=8,
                                                         latent_size=8, tokens=16, token_dim=8))
    rng = np.random.default_rng(0)
    labels = np.array([c for c in range(9) for _ in range(FAKE if c else 2)], np.int64)
    images = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
    (tmp_path / "samples").mkdir()
    np.savez(tmp_path / "samples" / "samples.npz", images, labels)
    (tmp_path / "samples" / "sample.json").write_text(json.dumps({
        "arch": "sit-down-tiny/2", "method": "urepa", "step": 800, "weights": "ema",
        "mode": "sde", "steps": 250, "cfg": 1.65, "interval": [0.0, 0.7], "seed": 0,
        "vae": None}))
    return tmp_path, images, labels


def test_the_figure_puts_real_images_beside_each_class_samples(demo_dir):
    root, images, labels = demo_dir
    assert demo.main(["--out", str(root), "--figure"]) == 0
    fig = np.asarray(Image.open(root / "figure.png").convert("RGB"))
    tile, pad, name_w, gap, top = 32, 6, 96, 12, 18 + 6
    assert fig.shape[1] == name_w + (REAL + FAKE) * (tile + pad) + gap + pad
    for label in (0, 3):
        y = top + label * (tile + pad)
        first = sorted((root / "images" / f"{label:02d}_{DEMO_CLASSES[label]}").glob("*.jpg"))[0]
        real = center_crop_arr(Image.open(first).convert("RGB"), tile)
        assert (fig[y:y + tile, name_w:name_w + tile] == real).all()
        x0 = name_w + REAL * (tile + pad) + gap
        mine = images[labels == label]
        assert (fig[y:y + tile, x0:x0 + tile] == mine[0]).all()
    # class 9 drew no sample: its row's sample area holds only the grey note, no colour
    y9 = top + 9 * (tile + pad)
    area = fig[y9:y9 + tile, name_w + REAL * (tile + pad) + gap:].astype(int)
    assert (area.max(-1) == area.min(-1)).all() and (area < 255).any()


def _claiming(shape, dtype=np.uint8) -> bytes:
    """An .npy member whose header claims `shape` over a few bytes of data."""
    import io
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(
        np.dtype(dtype)), "fortran_order": False, "shape": shape})
    return f.getvalue() + bytes(64)


@pytest.mark.parametrize("damage", ["missing", "pickled", "shape", "labels", "huge",
                                    "huge-labels", "settings", "jpeg"])
def test_the_figure_refuses_what_train_sample_did_not_write(demo_dir, damage, capsys):
    import zipfile
    root, images, labels = demo_dir
    npz = root / "samples" / "samples.npz"
    if damage == "missing":
        npz.unlink()
    elif damage == "pickled":   # an object array would need pickle to load: never
        np.savez(npz, np.array([{"a": 1}], dtype=object), labels)
    elif damage == "shape":
        np.savez(npz, images[:, :, :16], labels)
    elif damage == "labels":
        np.savez(npz, images, labels[:-1])
    elif damage.startswith("huge"):   # headers claiming terabytes: refused, not allocated
        n = 10**6
        with zipfile.ZipFile(npz, "w") as z:
            z.writestr("arr_0.npy", _claiming((n, 1024, 1024, 3)))
            z.writestr("arr_1.npy", _claiming((n,), np.int64) if damage == "huge-labels"
                       else _npy(np.zeros(n, np.int64)))
    elif damage == "settings":   # JSON, but not train sample's object of settings
        (root / "samples" / "sample.json").write_text("[1, 2]")
    else:
        first = sorted((root / "images").glob("03_*/*.jpg"))[0]
        first.write_bytes(b"not a jpeg")
    with pytest.raises(FigureError):
        write_figure(root)
    assert demo.main(["--out", str(root), "--figure"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert ("images" if damage == "jpeg" else "samples") in err[0]


def _npy(array) -> bytes:
    import io
    f = io.BytesIO()
    np.lib.format.write_array(f, array)
    return f.getvalue()


def test_the_figure_draws_around_odd_settings_and_labels(demo_dir):
    """sample.json's values are text in a caption: any JSON there draws (no crash on a
    number for the interval or a list for the VAE); labels outside the demo's 10 classes
    are not drawn, and only the first FAKE samples of a class are read."""
    root, images, labels = demo_dir
    (root / "samples" / "sample.json").write_text(json.dumps({
        "interval": 0.5, "vae": [1], "arch": {"x": 1}, "cfg": None, "seed": "s" * 10_000}))
    odd = np.concatenate([labels, [-1, 10, 2**40]])
    more = np.concatenate([images, images[:3]])
    np.savez(root / "samples" / "samples.npz", more, odd)
    fig = np.asarray(Image.open(write_figure(root)).convert("RGB"))
    tile, pad, name_w, gap, top = 32, 6, 96, 12, 18 + 6
    x0 = name_w + REAL * (tile + pad) + gap
    assert (fig[top + 3 * (tile + pad):][:tile, x0:x0 + tile] == images[labels == 3][0]).all()
    (root / "samples" / "sample.json").write_text(json.dumps({"interval": [0.1]}))
    write_figure(root)
