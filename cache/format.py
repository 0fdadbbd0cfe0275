"""The cache format: constants, field specs, the manifest, and the errors.

This module is the contract between the offline encode job and the trainer. Anything both
halves must agree on (field names, the latent scale, the format version) lives here once
and is recorded in every manifest.

On-disk layout of a cache directory::

    CACHE/
      manifest.json              written at creation (status "incomplete"), rewritten by
                                 finalize() (status "complete"); the sign a build finished
      zarr/                      zarr v3 group, one array per field, sharded along samples
      wds/shard-000000.tar ...   webdataset tars, one per shard
      _done/<backend>/000000.json  per-shard done markers with checksums, written last

A shard is a fixed contiguous range of the global sample index: shard k holds samples
[k * shard_size, min((k + 1) * shard_size, num_samples)). It is the unit of writing, of
verification and of the encode job's work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np

from .store import Store

FORMAT_NAME = "urepa-cache"
# 2: the manifest carries its own SHA-256; done markers carry the dataset digest and
# per-chunk (zarr) / per-member (wds) CRC32C checksums that readers check on every read;
# zarr inner chunks end in zarr's crc32c codec. Version 1 caches stay readable, unverified.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
DONE_DIR = "_done"
BACKENDS = ("zarr", "wds")

# SD-VAE latent scale (Rombach et al.; REPA, U-REPA): z = (mean + std * eps) * LATENT_SCALE.
# The cache stores raw posterior moments; this constant is applied at load time only.
LATENT_SCALE = 0.18215

# Field names (v1). `moments` holds the VAE posterior mean (channels [0, C)) then std
# (channels [C, 2C)); `tokens` the teacher's final-norm patch tokens; `cls` its CLS token.
MOMENTS, TOKENS, TOKENS_SCALE, CLS, LABEL, INDEX, KEY = (
    "moments", "tokens", "tokens_scale", "cls", "label", "index", "key")
# HASTE's attention targets (only in a cache encoded with --teacher-attn): per view, chosen
# teacher block, q|k and head, the patch tokens' q * head_dim^-0.5 and k; logits = q k^T
ATTN, ATTN_SCALE = "attn_qk", "attn_qk_scale"
# int8 fields and the fp16 scale field each brings (x = q * scale over the last axis)
SCALES = {TOKENS: TOKENS_SCALE, ATTN: ATTN_SCALE}
FLOAT_DTYPES = ("float16", "float32")

# Documented limits on sizes read from a manifest (docs/cache-format.md): far above any
# real cache (ImageNet-1k: 1.28M samples, 1,252 shards; ImageNet-21k: 14M), low enough
# that a damaged or hostile manifest cannot make a reader allocate or loop without end.
MAX_SAMPLES = 2**31
MAX_SHARDS = 2**20
MAX_SHARD_SIZE = 2**16
MAX_SAMPLE_BYTES = 2**30  # one sample's stored fields (ImageNet 256 px: 394 KB)
MAX_DIM = 2**16  # tokens, token width, latent size and channels
MAX_MANIFEST_BYTES = 2**30  # ImageNet's: ~150 KB, plus ~100 B per failed sample
MAX_MARKER_BYTES = 2**26  # a shard of 65,536 wds samples' checksums: ~5 MB
TOKEN_DTYPES = ("float16", "int8")
ATTN_DTYPES = ("float16", "int8")
MAX_BLOCKS = 256  # teacher blocks (DINOv2-g has 40)
ATTN_KEYS = ("attn_blocks", "attn_heads", "attn_head_dim", "attn_dtype")


class CacheError(Exception):
    """Base class of every error raised for a bad or unusable cache."""


class NotACacheError(CacheError):
    """The path holds no urepa-cache manifest."""


class FormatVersionError(CacheError):
    """The cache was written by a newer format version than this code reads."""


class IncompleteCacheError(CacheError):
    """The cache was never finalized or has shards that are not done."""


class DamagedCacheError(CacheError):
    """Something read back from the cache is not what its writer wrote: a changed
    manifest, a damaged marker, bytes that fail their checksum, a name outside the cache."""


class CacheMismatchError(CacheError):
    """An existing cache was created with different parameters than requested."""


class FailedSampleError(CacheError, KeyError):
    """The requested sample failed at encode time and holds no data."""


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One per-sample field: its shape per sample (without the sample axis) and dtype."""

    shape: tuple[int, ...]
    dtype: str  # numpy dtype name, or "str" for variable-length UTF-8

    @property
    def nbytes(self) -> int:
        """Bytes per sample (0 for strings, whose size varies)."""
        if self.dtype == "str":
            return 0
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FieldSpec:
        return cls(shape=tuple(int(s) for s in d["shape"]), dtype=str(d["dtype"]))


