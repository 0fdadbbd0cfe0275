"""The trainer's side of the cache contract: check a cache against the config, load batches.

Everything the model's shapes depend on is compared before any step runs, and every
mismatch is reported at once, each naming the cache's value and the config key.
"""

from __future__ import annotations

from dataclasses import dataclass

from cache import CacheDataset, CacheLoader, LoaderConfig, NotACacheError, open_cache
from cache.format import INDEX, LABEL, LATENT_SCALE, MOMENTS

from .config import ConfigError, TrainConfig


@dataclass
class CacheCheck:
    latent_scale: float
    warnings: list[str]
    summary: str


def open_training_cache(cfg: TrainConfig) -> CacheDataset:
    """The cache `data.cache` names; when there is none there, the error says how to point
    at one or build one."""
    try:
        return open_cache(cfg.data.cache, backend=cfg.data.backend)
    except NotACacheError as e:
        raise NotACacheError(
            f"data.cache: {e}. Point data.cache= at a cache (`train run "
            "CONFIG data.cache=/path/to/cache`), or build one with `pipeline encode "
            "--dataset imagenet --data-dir DIR --out /path/to/cache` (docs/encode.md; "
            "`make demo` builds a small one)") from None


def check_cache(ds: CacheDataset, cfg: TrainConfig) -> CacheCheck:
    """Compare the cache's manifest with the config (and its method's needs). Raises
    ConfigError listing every mismatch; returns the latent scale to apply and warnings
    (e.g. random-weight caches)."""
    from .methods import build_method
    spec, man = ds.spec, ds.manifest
    prov = man.get("provenance", {})
    m = cfg.model
    method = build_method(cfg.align, cfg.method_args, m)
    errors, warnings = [], []
    if spec.latent_channels != m.in_channels:
        errors.append(f"latent channels: cache {spec.latent_channels} vs "
                      f"model.in_channels={m.in_channels}")
    res = prov.get("preprocessing", {}).get("resolution")
    if spec.latent_size != m.latent_size:
        errors.append(f"latent size: cache {spec.latent_size}x{spec.latent_size}"
                      + (f" (from {res} px images)" if res else "")
                      + f" vs model.latent_size={m.latent_size}")
    if cfg.data.resolution is not None and res is not None and res != cfg.data.resolution:
        errors.append(f"resolution: cache {res} px vs data.resolution={cfg.data.resolution}")
    classes = prov.get("source", {}).get("num_classes")
    if classes is not None and classes > m.num_classes:
        errors.append(f"classes: cache has {classes} vs model.num_classes={m.num_classes}")
    errors += method.check_cache(spec, m.arch, m.latent_size)
    if errors:
        raise ConfigError(f"cache {ds.root} does not fit the config:\n  " + "\n  ".join(errors))
    if prov.get("random_weights"):
        warnings.append(f"cache {ds.root} was encoded with RANDOM weights (--random-weights): "
                        "fine for smoke tests, meaningless for real training")
    elif prov.get("random_teacher"):
        warnings.append(f"cache {ds.root}: its teacher tokens come from a RANDOM-init teacher "
                        "(--random-teacher): the alignment term trains toward noise; fine for "
                        "the demo, meaningless for real training")
    if ds.failures:
        warnings.append(f"{len(ds.failures)} sample(s) failed at encode time and are skipped")
    scale = float(man.get("latent", {}).get("scale", LATENT_SCALE))
    summary = (f"cache {ds.root}: {ds.num_valid:,} samples, latent {spec.latent_channels}x"
               f"{spec.latent_size}x{spec.latent_size} (scale {scale}), teacher tokens "
               f"{spec.tokens}x{spec.token_dim}" + (f", {res} px" if res else ""))
    return CacheCheck(scale, warnings, summary)


def cache_info(ds: CacheDataset) -> dict:
    """What sampling needs to know of the cache that trained a model, kept in every
    checkpoint (the cache itself may be gone by then): its VAE (weights hash, config,
    hub id or path, random-init seed) and resolution."""
    prov = ds.manifest.get("provenance", {})
    command = prov.get("command", {})
    return {"root": str(ds.root), "random_weights": bool(prov.get("random_weights")),
            "resolution": prov.get("preprocessing", {}).get("resolution"),
            "vae": {**prov.get("vae", {}), "name": command.get("vae"),
                    "seed": command.get("seed")}}


def make_loader(ds: CacheDataset, cfg: TrainConfig, *, rank: int, world_size: int,
                teacher_fields: tuple[str, ...]) -> CacheLoader:
    """Per-rank loader of the rank's share of each global batch (batch_size / world_size
    samples: its streams' parts, see cache/loader.py); the trainer cuts it into
    micro-batches. It reads the moments, labels and indices, and the `teacher_fields`
    the method needs at the step it starts from (Method.fields_at)."""
    fields = (MOMENTS, LABEL, INDEX) + tuple(teacher_fields)
    streams = cfg.data.streams or world_size
    per_stream = cfg.batch_size // streams
    window = max(per_stream, cfg.data.shuffle_buffer // per_stream * per_stream)
    return CacheLoader(ds, LoaderConfig(
        batch_size=cfg.batch_size // world_size, fields=fields, seed=cfg.seed,
        block_size=cfg.data.block_size, shuffle_buffer=window * (streams // world_size),
        view=cfg.data.view, num_workers=cfg.data.num_workers, backend=cfg.data.backend,
        verify=cfg.data.verify_reads),
        rank=rank, world_size=world_size, streams=streams)
