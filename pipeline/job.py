"""The encode job: list -> plan -> Ray Data pipeline -> finalize. All Ray settings live here.

    rows (one per pending shard: its keys, labels, file locations)
      -> decode + ADM crop          CPU tasks, one shard per task, all cores   preprocess.py
      -> VAE + teacher              actor pool, one actor per GPU (or CPU)      encoders.py
      -> write the whole shard      CPU tasks; files, then the done marker     cache/writer.py
      -> the driver: progress bar, failure budget, then finalize_cache

The driver holds the cache's lock (cache/lock.py) from before it creates the cache until
after it finalizes it, so a second job on the same --out is refused; each write task
checks the lock's token before writing its shard.

One shard is one unit of work from start to end, written by exactly one task (zarr shards
need exactly one writer), so Ray's re-bundling of blocks cannot split a shard, a retried
task rewrites the whole shard, and a rerun skips shards whose done marker exists.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import math
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache import CacheSpec, create_cache, finalize_cache
from cache.format import MANIFEST_NAME, done_shards, read_done_marker
from cache.lock import LOCK_NAME, CacheLock, LockLostError, check_token
from cache.store import Store, is_url
from cache.writer import check_resumable

from .encoders import (DEFAULT_TEACHER, DEFAULT_VAE, PRECISIONS, TEACHERS, WeightsError,
                       check_attn_blocks, teacher_input_size, token_grid, weights_sha256)
from .sources import SOURCES, Source, list_source
from .stages import EncodeStage, build_models, decode_stage, shard_row, write_stage

FORMATS = {"zarr": ("zarr",), "wds": ("wds",), "both": ("zarr", "wds")}
DTYPES = {"fp16": "float16", "fp32": "float32", "int8": "int8"}


class TooManyFailures(RuntimeError):
    """More samples failed to decode than --max-failures allows."""


class DiskFullError(RuntimeError):
    """The cache's storage ran out of space (or quota, or file size limit) during the job;
    the shards already done are kept and a rerun resumes."""


# a full disk, a full quota, a file over the file system's or RLIMIT_FSIZE's size limit:
# all mean "make room, then rerun", none is a bug
NO_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EFBIG: "file too large for the file system or the process's file size "
                         "limit (ulimit -f)"}


def no_space_error(e: BaseException) -> OSError | None:
    """The OSError saying the storage is full somewhere in `e`'s chain, or None.

    Follows `__cause__`/`__context__` and Ray's `RayTaskError.cause`: `ray.get` of a task
    that raised OSError re-raises a RayTaskError(OSError) whose `cause` is the original
    (errno and filename intact). Ray Data is different: it wraps a failing task's error
    in UserCodeException and only the worker's traceback text crosses to the driver, so
    the write stage reports a full disk in its output row instead (`locked_write_stage`)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in NO_SPACE:
            return x
        todo += [getattr(x, "cause", None), x.__cause__, x.__context__]
    return None