@dataclasses.dataclass(frozen=True, kw_only=True)
class CacheSpec:
    """Everything that fixes the layout of a cache. Two caches with equal specs are
    interchangeable; creating a cache over an existing one with another spec is refused.

    Resolution, views, token count and width are parameters, not constants: DINOv2-B at
    256 px gives tokens=256, token_dim=768; at 512 px tokens=1024.
    """

    num_samples: int
    shard_size: int = 1024
    chunk_size: int = 8  # samples per zarr inner chunk: the unit of reading
    backends: tuple[str, ...] = ("zarr",)
    views: int = 1  # 1, or 2 when the horizontally flipped image is stored too
    latent_channels: int = 4  # moments have 2x this: mean then std
    latent_size: int = 32  # resolution / 8
    tokens: int = 256
    token_dim: int = 768
    moments_dtype: str = "float16"
    token_dtype: str = "float16"  # or "int8" with a per-token fp16 scale
    compression: str | None = None  # None, or "zstd" (zarr backend only)
    # teacher attention (HASTE): blocks (0-indexed, increasing) whose per-head q and k are
    # stored; none by default. A spec without them writes none of these keys (older
    # manifests are unchanged)
    attn_blocks: tuple[int, ...] = ()
    attn_heads: int = 0
    attn_head_dim: int = 0
    attn_dtype: str = "float16"  # or "int8" with an fp16 scale per (token, head)

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> None:
            raise ValueError(f"CacheSpec.{field}={getattr(self, field)!r}: {why}")

        object.__setattr__(self, "backends", tuple(self.backends))
        object.__setattr__(self, "attn_blocks", tuple(self.attn_blocks))
        if self.num_samples < 1:
            bad("num_samples", "must be >= 1")
        if self.shard_size < 1:
            bad("shard_size", "must be >= 1")
        if self.chunk_size < 1 or self.shard_size % self.chunk_size:
            bad("chunk_size", f"must be >= 1 and divide shard_size={self.shard_size}")
        if not self.backends or any(b not in BACKENDS for b in self.backends):
            bad("backends", f"choose one or more of {BACKENDS}")
        if len(set(self.backends)) != len(self.backends):
            bad("backends", "lists a backend twice")
        if self.views not in (1, 2):
            bad("views", "must be 1 or 2 (original, or original + flipped)")
        if self.moments_dtype not in FLOAT_DTYPES:
            bad("moments_dtype", f"choose one of {FLOAT_DTYPES}")
        if self.token_dtype not in TOKEN_DTYPES:
            bad("token_dtype", f"choose one of {TOKEN_DTYPES}")
        if self.compression not in (None, "zstd"):
            bad("compression", "choose None or 'zstd'")
        for name in ("latent_channels", "latent_size", "tokens", "token_dim"):
            if not 1 <= getattr(self, name) <= MAX_DIM:
                bad(name, f"must be in [1, {MAX_DIM}]")
        if self.attn_blocks:
            if any(not _is_int(b) for b in self.attn_blocks) or min(self.attn_blocks) < 0 \
                    or max(self.attn_blocks) >= MAX_BLOCKS \
                    or list(self.attn_blocks) != sorted(set(self.attn_blocks)):
                bad("attn_blocks", f"must be distinct increasing block numbers in "
                                   f"[0, {MAX_BLOCKS})")
            for name in ("attn_heads", "attn_head_dim"):
                if not 1 <= getattr(self, name) <= MAX_DIM:
                    bad(name, f"must be in [1, {MAX_DIM}] when attn_blocks are stored")
            if self.attn_dtype not in ATTN_DTYPES:
                bad("attn_dtype", f"choose one of {ATTN_DTYPES}")
        elif (self.attn_heads, self.attn_head_dim, self.attn_dtype) != (0, 0, "float16"):
            bad("attn_heads", "attention sizes without attn_blocks")
        if self.num_samples > MAX_SAMPLES:
            bad("num_samples", f"exceeds the documented limit {MAX_SAMPLES:,}")
        if self.shard_size > MAX_SHARD_SIZE:
            bad("shard_size", f"exceeds the documented limit {MAX_SHARD_SIZE:,}")
        if self.num_shards > MAX_SHARDS:
            bad("num_samples", f"gives {self.num_shards:,} shards of {self.shard_size}, "
                               f"more than the documented limit {MAX_SHARDS:,}")
        if self.bytes_per_sample > MAX_SAMPLE_BYTES:
            bad("tokens", f"a sample of {self.bytes_per_sample:,} bytes exceeds the "
                          f"documented limit {MAX_SAMPLE_BYTES:,}")

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Global sample range [start, stop) of a shard."""
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} out of range [0, {self.num_shards})")
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_samples)

    @property
    def fields(self) -> dict[str, FieldSpec]:
        """Stored fields in storage dtypes (int8 tokens bring their scale field). Built
        once per spec (the loader asks for them per block read): do not modify."""
        return _spec_fields(self)

    def _build_fields(self) -> dict[str, FieldSpec]:
        v, c, s = self.views, self.latent_channels, self.latent_size
        out = {
            MOMENTS: FieldSpec((v, 2 * c, s, s), self.moments_dtype),
            TOKENS: FieldSpec((v, self.tokens, self.token_dim), self.token_dtype),
        }
        if self.token_dtype == "int8":
            out[TOKENS_SCALE] = FieldSpec((v, self.tokens), "float16")
        out[CLS] = FieldSpec((v, self.token_dim), "float16")
        if self.attn_blocks:
            qk = (v, len(self.attn_blocks), 2, self.attn_heads, self.tokens)
            out[ATTN] = FieldSpec((*qk, self.attn_head_dim), self.attn_dtype)
            if self.attn_dtype == "int8":
                out[ATTN_SCALE] = FieldSpec(qk, "float16")
        out[LABEL] = FieldSpec((), "int64")
        out[INDEX] = FieldSpec((), "int64")
        out[KEY] = FieldSpec((), "str")
        return out

    @property
    def bytes_per_sample(self) -> int:
        return sum(f.nbytes for f in self.fields.values())

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["backends"] = list(self.backends)
        if self.attn_blocks:
            d["attn_blocks"] = list(self.attn_blocks)
        else:  # a cache without attention has the manifest it had before they existed
            for name in ATTN_KEYS:
                del d[name]
        return d

    @classmethod
    def from_json(cls, d: Any) -> CacheSpec:
        """The spec of a manifest, every key's type and value checked (DamagedCacheError
        naming the key: nothing read from disk is used unchecked)."""
        if not isinstance(d, dict):
            raise DamagedCacheError(f"manifest spec is a {type(d).__name__}, not an object")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise DamagedCacheError(f"manifest spec has unknown keys {unknown}; "
                                    f"valid: {sorted(fields)}")
        for name, value in d.items():
            kind = fields[name].type
            ok = {"int": _is_int(value), "str": isinstance(value, str),
                  "str | None": value is None or isinstance(value, str),
                  "tuple[str, ...]": isinstance(value, list)
                  and all(isinstance(b, str) for b in value),
                  "tuple[int, ...]": isinstance(value, list)
                  and len(value) <= MAX_BLOCKS and all(_is_int(b) for b in value)}.get(kind)
            if not ok:
                raise DamagedCacheError(f"manifest spec.{name} = {value!r}: expected {kind}")
        try:
            return cls(**{**d, "backends": tuple(d.get("backends", ("zarr",))),
                          "attn_blocks": tuple(d.get("attn_blocks", ()))})
        except ValueError as e:
            raise DamagedCacheError(f"manifest {e}") from None


@functools.lru_cache(maxsize=64)
def _spec_fields(spec: CacheSpec) -> dict[str, FieldSpec]:
    return spec._build_fields()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------ manifest & markers
@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Open a unique temporary file `.NAME.<pid>.<ns>.tmp` beside `path` for writing and
    rename it to `path` when the block ends without error, so no reader ever sees a
    partial file. A writer killed half-way leaves only the temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_tmp(path: Path) -> None:
    """Remove temporary files that killed writers of `path` left behind."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def manifest_path(root: str | os.PathLike) -> Path:
    """The manifest of a local cache directory."""
    return Path(root) / MANIFEST_NAME


