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


def expected(spec: CacheSpec, i: int) -> dict:
    """What sample i of a synthetic cache holds, in stored dtypes."""
    s = synthetic_sample(spec, i)
    return {"moments": s["moments"].astype(spec.moments_dtype),
            "tokens": s["tokens"], "cls": s["cls"].astype(np.float16),
            "label": int(s["label"]), "key": s["key"]}