def _no_space_message(root: Store, code: int, strerror: str | None, filename: str | None,
                      shard: int | None = None, host: str | None = None) -> str:
    where = ", ".join(w for w in (f"file {filename}" if filename else None,
                                  f"shard {shard}" if shard is not None else None,
                                  f"on {host}" if host else None) if w)
    return (f"{NO_SPACE[code]} while writing {root} ({where + ': ' if where else ''}"
            f"[Errno {code}] {strerror}): the shards already done are kept; free space and "
            "rerun the same command to resume")


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
    random_teacher: bool = False      # only the teacher random-init (the demo)
    token_dtype: str = "fp16"
    moments_dtype: str = "fp16"
    teacher_attn: tuple[int, ...] = ()  # teacher blocks whose q, k are stored (HASTE)
    attn_dtype: str = "fp16"
    shard_size: int = 1024
    batch_size: int | None = None     # None: 256 * (256/R)^2 on GPU, 8 on CPU
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
    break_lock: bool = False          # take the cache's lock even from a live-looking job

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            value = getattr(self, name)
            shown = "" if value is None else f" {value!r}"
            raise ValueError(f"--{name.replace('_', '-')}{shown}: {why}")
        if self.dataset not in SOURCES:
            bad("dataset", f"choose one of {sorted(SOURCES)}")
        if self.data_dir is None:
            if self.dataset != "demo" or is_url(self.out):
                bad("data_dir", "is required (the image folder or tar directory)")
            self.data_dir = str(Path(self.out).parent / "demo_images")
        # absolute: Ray workers on other nodes (or `ray job submit`) have another cwd
        if not is_url(self.out):   # an fsspec URL (s3://bucket/in1k-256) stays as it is
            self.out = os.path.abspath(self.out)
        self.data_dir = os.path.abspath(self.data_dir)
        if self.teacher_weights is not None:
            if self.random_teacher or self.random_weights:   # the weights would be ignored
                bad("teacher_weights", "cannot go with --random-teacher or --random-weights "
                                       "(the teacher is then random-init): drop one")
            self.teacher_weights = os.path.abspath(self.teacher_weights)
        if os.path.exists(self.vae):
            self.vae = os.path.abspath(self.vae)
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
        self.teacher_attn = tuple(self.teacher_attn)
        if self.attn_dtype not in ("fp16", "int8"):
            bad("attn_dtype", "choose fp16 or int8")
        if self.attn_dtype != "fp16" and not self.teacher_attn:
            bad("attn_dtype", "is the storage of --teacher-attn, which is not given (the "
                              "cache would hold no attention): add --teacher-attn B,...")
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
    missing_weights: str | None = None   # a dry run without the weights: why (the plan
    #                                      then assumes the architectures' shapes)

    @property
    def pending_images(self) -> int:
        return sum(b - a for a, b in map(self.spec.shard_range, self.pending))

    def describe(self) -> str:
        s, n = self.spec, self.spec.num_samples
        size = n * s.bytes_per_sample * len(s.backends)
        done, todo = s.num_shards - len(self.pending), self.pending_images
        return (f"plan: {n:,} images ({self.source.kind} {self.source.split}, "
                f"{len(self.source.class_names)} classes) -> {s.num_shards:,} shard(s) of "
                f"{s.shard_size}; {done} done, {len(self.pending)} to encode ({todo:,} images)"
                f"\n      {s.views} view(s) at {self.cfg.resolution} px: moments "
                f"[{2 * s.latent_channels}, {s.latent_size}, {s.latent_size}] {s.moments_dtype}"
                f", tokens [{s.tokens}, {s.token_dim}] {s.token_dtype}, "
                + (f"attention q, k of teacher blocks {list(s.attn_blocks)} [2, "
                   f"{s.attn_heads}, {s.tokens}, {s.attn_head_dim}] {s.attn_dtype}, "
                   if s.attn_blocks else "")
                + f"estimated size {size / 1e9:.2f} GB ({'+'.join(s.backends)})")


def attn_spec(cfg: EncodeConfig, teacher) -> dict[str, Any]:
    """The CacheSpec keys of --teacher-attn: the blocks (checked against the teacher), its
    heads and head width, the storage dtype."""
    blocks = check_attn_blocks(teacher, cfg.teacher_attn)
    if not blocks:
        return {}
    attn = teacher.blocks[0].attn
    return {"attn_blocks": blocks, "attn_heads": int(attn.num_heads),
            "attn_head_dim": int(attn.head_dim), "attn_dtype": DTYPES[cfg.attn_dtype]}


