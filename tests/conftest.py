import os
import tempfile

# Hermetic: no test may reach the network or read the user's Hugging Face cache (set before
# huggingface_hub is imported; Ray workers started by the tests inherit it).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="urepa-test-hf-")

import numpy as np
import pytest

from cache import CacheSpec
from cache.synthetic import synthetic_sample, write_synthetic_cache


def small_spec(**overrides) -> CacheSpec:
    """A reduced-size cache: real structure, tiny shapes (T=16 tokens of width 24)."""
    kw = dict(num_samples=70, shard_size=16, chunk_size=4, backends=("zarr", "wds"),
              views=1, latent_channels=4, latent_size=4, tokens=16, token_dim=24)
    kw.update(overrides)
    return CacheSpec(**kw)


@pytest.fixture
def spec():
    return small_spec()


@pytest.fixture
def make_cache(tmp_path):
    """make_cache(name, **spec_overrides, failures=..., finalize=...) -> (path, spec)."""
    def make(name="cache", failures=None, finalize=True, **overrides):
        s = small_spec(**overrides)
        path = write_synthetic_cache(tmp_path / name, s, failures=failures, finalize=finalize)
        return path, s
    return make


def write_structured_cache(root, spec: CacheSpec):
    """A learnable cache: 4 classes, each a fixed latent pattern (+ small posterior std),
    teacher tokens that are a fixed function of that pattern, and a CLS token that is the
    class's own vector plus a little noise, and (with spec.attn_blocks) teacher q, k per
    block and head that are fixed linear maps of the token's patch (spec: 4 latent
    channels, tokens = (latent_size / 2)^2, one view)."""
    from cache import create_cache, finalize_cache
    rng = np.random.default_rng(0)
    n, s, t, d = spec.num_samples, spec.latent_size, spec.tokens, spec.token_dim
    patterns = rng.standard_normal((4, 4, s, s)).astype(np.float32) / 0.18215
    proj = rng.standard_normal((4 * 4, d)).astype(np.float32)
    labels = np.arange(n) % 4
    mean = patterns[labels] + rng.standard_normal((n, 4, s, s)).astype(np.float32)
    g = s // 2
    cls = rng.standard_normal((4, d))[labels] + 0.1 * rng.standard_normal((n, d))   # [n, d]
    patches = mean.reshape(n, 4, g, 2, g, 2).transpose(0, 2, 4, 1, 3, 5).reshape(n, t, 16)
    attn = {}
    if spec.attn_blocks:   # per block and head, q and k a fixed linear map of the patch
        L, H, hd = len(spec.attn_blocks), spec.attn_heads, spec.attn_head_dim
        w_qk = rng.standard_normal((L, 2, H, 16, hd)).astype(np.float32) / 4
        unit = patches / patches.std()
        qk = np.einsum("ntc,lahcd->nlahtd", unit, w_qk) * np.array([2 / hd ** 0.5, 1.0]
                                                                   ).reshape(1, 1, 2, 1, 1, 1)
        attn["attn_qk"] = qk.astype(np.float16)[:, None]     # [n, 1, L, 2, H, t, hd]
    w = create_cache(root, spec, {"random_weights": True, "dataset": "structured"})
    for k in w.pending_shards():
        a, b = spec.shard_range(k)
        w.write_shard(k, {
            "moments": np.concatenate([mean[a:b], np.full_like(mean[a:b], 0.5)], 1)[:, None],
            "tokens": (patches[a:b] @ proj)[:, None], "cls": cls[a:b, None],
            "label": labels[a:b], "key": [f"s/{i}" for i in range(a, b)],
            **{name: x[a:b] for name, x in attn.items()}})
    finalize_cache(root)
    return root


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A random tiny SD-VAE-shaped decoder (the structured cache records no VAE)."""
    from diffusers import AutoencoderKL

    from pipeline.encoders import TINY_VAE_CONFIG
    path = tmp_path_factory.mktemp("vae") / "vae"
    AutoencoderKL(**TINY_VAE_CONFIG).save_pretrained(path)
    return path


def tiny_run_config(cache, run_dir, *extra):
    """A tiny U-REPA training config for 8x8-latent test caches: SiT-down-tiny (4x4 tokens,
    2x2 middle stage), 32-wide teacher tokens, fp32 on the CPU; `extra` overrides win."""
    from train.config import load_config
    return load_config(None, [
        f"run_dir={run_dir}", f"data.cache={cache}", "data.num_workers=0",
        "model.arch=sit-down-tiny/2", "model.latent_size=8", "align.teacher_dim=32",
        "align.projector_dim=64", "mixed_precision=no", "optim.lr=1e-3", "progress=false",
        "log_every=1", *extra])


def expected(spec: CacheSpec, i: int) -> dict:
    """What sample i of a synthetic cache holds, in stored dtypes."""
    s = synthetic_sample(spec, i)
    return {"moments": s["moments"].astype(spec.moments_dtype),
            "tokens": s["tokens"], "cls": s["cls"].astype(np.float16),
            "label": int(s["label"]), "key": s["key"]}


# ---------------------------------------------------------------- image folders for the pipeline

def write_jpeg_folder(root, classes: int = 3, per_class: int = 4, seed: int = 0):
    """root/class_<c>/img_<i>.JPEG: real JPEGs of assorted sizes (some need BOX halving)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = (int(x) for x in rng.integers(40, 200, size=2))
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"img_{i:03d}.JPEG", quality=90)
    return root


# name -> (bytes factory, decodes?) for the bad-input folder; the reason text is checked too
def bad_inputs(tmp):
    import io

    from PIL import Image
    rng = np.random.default_rng(1)

    def save(img, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()

    rgb = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    good = save(rgb, "JPEG", quality=90)
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    pal.info["transparency"] = 0
    gray16 = Image.fromarray((rng.integers(0, 65536, (70, 70))).astype(np.uint16))
    return {
        "a_good.JPEG": (good, None),
        "b_truncated.JPEG": (good[: len(good) // 2], "corrupt image"),
        "c_garbage.JPEG": (good[:20] + rng.bytes(3000), "corrupt image"),
        "d_png_named.JPEG": (save(rgb, "PNG"), None),
        "e_cmyk.JPEG": (save(rgb.convert("CMYK"), "JPEG"), None),
        "f_gray.JPEG": (save(rgb.convert("L"), "JPEG"), None),
        "g_rgba.png": (save(rgb.convert("RGBA"), "PNG"), None),
        "h_palette.png": (save(pal, "PNG"), None),
        "i_empty.JPEG": (b"", "empty file"),
        "j_tiny.JPEG": (save(Image.new("RGB", (1, 1), (200, 10, 10)), "JPEG"), None),
        "k_notes.txt": (b"not an image at all\n" * 10, "not an image"),
        "l_gray16.png": (save(gray16, "PNG"), None),
        "m_strip.png": (save(Image.new("RGB", (2, 100)), "PNG"), "aspect ratio"),
    }


def write_bad_folder(root):
    """One class folder of good and bad files, plus a broken symlink (unreadable)."""
    d = root / "class_0"
    d.mkdir(parents=True)
    cases = bad_inputs(root)
    for name, (data, _) in cases.items():
        (d / name).write_bytes(data)
    (d / "n_unreadable.JPEG").symlink_to(root / "does-not-exist.JPEG")
    cases["n_unreadable.JPEG"] = (None, "unreadable file")
    return root, cases
