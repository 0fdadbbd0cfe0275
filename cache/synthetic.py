"""Synthetic caches whose values encode their index: for tests, benchmarks and the demo.

Sample i's arrays are drawn from a generator seeded by (seed, i), so any reader can
recompute what sample i must hold, and moments[:, 0, 0, 0] (the first mean value of
every view) equals i exactly (fp16 holds integers up to 2048; beyond, i % 2048).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from .format import ATTN, CLS, KEY, LABEL, MOMENTS, TOKENS, CacheSpec
from .writer import create_cache, finalize_cache


def synthetic_sample(spec: CacheSpec, i: int, seed: int = 0,
                     num_classes: int = 1000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, i])
    v, c, s = spec.views, spec.latent_channels, spec.latent_size
    mean = rng.standard_normal((v, c, s, s), dtype=np.float32) * 5
    std = rng.uniform(0.01, 0.5, (v, c, s, s)).astype(np.float32)
    mean[:, 0, 0, 0] = i % 2048
    tokens = rng.standard_normal((v, spec.tokens, spec.token_dim), dtype=np.float32)
    out = {
        MOMENTS: np.concatenate([mean, std], axis=1),
        TOKENS: tokens,
        CLS: rng.standard_normal((v, spec.token_dim), dtype=np.float32),
        LABEL: np.int64(i * 7919 % num_classes),  # classes spread over the index
        KEY: f"synthetic/{i:08d}.png",
    }
    if spec.attn_blocks:   # q, k [V, L, 2, H, T, d] (fp16: the encoder's output)
        out[ATTN] = rng.standard_normal(spec.fields[ATTN].shape, dtype=np.float32
                                        ).astype(np.float16)
    return out


def synthetic_shard(spec: CacheSpec, shard: int, seed: int = 0) -> dict[str, np.ndarray]:
    start, stop = spec.shard_range(shard)
    rows = [synthetic_sample(spec, i, seed) for i in range(start, stop)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def write_synthetic_cache(root: str | Path, spec: CacheSpec, *, seed: int = 0,
                          failures: Mapping[int, str] | None = None,
                          finalize: bool = True,
                          provenance: Mapping | None = None) -> str | Path:
    """Write every shard of `spec` with synthetic content. `failures` maps global indices
    to reasons: those samples are recorded as failed inputs. `provenance` adds to the
    manifest's (e.g. a VAE config, for tests that decode latents). `root` is a directory
    or an fsspec URL; it is returned as given."""
    writer = create_cache(root, spec, {"dataset": "synthetic", "seed": seed,
                                       "random_weights": True, **(provenance or {})})
    failures = dict(failures or {})
    for k in writer.pending_shards():
        start, stop = spec.shard_range(k)
        local = {i - start: r for i, r in failures.items() if start <= i < stop}
        writer.write_shard(k, synthetic_shard(spec, k, seed), local)
    if finalize:
        finalize_cache(root)
    return root
