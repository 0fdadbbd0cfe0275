"""The encode job: list -> plan -> Ray Data pipeline -> finalize. All Ray settings live here.

    rows (one per pending shard: its keys, labels, file locations)
      -> decode + ADM crop          CPU tasks, one shard per task, all cores   preprocess.py
      -> VAE + teacher              actor pool, one actor per GPU (or CPU)      encoders.py
      -> write the whole shard      CPU tasks; files, then the done marker     cache/writer.py
      -> the driver: progress bar, failure budget, then finalize_cache

One shard is one unit of work from start to end, written by exactly one task (zarr shards
need exactly one writer), so Ray's re-bundling of blocks cannot split a shard, a retried
task rewrites the whole shard, and a rerun skips shards whose done marker exists.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import shlex
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cache import CacheSpec, CacheWriter, create_cache, finalize_cache
from cache.format import read_done_marker

from .encoders import (DEFAULT_TEACHER, DEFAULT_VAE, PRECISIONS, TEACHERS, Encoder,
                       build_teacher, build_vae, teacher_input_size, token_grid,
                       weights_sha256)
from .preprocess import decode_items
from .sources import SOURCES, Item, Source, list_source

FORMATS = {"zarr": ("zarr",), "wds": ("wds",), "both": ("zarr", "wds")}
DTYPES = {"fp16": "float16", "fp32": "float32", "int8": "int8"}


class TooManyFailures(RuntimeError):
    """More samples failed to decode than --max-failures allows."""


@dataclass
class EncodeConfig:
    """Everything `pipeline encode` needs; validated here, each error names its option."""
    out: str
    dataset: str = "imagenet"
    data_dir: str | None = None
    split: str = "train"
    resolution: int = 256
    views: int = 1
    format: str = "zarr"
    vae: str = DEFAULT_VAE
    teacher: str = DEFAULT_TEACHER
    teacher_weights: str | None = None
    random_weights: bool = False
    token_dtype: str = "fp16"
    moments_dtype: str = "fp16"
    shard_size: int = 1024
    batch_size: int | None = None     # None: 256 on GPU, 8 on CPU (caches prefer small)
    num_gpus: int | None = None       # None: every GPU Ray sees; 0: encode on CPUs
    cpu_encoders: int = 1             # encoder actors when there is no GPU
    encoder_threads: int = 1          # torch threads per CPU encoder actor
    precision: str | None = None      # None: bf16 on GPU, fp32 on CPU
    compile: bool = False
    address: str | None = None        # existing Ray cluster; None: embedded local Ray
    num_cpus: int | None = None       # embedded Ray only (default: all cores)
    limit: int | None = None
    max_failures: str = "0.1%"
    seed: int = 0                     # random weights only
    progress: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            value = getattr(self, name)
            shown = "" if value is None else f" {value!r}"
            raise ValueError(f"--{name.replace('_', '-')}{shown}: {why}")
        if self.dataset not in SOURCES:
            bad("dataset", f"choose one of {sorted(SOURCES)}")
        if self.data_dir is None:
            if self.dataset != "demo":
                bad("data_dir", "is required (the image folder or tar directory)")
            self.data_dir = str(Path(self.out).parent / "demo_images")
        if self.resolution < 32 or self.resolution % 32:
            bad("resolution", "must be a multiple of 32 (256 and 512 are the papers')")
        if self.views not in (1, 2):
            bad("views", "must be 1 (image) or 2 (image and its horizontal flip)")
        if self.format not in FORMATS:
            bad("format", f"choose one of {list(FORMATS)}")
        if self.teacher not in TEACHERS:
            bad("teacher", f"choose one of {sorted(TEACHERS)}")
        if self.token_dtype not in ("fp16", "int8"):
            bad("token_dtype", "choose fp16 or int8")
        if self.moments_dtype not in ("fp16", "fp32"):
            bad("moments_dtype", "choose fp16 or fp32")
        if self.precision is not None and self.precision not in PRECISIONS:
            bad("precision", f"choose one of {list(PRECISIONS)}")
        for name in ("shard_size", "batch_size", "cpu_encoders", "encoder_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if self.num_gpus is not None and self.num_gpus < 0:
            bad("num_gpus", "must be >= 0")
        if self.limit is not None and self.limit < 1:
            bad("limit", "must be >= 1")
        try:
            self.failure_budget(1000)
        except ValueError as e:
            bad("max_failures", str(e))

    def failure_budget(self, num_images: int) -> int:
        """--max-failures as a count: "25" or "0.1%" (of the images, rounded down)."""
        text = str(self.max_failures).strip()
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 <= pct <= 100:
                raise ValueError("a percentage must be in [0, 100]")
            return math.floor(num_images * pct / 100 + 1e-9)
        count = int(text)
        if count < 0:
            raise ValueError("must be >= 0")
        return count


@dataclass
class Plan:
    cfg: EncodeConfig
    source: Source
    spec: CacheSpec
    provenance: dict[str, Any]
    hashes: dict[str, str]
    pending: list[int] = field(default_factory=list)

    def describe(self) -> str:
        s, n = self.spec, self.spec.num_samples
        size = n * s.bytes_per_sample * len(s.backends)
        done = s.num_shards - len(self.pending)
        todo = sum(np.subtract(*s.shard_range(k)[::-1]) for k in self.pending)
        return (f"plan: {n:,} images ({self.source.kind} {self.source.split}, "
                f"{len(self.source.class_names)} classes) -> {s.num_shards:,} shard(s) of "
                f"{s.shard_size}; {done} done, {len(self.pending)} to encode ({todo:,} images)"
                f"\n      {s.views} view(s) at {self.cfg.resolution} px: moments "
                f"[{2 * s.latent_channels}, {s.latent_size}, {s.latent_size}] {s.moments_dtype}"
                f", tokens [{s.tokens}, {s.token_dim}] {s.token_dtype}, "
                f"estimated size {size / 1e9:.2f} GB ({'+'.join(s.backends)})")


def _source_of(cfg: EncodeConfig) -> Source:
    return list_source(cfg.dataset, cfg.data_dir, cfg.split, cfg.limit)


def _models(cfg: EncodeConfig):
    vae = build_vae(cfg.vae, random_weights=cfg.random_weights, seed=cfg.seed)
    teacher = build_teacher(cfg.teacher, resolution=cfg.resolution,
                            weights=cfg.teacher_weights, random_weights=cfg.random_weights,
                            seed=cfg.seed)
    return vae, teacher


def make_plan(cfg: EncodeConfig) -> Plan:
    """List the source and load the models once here (fails fast on bad paths and missing
    weights, before any Ray work), and fix the cache spec and provenance."""
    source = _source_of(cfg)
    vae, teacher = _models(cfg)
    hashes = {"vae": weights_sha256(vae), "teacher": weights_sha256(teacher)}
    grid, tspec = token_grid(cfg.resolution), TEACHERS[cfg.teacher]
    spec = CacheSpec(num_samples=len(source.items), shard_size=cfg.shard_size,
                     chunk_size=math.gcd(8, cfg.shard_size), backends=FORMATS[cfg.format],
                     views=cfg.views, latent_channels=vae.config.latent_channels,
                     latent_size=cfg.resolution // 8, tokens=grid * grid,
                     token_dim=teacher.embed_dim, moments_dtype=DTYPES[cfg.moments_dtype],
                     token_dtype=DTYPES[cfg.token_dtype])
    provenance = {
        "random_weights": cfg.random_weights,
        "source": source.provenance(cfg.limit),
        "preprocessing": {
            "resolution": cfg.resolution, "views": cfg.views,
            "decode": "PIL, Image.convert('RGB') (alpha dropped), no EXIF rotation",
            "crop": "ADM centre crop: BOX halving while short side >= 2R, BICUBIC to R, "
                    "centre crop at floor offsets",
            "flip": "view 1 = horizontal flip of the crop" if cfg.views == 2 else None,
            "vae_input": "x / 127.5 - 1",
            "teacher_input": f"x / 255, ImageNet mean/std, bicubic resize to "
                             f"{teacher_input_size(cfg.resolution)} (align_corners=False, "
                             "no antialias)",
        },
        "vae": {"id": "random-init " + cfg.vae if cfg.random_weights else cfg.vae,
                "weights_sha256": hashes["vae"], "stored": "posterior mean and std"},
        "teacher": {"name": cfg.teacher, "timm_arch": tspec.arch, "registers": tspec.registers,
                    "dim": int(teacher.embed_dim), "patch": 14,
                    "input_size": teacher_input_size(cfg.resolution),
                    "pos_embed": f"resampled at load to {grid}x{grid} (bicubic, antialias)",
                    "outputs": "final-norm patch tokens and CLS",
                    "weights_sha256": hashes["teacher"]},
        "precision": cfg.precision or "auto",
    }
    done = {k for k in range(spec.num_shards)
            if all(read_done_marker(cfg.out, b, k) for b in spec.backends)}
    pending = [k for k in range(spec.num_shards) if k not in done]
    return Plan(cfg, source, spec, provenance, hashes, pending)


# ---------------------------------------------------------------- the three stage functions

def shard_row(source: Source, spec: CacheSpec, shard: int) -> dict[str, Any]:
    start, stop = spec.shard_range(shard)
    items = source.items[start:stop]
    return {"shard": shard, "items": json.dumps([list(asdict(it).values()) for it in items])}


def decode_stage(row: dict[str, Any], *, resolution: int, views: int) -> dict[str, Any]:
    items = [Item(*fields) for fields in json.loads(row["items"])]
    images, failures = decode_items(items, resolution, views)
    return {"shard": int(row["shard"]), "images": images,
            "keys": json.dumps([it.key for it in items]),
            "labels": np.array([it.label for it in items], dtype=np.int64),
            "failures": json.dumps(failures)}


class EncodeStage:
    """One per GPU (or CPU encoder): loads the models once, checks they are the planned
    weights, then encodes whole shards."""

    def __init__(self, cfg: dict, hashes: dict[str, str]):
        import torch
        self.cfg = EncodeConfig(**cfg)
        cuda = torch.cuda.is_available()
        if not cuda:
            torch.set_num_threads(self.cfg.encoder_threads)  # fixed: results depend on it
        vae, teacher = _models(self.cfg)
        got = {"vae": weights_sha256(vae), "teacher": weights_sha256(teacher)}
        if got != hashes:
            raise RuntimeError(
                f"encoder on {socket.gethostname()} loaded other weights than the driver "
                f"({got} vs {hashes}): give every node the same HF cache or local paths")
        precision = self.cfg.precision or ("bf16" if cuda else "fp32")
        self.encoder = Encoder(vae, teacher, resolution=self.cfg.resolution,
                               device="cuda" if cuda else "cpu", precision=precision,
                               batch_size=self.cfg.batch_size or (256 if cuda else 8),
                               token_dtype="float32" if self.cfg.token_dtype == "int8"
                               else "float16", compile=self.cfg.compile)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = collections.defaultdict(list)
        for i in range(len(batch["shard"])):
            failures = {int(k): v for k, v in json.loads(str(batch["failures"][i])).items()}
            t0 = time.perf_counter()
            enc = self.encoder.encode_shard(np.asarray(batch["images"][i]), set(failures))
            for name, a in enc.items():
                out[name].append(a)
            out["encode_seconds"].append(time.perf_counter() - t0)
            for name in ("shard", "keys", "labels", "failures"):
                out[name].append(batch[name][i])
        # one shard per call in practice: a[None] adds the batch axis without a 400 MB copy
        return {k: (np.asarray(v[0])[None] if len(v) == 1 else np.stack(v))
                if k not in ("keys", "failures") else np.array(v) for k, v in out.items()}


def write_stage(row: dict[str, Any], *, root: str) -> dict[str, Any]:
    failures = {int(k): v for k, v in json.loads(str(row["failures"])).items()}
    writer = CacheWriter(root)
    shard = int(row["shard"])
    arrays = {"moments": row["moments"], "tokens": row["tokens"], "cls": row["cls"],
              "label": row["labels"], "key": np.array(json.loads(str(row["keys"])))}
    writer.write_shard(shard, arrays, failures)
    marker = read_done_marker(root, writer.spec.backends[0], shard) or {}
    nbytes = sum(f["bytes"] for b in writer.spec.backends
                 for f in (read_done_marker(root, b, shard) or {}).get("files", {}).values())
    return {"shard": shard, "images": len(row["labels"]), "failed": len(failures),
            "bytes": nbytes, "encode_seconds": float(row["encode_seconds"]),
            "failures": json.dumps(marker.get("failures", []))}


# ---------------------------------------------------------------- Ray

def _init_ray(cfg: EncodeConfig) -> bool:
    """Connect to --address or start embedded Ray; True if we started it (and stop it)."""
    import ray
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    kw: dict[str, Any] = dict(logging_level=logging.WARNING, include_dashboard=False)
    if cfg.address:
        ray.init(address=cfg.address, **kw)
    else:
        ray.init(num_cpus=cfg.num_cpus, **kw)
    return True


def _stage_resources(cfg: EncodeConfig) -> dict[str, Any]:
    """Actor pool size and per-actor resources: one actor per GPU, else CPU encoders."""
    import ray
    gpus = int(ray.cluster_resources().get("GPU", 0))
    want = gpus if cfg.num_gpus is None else cfg.num_gpus
    if want > gpus:
        raise ValueError(f"--num-gpus {want}: the Ray cluster has {gpus} GPU(s)")
    if want:
        return dict(size=want, num_gpus=1, num_cpus=1)
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if cfg.cpu_encoders * cfg.encoder_threads >= cpus:
        raise ValueError(f"--cpu-encoders {cfg.cpu_encoders} x --encoder-threads "
                         f"{cfg.encoder_threads} would take all {cpus} CPUs of the Ray "
                         "cluster and leave none for decoding; use fewer")
    return dict(size=cfg.cpu_encoders, num_gpus=0, num_cpus=cfg.encoder_threads)


def build_dataset(plan: Plan, root: str):
    """The Ray Data pipeline over the pending shards (lazy; iterate it to run)."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext
    cfg = plan.cfg
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False   # our own bar counts images, not blocks
    ctx.print_on_execution_start = False
    # ray.data sets its logger up on import; its INFO/WARNING lines would interleave with
    # our bar (errors still show)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    res = _stage_resources(cfg)
    rows = [shard_row(plan.source, plan.spec, k) for k in plan.pending]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    # memory: a decoded shard plus PIL's working copies; also keeps Ray from fusing this
    # CPU stage into the encoder actors (their remote args then differ), so decoding
    # scales over every core of the cluster independently of the GPUs
    shard_bytes = cfg.shard_size * cfg.views * cfg.resolution ** 2 * 3
    ds = ds.map(decode_stage, fn_kwargs=dict(resolution=cfg.resolution, views=cfg.views),
                num_cpus=1, memory=2 * shard_bytes + (512 << 20))  # + the worker itself
    ds = ds.map_batches(EncodeStage, batch_size=1, batch_format="numpy",
                        fn_constructor_kwargs=dict(cfg=asdict(cfg), hashes=plan.hashes),
                        # the next shard queued at the actor; moving a shard in and out
                        # (object store, ~0.2 s) overlaps the encode of the next one
                        compute=ActorPoolStrategy(size=res["size"],
                                                  max_tasks_in_flight_per_actor=2,
                                                  max_concurrent_calls_per_actor=2),
                        num_gpus=res["num_gpus"], num_cpus=res["num_cpus"])
    return ds.map(write_stage, fn_kwargs=dict(root=root), num_cpus=1)