def make_plan(cfg: EncodeConfig, *, without_weights: bool = False) -> Plan:
    """List the source and load the models once here (fails fast on bad paths and missing
    weights, before any Ray work), and fix the cache spec and provenance.
    `without_weights` (the dry run): weights that cannot be had are replaced by a random
    init of the same architecture (an unknown hub VAE: SD-VAE's) and the plan says why."""
    source = list_source(cfg.dataset, cfg.data_dir, cfg.split, cfg.limit)
    models = dict(resolution=cfg.resolution, teacher_weights=cfg.teacher_weights,
                  seed=cfg.seed, random_teacher=cfg.random_teacher)
    missing = None
    try:
        vae, teacher = build_models(cfg.vae, cfg.teacher, random_weights=cfg.random_weights,
                                    **models)
    except WeightsError as e:
        if not without_weights:
            raise
        missing = str(e)
        vae, teacher = build_models("tiny" if cfg.vae == "tiny" else "sd-vae", cfg.teacher,
                                    random_weights=True, **{**models, "teacher_weights": None})
    hashes = {"vae": weights_sha256(vae), "teacher": weights_sha256(teacher)}
    grid, tspec = token_grid(cfg.resolution), TEACHERS[cfg.teacher]
    spec = CacheSpec(num_samples=len(source.items), shard_size=cfg.shard_size,
                     chunk_size=math.gcd(8, cfg.shard_size), backends=FORMATS[cfg.format],
                     views=cfg.views, latent_channels=vae.config.latent_channels,
                     latent_size=cfg.resolution // 8, tokens=grid * grid,
                     token_dim=teacher.embed_dim, moments_dtype=DTYPES[cfg.moments_dtype],
                     token_dtype=DTYPES[cfg.token_dtype], **attn_spec(cfg, teacher))
    # content identity only: names, paths and hub ids live under "command" (not compared),
    # so the same weights from another path or mirror resume the cache
    provenance = {
        "random_weights": cfg.random_weights,
        # written only when set, so the manifests of every other cache stay as they were
        **({"random_teacher": True} if cfg.random_teacher and not cfg.random_weights else {}),
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
        "vae": {"weights_sha256": hashes["vae"], "stored": "posterior mean and std",
                "latent_channels": int(vae.config.latent_channels),
                "scaling_factor": float(vae.config.scaling_factor),
                # the decoder of a --random-weights cache is rebuilt from these (train sample)
                "config": {k: list(v) if isinstance(v, tuple) else v
                           for k, v in vae.config.items() if not k.startswith("_")}},
        "teacher": {"name": cfg.teacher, "timm_arch": tspec.arch, "registers": tspec.registers,
                    "dim": int(teacher.embed_dim), "patch": 14,
                    "input_size": teacher_input_size(cfg.resolution),
                    "pos_embed": f"resampled at load to {grid}x{grid} (bicubic, antialias)",
                    "outputs": "final-norm patch tokens and CLS",
                    "weights_sha256": hashes["teacher"]},
        "precision": cfg.precision,   # resolved (bf16 on GPU, fp32 on CPU) by run_encode
    }
    done = set.intersection(*(done_shards(cfg.out, b) for b in spec.backends))
    pending = [k for k in range(spec.num_shards) if k not in done]
    return Plan(cfg, source, spec, provenance, hashes, pending, missing)


# ---------------------------------------------------------------- Ray

def _init_ray(cfg: EncodeConfig) -> bool:
    """Connect to --address or start embedded Ray; True if we started it (and stop it)."""
    import ray
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if not sys.stderr.isatty():   # Ray colours its workers' lines even into a log file
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    kw: dict[str, Any] = dict(logging_level=logging.WARNING, include_dashboard=False)
    kw.update(_shadow_guard())
    if cfg.address:
        ray.init(address=cfg.address, **kw)
        return True
    # embedded: Ray's default (token auth) without its notice, for this start only (setting
    # RAY_AUTH_MODE here instead breaks the start: Ray has read its config already)
    notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = notice.level
    notice.setLevel(logging.ERROR)
    try:
        ray.init(num_cpus=cfg.num_cpus, **kw)
    finally:
        notice.setLevel(level)
    return True


def _shadow_guard() -> dict[str, Any]:
    """Ray puts the driver's working directory on its workers' sys.path. A folder there
    named like one of our packages (`--out cache` run from that directory, an image set's
    `train/`) is then imported as an empty namespace package whenever the project is
    installed in editable mode (its import hook runs after sys.path): "cannot import name
    'CacheSpec' from 'cache' (unknown location)". Putting the packages' own directory on
    the workers' PYTHONPATH makes the real packages win (a regular package anywhere on
    sys.path beats a namespace folder)."""
    import cache
    cwd, home = Path.cwd(), Path(cache.__file__).resolve().parents[1]
    if home == cwd.resolve() or not any((cwd / n).is_dir() for n in ("cache", "pipeline",
                                                                       "train")):
        return {}
    path = os.pathsep.join(p for p in (str(home), os.environ.get("PYTHONPATH")) if p)
    return {"runtime_env": {"env_vars": {"PYTHONPATH": path}}}