def read_manifest(root: str | os.PathLike | Store) -> dict[str, Any]:
    """Read and check a manifest: raises NotACacheError or FormatVersionError with the
    path and what was found. `root` is a directory or an fsspec URL."""
    try:
        store = Store.of(root)
    except ValueError as e:  # an fsspec URL that cannot be opened here
        raise NotACacheError(str(e)) from e
    if not store.exists():
        raise NotACacheError(f"{store}: no such directory")
    path = f"{store}/{MANIFEST_NAME}"
    if not store.is_file(MANIFEST_NAME):
        raise NotACacheError(f"{store} is not a urepa-cache: it has no {MANIFEST_NAME} "
                             "(build one with `pipeline encode ... --out DIR`)")
    try:
        if not store.is_regular(MANIFEST_NAME):
            raise DamagedCacheError(f"{path} is not a regular file (a link or a device): "
                                    "refused")
        size = store.size(MANIFEST_NAME)
        if size > MAX_MANIFEST_BYTES:
            raise DamagedCacheError(f"{path}: {size:,} bytes, above the documented limit of "
                                    f"{MAX_MANIFEST_BYTES:,} for a manifest")
        m = json.loads(store.read_bytes(MANIFEST_NAME))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSON, UTF-8, big ints
        raise NotACacheError(f"{path}: unreadable manifest ({_short(str(e))})") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise NotACacheError(f"{path}: not a {FORMAT_NAME} manifest "
                             f"(format={m.get('format') if isinstance(m, dict) else None!r})")
    version = m.get("format_version")
    if not _is_int(version) or version < 1:
        raise DamagedCacheError(f"{path}: format_version {version!r} is not a version "
                                "number (an integer >= 1): the manifest is damaged")
    if version not in READABLE_VERSIONS:
        raise FormatVersionError(
            f"{store}: cache format version {version} is newer than this code reads "
            f"({FORMAT_VERSION}); upgrade urepa-cache")
    if version == 1 and "sha256" in m:  # a v2 manifest edited to "1" would skip every check
        raise DamagedCacheError(f"{path}: format_version 1, but the manifest carries a "
                                "version 2 checksum: the manifest is damaged")
    if version >= 2:
        if m.get("sha256") != manifest_sha256(m):
            raise DamagedCacheError(
                f"{path}: the manifest does not match its own checksum: it was changed "
                "or damaged after it was written. Restore it from a copy, or rebuild the "
                "cache (a rerun of `pipeline encode` into a new --out)")
    check_manifest(m, path)
    return m