# ---------------------------------------------------------------- the job

def _failure_summary(failures: list[dict]) -> str:
    reasons = collections.Counter(f["reason"].split(":")[0] for f in failures)
    first = "; ".join(f"{f['key']}: {f['reason']}" for f in failures[:3])
    return (", ".join(f"{n} x {r}" for r, n in reasons.most_common(5))
            + (f" (first: {first})" if first else ""))


def _done_failures(root: Path, spec: CacheSpec, shards: list[int]) -> list[dict]:
    out = []
    for k in shards:
        mk = read_done_marker(root, spec.backends[0], k)
        out += mk["failures"] if mk else []
    return out


def run_encode(cfg: EncodeConfig, *, plan: Plan | None = None, log=print) -> dict[str, Any]:
    """Plan, create or resume the cache, encode the pending shards on Ray, finalize.

    Returns the summary (also stored in the manifest). Raises TooManyFailures (the cache
    stays incomplete, its done shards kept) when failures exceed the budget."""
    root = Path(cfg.out)
    if root.is_dir() and any(root.iterdir()) and not (root / "manifest.json").exists():
        raise ValueError(f"--out {root} exists and is not a cache; give a new or empty "
                         "directory (a typo must not write into a dataset)")
    plan = plan or make_plan(cfg)
    writer = create_cache(root, plan.spec, {
        **plan.provenance,
        "command": {"argv": shlex.join(sys.argv), "data_dir": str(cfg.data_dir),
                    "teacher_weights": cfg.teacher_weights, "address": cfg.address},
        "host": socket.gethostname()})
    plan.pending = writer.pending_shards()
    log(plan.describe())
    budget = cfg.failure_budget(plan.spec.num_samples)
    done = [k for k in range(plan.spec.num_shards) if k not in set(plan.pending)]
    failures = _done_failures(root, plan.spec, done)
    stats = {"images": 0, "failed": 0, "bytes": 0, "encode_seconds": 0.0}
    t0 = time.perf_counter()
    if plan.pending:
        stats = _run_pipeline(plan, root, failures, budget, log)
    elapsed = time.perf_counter() - t0
    if len(failures) > budget:
        raise TooManyFailures(_too_many(len(failures), budget, plan.spec.num_samples, failures))
    summary = {"images": stats["images"], "failed": len(failures),
               "bytes_written": stats["bytes"], "seconds": round(elapsed, 2),
               "images_per_second": round(stats["images"] / elapsed, 2) if elapsed else None,
               "steady_images_per_second": round(stats.get("steady_images_per_second", 0), 2),
               "shards_encoded": len(plan.pending), "shards_total": plan.spec.num_shards}
    m = finalize_cache(root, {"summary": summary})
    total = sum(f["bytes"] for t in m["shards"].values() for s in t for f in s["files"].values())
    log(f"done: {summary['images']:,} images encoded in {elapsed:.1f} s "
        f"({summary['images_per_second'] or 0:.1f} img/s), {m['num_valid']:,} valid, "
        f"{len(failures)} failed{' (' + _failure_summary(failures) + ')' if failures else ''}"
        f"; cache {total / 1e9:.3f} GB at {root}")
    return summary