@dataclass(frozen=True)
class Encoders:
    """How the encoder stage runs: pool size, per-actor resources, device, numerics."""
    size: int
    num_gpus: int
    num_cpus: int
    device: str
    precision: str
    batch_size: int


def plan_encoders(cfg: EncodeConfig, gpus: int, cpus: int) -> Encoders:
    """One actor per GPU (every GPU the cluster has, unless --num-gpus), else CPU actors."""
    want = gpus if cfg.num_gpus is None else cfg.num_gpus
    if want > gpus and not cfg.address:
        raise ValueError(f"--num-gpus {want}: this machine has {gpus} GPU(s) for Ray")
    if cfg.address and cfg.num_gpus is None and gpus == 0:
        raise ValueError(f"the Ray cluster at {cfg.address} has no GPU right now; pass "
                         "--num-gpus N to wait for N GPUs (autoscaling) or --num-gpus 0 to "
                         "encode on CPUs")
    if want:
        return Encoders(want, 1, 1, "cuda", cfg.precision or "bf16",
                        cfg.batch_size or max(1, 256 * 256 ** 2 // cfg.resolution ** 2))
    if cfg.cpu_encoders * cfg.encoder_threads >= cpus:
        raise ValueError(f"--cpu-encoders {cfg.cpu_encoders} x --encoder-threads "
                         f"{cfg.encoder_threads} would take all {cpus} CPUs of the Ray "
                         "cluster and leave none for decoding; use fewer")
    return Encoders(cfg.cpu_encoders, 0, cfg.encoder_threads, "cpu", cfg.precision or "fp32",
                    cfg.batch_size or 8)


def build_dataset(plan: Plan, enc: Encoders, root: str, lock_token: str | None = None):
    """The Ray Data pipeline over the pending shards (lazy; iterate it to run). With
    `lock_token`, each write task first checks that the cache's lock still holds it."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext
    from ray.util.debug import log_once
    cfg, spec = plan.cfg, plan.spec
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False   # our own bar counts images, not blocks
    ctx.print_on_execution_start = False
    log_once("ray_data_progress_manager_disabled")   # ...so no notice that Ray's is off
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # keep resource warnings
    rows = [shard_row(plan.source, spec, k) for k in plan.pending]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    # memory: a decoded shard plus PIL's working copies plus the worker itself. Also keeps
    # Ray from fusing this CPU stage into the encoder actors (operators whose remote args
    # differ are not fused; tests/test_encode_job.py checks the plan), so decoding
    # scales over every core of the cluster independently of the GPUs.
    decoded = cfg.shard_size * cfg.views * cfg.resolution ** 2 * 3
    ds = ds.map(decode_stage, fn_kwargs=dict(resolution=cfg.resolution, views=cfg.views),
                num_cpus=1, memory=2 * decoded + (512 << 20))
    models = dict(vae=cfg.vae, teacher=cfg.teacher, teacher_weights=cfg.teacher_weights,
                  random_weights=cfg.random_weights, seed=cfg.seed,
                  random_teacher=cfg.random_teacher)
    ds = ds.map_batches(EncodeStage, batch_size=1, batch_format="numpy",
                        fn_constructor_args=(models, plan.hashes),
                        fn_constructor_kwargs=dict(
                            device=enc.device, precision=enc.precision,
                            batch_size=enc.batch_size, threads=enc.num_cpus,
                            resolution=cfg.resolution, compile=cfg.compile,
                            attn_blocks=spec.attn_blocks),
                        # the next shard queued at the actor; moving a shard in and out
                        # (object store, ~0.2 s) overlaps the encode of the next one
                        compute=ActorPoolStrategy(size=enc.size,
                                                  max_tasks_in_flight_per_actor=2,
                                                  max_concurrent_calls_per_actor=2),
                        num_gpus=enc.num_gpus, num_cpus=enc.num_cpus)
    # the encoded shard (fp16 tokens) plus the stored copy (int8 or fp16) it becomes
    encoded = cfg.shard_size * cfg.views * (spec.bytes_per_sample // spec.views) * 2
    return ds.map(locked_write_stage, fn_kwargs=dict(root=root, lock_token=lock_token),
                  num_cpus=1, memory=2 * encoded + (512 << 20))


def locked_write_stage(row: dict[str, Any], *, root: str, lock_token: str | None
                       ) -> dict[str, Any]:
    """write_stage (pipeline/stages.py) behind the job's lock: with `lock_token`, the
    shard is written only while the cache's lock holds that token.

    A lost lock or a full disk comes back in the row's `stop` (JSON; "" when the shard
    was written) rather than as an exception: Ray Data would wrap the exception in
    UserCodeException, lose its errno (only the traceback text reaches the driver) and
    print the traceback; the driver raises LockLostError or DiskFullError instead."""
    try:
        if lock_token is not None:
            check_token(root, lock_token)
        return {**write_stage(row, root=root), "stop": ""}
    except LockLostError as e:
        stop = {"lock_lost": str(e)}
    except Exception as e:
        full = no_space_error(e)
        if full is None:
            raise
        stop = {"errno": full.errno, "strerror": full.strerror, "shard": int(row["shard"]),
                "filename": None if full.filename is None else str(full.filename),
                "host": socket.gethostname()}
    return {"shard": int(row["shard"]), "images": 0, "failed": 0, "bytes": 0,
            "encode_seconds": 0.0, "failures": "[]", "stop": json.dumps(stop)}


# ---------------------------------------------------------------- the job

def _failure_summary(failures: list[dict]) -> str:
    reasons = collections.Counter(f["reason"].split(":")[0] for f in failures)
    first = "; ".join(f"{f['key']}: {f['reason']}" for f in failures[:3])
    return (", ".join(f"{n} x {r}" for r, n in reasons.most_common(5))
            + (f" (first: {first})" if first else ""))


def _too_many(n: int, budget: int, total: int, failures: list[dict]) -> str:
    return (f"{n} of {total} images failed to decode, more than --max-failures allows "
            f"({budget}): {_failure_summary(failures)}. Check --data-dir and the files; "
            "raise --max-failures to accept them (done shards are kept, a rerun resumes)")


def run_encode(cfg: EncodeConfig, *, plan: Plan | None = None, log=print) -> dict[str, Any]:
    """Take the cache's lock, plan, create or resume the cache, encode the pending shards
    on Ray, finalize, release the lock.

    Returns the summary (also stored in the manifest). Raises CacheLockedError when
    another job holds the lock, LockLostError when this job's lock is taken over while it
    runs, TooManyFailures when failures exceed the budget, DiskFullError when the storage
    fills up; in each case the cache stays incomplete with its done shards kept."""
    root = Store(cfg.out)   # a directory or an fsspec URL (s3://bucket/in1k-256)
    # the lock's own files (a job holding it may not have written the manifest yet)
    if ([n for n in root.listdir() if not n.startswith(LOCK_NAME)]
            and not root.is_file(MANIFEST_NAME)):
        raise ValueError(f"--out {root} exists and is not a cache; give a new or empty "
                         "directory (a typo must not write into a dataset)")
    try:
        with CacheLock(root, command=shlex.join(sys.argv), break_lock=cfg.break_lock,
                       log=log) as lock:
            return _encode_locked(cfg, plan, root, lock, log)
    except DiskFullError:
        raise
    except Exception as e:   # the manifest, the lock, a done marker written by the driver
        full = no_space_error(e)
        if full is None:
            raise
        raise DiskFullError(_no_space_message(root, full.errno, full.strerror,
                                              full.filename)) from e


def _encode_locked(cfg: EncodeConfig, plan: Plan | None, root: Store, lock: CacheLock,
                   log) -> dict[str, Any]:
    import ray
    plan = plan or make_plan(cfg)
    if root.is_file(MANIFEST_NAME):   # a refused resume says so before Ray starts (~20 s);
        # the precision is resolved from the cluster's GPUs later, create_cache checks it
        check_resumable(root, plan.spec, plan.provenance, ignore=("precision",))
    started = _init_ray(cfg)
    try:
        res = ray.cluster_resources()
        enc = plan_encoders(cfg, int(res.get("GPU", 0)), int(res.get("CPU", 0)))
        writer = create_cache(root, plan.spec, {
            **plan.provenance, "precision": enc.precision,
            "command": {"argv": shlex.join(sys.argv), "data_dir": cfg.data_dir,
                        "vae": cfg.vae, "teacher_weights": cfg.teacher_weights,
                        "seed": cfg.seed if cfg.random_weights or cfg.random_teacher else None,
                        "address": cfg.address, "encoders": f"{enc.size} x {enc.device}",
                        "batch_size": enc.batch_size},
            "host": socket.gethostname()}, latent_scale=plan.provenance["vae"]["scaling_factor"])
        plan.pending = writer.pending_shards()
        log(plan.describe() + f"\n      encoders: {enc.size} x {enc.device} "
            f"({enc.precision}, batch {enc.batch_size})")
        budget = cfg.failure_budget(plan.spec.num_samples)
        pending = set(plan.pending)
        failures = [f for k in range(plan.spec.num_shards) if k not in pending
                    for f in (read_done_marker(root, plan.spec.backends[0], k) or {}
                              ).get("failures", [])]
        t0 = time.perf_counter()
        stats = (_run_pipeline(plan, enc, root, failures, budget, lock.token)
                 if plan.pending else {})
        elapsed = time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()
    if len(failures) > budget:
        raise TooManyFailures(_too_many(len(failures), budget, plan.spec.num_samples, failures))
    images = stats.get("images", 0)
    summary = {"images": images, "failed": len(failures),
               "bytes_written": stats.get("bytes", 0), "seconds": round(elapsed, 2),
               "images_per_second": round(images / elapsed, 2) if images else None,
               "steady_images_per_second": round(stats.get("steady", 0), 2),
               "shards_encoded": len(plan.pending), "shards_total": plan.spec.num_shards}
    lock.check()   # a job whose lock was broken must not finalize another job's cache
    # a rerun with nothing to do keeps the summary of the run that did the work
    m = finalize_cache(root, {"summary": summary} if plan.pending else None)
    total = sum(f["bytes"] for t in m["shards"].values() for s in t for f in s["files"].values())
    done = (f"done: {images:,} images encoded in {elapsed:.1f} s "
            f"({summary['images_per_second'] or 0:.1f} img/s)" if plan.pending else
            f"done: nothing to encode, all {plan.spec.num_shards:,} shards were already "
            "written")
    log(f"{done}, {m['num_valid']:,} valid, "
        f"{len(failures)} failed{' (' + _failure_summary(failures) + ')' if failures else ''}"
        f"; cache {total / 1e9:.3f} GB at {root}")
    return summary


def _run_pipeline(plan: Plan, enc: Encoders, root: Store, failures: list[dict], budget: int,
                  lock_token: str | None = None) -> dict[str, Any]:
    from tqdm import tqdm
    todo = plan.pending_images
    stats = {"images": 0, "bytes": 0}
    t0 = time.perf_counter()
    first: tuple[float, int] | None = None   # (time, images) when the first shard landed
    bar = tqdm(total=int(todo), unit="img", disable=not plan.cfg.progress, smoothing=0.1,
               dynamic_ncols=True, desc="encode", mininterval=1.0)
    try:
        for row in build_dataset(plan, enc, str(root), lock_token).iter_rows():
            if row["stop"]:
                stop = json.loads(row["stop"])
                if "lock_lost" in stop:
                    raise LockLostError(stop["lock_lost"])
                raise DiskFullError(_no_space_message(root, stop["errno"], stop["strerror"],
                                                      stop["filename"], stop["shard"],
                                                      stop["host"]))
            stats["images"] += int(row["images"])
            stats["bytes"] += int(row["bytes"])
            if first is None:
                first = (time.perf_counter(), stats["images"])
            failures += json.loads(row["failures"])
            bar.update(int(row["images"]))
            bar.set_postfix(failed=len(failures), GB=f"{stats['bytes'] / 1e9:.2f}")
            if len(failures) > budget:
                raise TooManyFailures(_too_many(len(failures), budget,
                                                plan.spec.num_samples, failures))
    finally:
        bar.close()
    # throughput after the first shard: excludes Ray start-up and model loading
    if first is not None and stats["images"] > first[1]:
        stats["steady"] = (stats["images"] - first[1]) / (time.perf_counter() - first[0])
        stats["startup_seconds"] = first[0] - t0
    return stats