def manifest_sha256(m: dict[str, Any]) -> str:
    """SHA-256 of a manifest's content (its own "sha256" key left out), whatever the
    whitespace or key order of the file."""
    body = {k: v for k, v in m.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()


def sealed(m: dict[str, Any]) -> dict[str, Any]:
    """The manifest with its checksum, as written."""
    return {**{k: v for k, v in m.items() if k != "sha256"}, "sha256": manifest_sha256(m)}


# provenance keys that may differ between the run that created a cache and a resuming
# run, or that finalize adds: not part of the dataset's identity
VOLATILE_PROVENANCE = ("created", "software", "host", "command", "summary")


def dataset_sha256(m: dict[str, Any]) -> str:
    """SHA-256 of what every shard of a cache must agree on: spec, fields, latent scale
    and layout, token storage and provenance (weights, preprocessing, source). Each done
    marker records it, so verify finds a shard written for another manifest, and a
    manifest edited after the shards were written."""
    latent = {k: v for k, v in m.get("latent", {}).items() if k != "channel_stats"}
    prov = {k: v for k, v in m.get("provenance", {}).items() if k not in VOLATILE_PROVENANCE}
    body = {"spec": m.get("spec"), "fields": m.get("fields"), "latent": latent,
            "tokens": m.get("tokens"), "provenance": prov,
            "zarr_metadata": m.get("zarr_metadata")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()


def check_manifest(m: dict[str, Any], where: str) -> None:
    """Types and ranges of the manifest's keys that readers and training use
    (DamagedCacheError naming the key). The shard table and failures are checked
    against the done markers by verify."""
    def bad(key: str, value: Any, want: str) -> DamagedCacheError:
        return DamagedCacheError(f"{where}: {key} = {_short(value)}: expected {want}; "
                                 "the manifest is damaged")
    spec = CacheSpec.from_json(m.get("spec"))
    if m.get("status") not in ("incomplete", "complete"):
        raise bad("status", m.get("status"), "'incomplete' or 'complete'")
    fields = m.get("fields")
    if fields != {n: f.to_json() for n, f in spec.fields.items()}:
        raise bad("fields", fields, "the fields its spec implies")
    latent = m.get("latent")
    scale = latent.get("scale") if isinstance(latent, dict) else None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
            or not math.isfinite(scale) or scale <= 0:
        raise bad("latent.scale", scale, "a finite number > 0")
    for key in ("stored", "layout"):
        if not isinstance(latent.get(key, ""), str):
            raise bad(f"latent.{key}", latent.get(key), "a string")
    stats = latent.get("channel_stats", {})
    if not isinstance(stats, dict) or not all(
            isinstance(stats.get(k, []), list) for k in ("mean", "std")):
        raise bad("latent.channel_stats", stats, "an object of per-channel lists")
    if not isinstance(m.get("provenance", {}), dict):
        raise bad("provenance", m.get("provenance"), "an object")
    if m["status"] == "complete":
        if not isinstance(m.get("shards"), dict):
            raise bad("shards", m.get("shards"), "an object: the shard table per backend")
        failures = m.get("failures")
        if not isinstance(failures, list) or len(failures) > spec.num_samples or not all(
                isinstance(f, dict) and _is_int(f.get("index"))
                and 0 <= f["index"] < spec.num_samples and isinstance(f.get("reason"), str)
                and isinstance(f.get("key"), str) for f in failures):
            raise bad("failures", failures, "a list of {index, key, reason} with indices "
                                            f"in [0, {spec.num_samples})")
        valid = spec.num_samples - len({f["index"] for f in failures})
        if m.get("num_valid") != valid or m.get("num_samples") != spec.num_samples:
            raise bad("num_valid", m.get("num_valid"),
                      f"{valid} (num_samples {spec.num_samples} less the failures)")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def done_marker_key(backend: str, shard: int) -> str:
    """The done marker's name relative to the cache root."""
    return f"{DONE_DIR}/{backend}/{shard:06d}.json"


def done_marker_path(root: str | os.PathLike, backend: str, shard: int) -> Path:
    """The done marker of a local cache directory."""
    return Path(root) / done_marker_key(backend, shard)


def read_done_marker(root: str | os.PathLike | Store, backend: str, shard: int
                     ) -> dict | None:
    """The done marker of a shard, or None if the shard is not (completely) written."""
    store, key = Store.of(root), done_marker_key(backend, shard)
    try:
        # a link, a FIFO or a device is no marker, nor is a file this large: damaged
        # (verify reports the shard not done)
        if not store.is_regular(key) or store.size(key) > MAX_MARKER_BYTES:
            return None
        return json.loads(store.read_bytes(key))
    except (OSError, ValueError, RecursionError):  # ValueError: JSON, UTF-8, big ints
        return None  # missing, or damaged from outside (writes are atomic)


def done_shards(root: str | os.PathLike | Store, backend: str) -> set[int]:
    """Shards of `backend` that have a done marker: one listing, not one read per shard
    (on a remote store, ImageNet's 1,252 markers would be 1,252 requests)."""
    names = Store.of(root).listdir(f"{DONE_DIR}/{backend}")
    return {int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit()}


def state_sha256(state: dict[str, Any]) -> str:
    """Hash of a torch state dict (names, dtypes, shapes, bytes): the identity of a model's
    weights whatever file or hub revision they came from, recorded in the manifest so the
    trainer's side can check it holds the same VAE as the encoder."""
    import torch
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def latent_channel_stats(sums: np.ndarray, scale: float = LATENT_SCALE) -> dict[str, Any]:
    """Channel statistics of the latent z = mean + std * eps from accumulated sums.

    `sums` is [4, C] float64: count, sum(mean), sum(mean^2), sum(std^2) per channel over
    samples, views and positions. E[z] = E[mean]; Var[z] = Var[mean] + E[std^2].
    Reported in raw VAE units and after the latent scale (0.18215 for SD-VAE).
    """
    count, s1, s2, v = sums
    count = np.maximum(count, 1)
    mean = s1 / count
    var = np.maximum(s2 / count - mean**2, 0) + v / count
    std = np.sqrt(var)
    return {
        "count_per_channel": int(sums[0][0]),
        "mean": [round(float(x), 6) for x in mean],
        "std": [round(float(x), 6) for x in std],
        "scaled_mean": [round(float(x) * scale, 6) for x in mean],
        "scaled_std": [round(float(x) * scale, 6) for x in std],
    }