def _too_many(n: int, budget: int, total: int, failures: list[dict]) -> str:
    return (f"{n} of {total} images failed to decode, more than --max-failures allows "
            f"({budget}): {_failure_summary(failures)}. Check --data-dir and the files; "
            "raise --max-failures to accept them (done shards are kept, a rerun resumes)")


def _run_pipeline(plan: Plan, root: Path, failures: list[dict], budget: int, log
                  ) -> dict[str, Any]:
    import ray
    from tqdm import tqdm
    started = _init_ray(plan.cfg)
    todo = sum(np.subtract(*plan.spec.shard_range(k)[::-1]) for k in plan.pending)
    stats = {"images": 0, "failed": 0, "bytes": 0, "encode_seconds": 0.0}
    t0 = time.perf_counter()
    first: tuple[float, int] | None = None   # (time, images) when the first shard landed
    bar = tqdm(total=int(todo), unit="img", disable=not plan.cfg.progress, smoothing=0.1,
               dynamic_ncols=True, desc="encode")
    try:
        for row in build_dataset(plan, str(root)).iter_rows():
            for k in ("images", "failed", "bytes", "encode_seconds"):
                stats[k] += row[k]
            failures += json.loads(row["failures"])
            if first is None:
                first = (time.perf_counter(), stats["images"])
            bar.update(int(row["images"]))
            bar.set_postfix(failed=len(failures), GB=f"{stats['bytes'] / 1e9:.2f}")
            if len(failures) > budget:
                raise TooManyFailures(_too_many(len(failures), budget,
                                                plan.spec.num_samples, failures))
    finally:
        bar.close()
        if started:
            ray.shutdown()
    # throughput after the first shard: excludes Ray start-up and model loading
    if first is not None and stats["images"] > first[1]:
        last = time.perf_counter()
        stats["steady_images_per_second"] = (stats["images"] - first[1]) / (last - first[0])
        stats["startup_seconds"] = first[0] - t0
    return stats
