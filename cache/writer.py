"""Writing a cache: create once, write shards from anywhere, finalize once.

    writer = create_cache(path, spec, provenance)   # manifest + array metadata, up front
    writer.write_shard(k, arrays, failures)         # any process, any order, any rerun
    finalize_cache(path)                            # checks every shard, writes the manifest

`write_shard` needs no coordination between processes writing different shards: each
backend writes its shard objects through a temporary name and a rename, then a done
marker with the files' SHA-256 goes last. A writer killed half-way leaves no marker and
the shard is written again on the next run; a shard that is already done is skipped.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .format import (ATTN, ATTN_SCALE, CLS, FORMAT_NAME, FORMAT_VERSION, INDEX, KEY, LABEL,
                     LATENT_SCALE, MANIFEST_NAME, MOMENTS, TOKENS, TOKENS_SCALE,
                     VOLATILE_PROVENANCE,
                     CacheMismatchError, CacheSpec, DamagedCacheError, IncompleteCacheError,
                     dataset_sha256, done_marker_key, done_shards, json_bytes,
                     latent_channel_stats, read_done_marker, read_manifest, sealed)
from .markers import check_marker, file_digest
from .quant import quantize_tokens
from .store import Store
from .wds_backend import WdsWriter
from .zarr_backend import ZarrWriter, metadata_digest

WRITERS = {"zarr": ZarrWriter, "wds": WdsWriter}
_SOFTWARE = ("numpy", "torch", "zarr", "numcodecs", "webdataset", "ray", "timm",
             "diffusers", "accelerate", "urepa-cache")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def software_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _SOFTWARE:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _diff(a: Mapping[str, Any], b: Mapping[str, Any], ignore=(), prefix: str = ""
          ) -> list[str]:
    """`key: existing X vs requested Y` for each differing key, nested objects compared
    key by key (dotted names), so a changed seed is one line, not two whole objects."""
    out = []
    for k in sorted((set(a) | set(b)) - set(ignore)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            out += _diff(x, y, prefix=f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: existing {_short_value(x)} vs requested "
                       f"{_short_value(y)}")
    return out


def _short_value(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 120 else text[:117] + "..."


def create_cache(root: str | Path | Store, spec: CacheSpec,
                 provenance: Mapping[str, Any] | None = None, *,
                 latent_scale: float = LATENT_SCALE) -> CacheWriter:
    """Create a cache (manifest with status "incomplete" and all array metadata), or
    reopen an existing one for resuming. Reopening with a different spec or provenance
    raises CacheMismatchError naming every differing key with both values.

    `latent_scale` is the VAE's scaling factor that training multiplies latents by
    (0.18215 for SD-VAE; another VAE brings its own, e.g. 0.13025 for SDXL's)."""
    root = Store.of(root)
    provenance = dict(provenance or {})
    if root.is_file(MANIFEST_NAME):
        check_resumable(root, spec, provenance)
    else:
        root.makedirs()
        for backend in spec.backends:
            WRITERS[backend](root, spec).create()
        # the zarr metadata turns bytes into values (codecs, endianness, shapes): its
        # digest is part of the dataset's identity, checked by every reader
        zarr_meta = {"zarr_metadata": metadata_digest(root, spec)} if "zarr" in spec.backends \
            else {}
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "status": "incomplete",
            "spec": spec.to_json(),
            "fields": {name: f.to_json() for name, f in spec.fields.items()},
            "latent": {"scale": latent_scale, "shift": 0.0, "stored": "posterior mean, std",
                       "channels": spec.latent_channels,
                       "layout": f"moments[:, :, :{spec.latent_channels}] = mean, "
                                 f"moments[:, :, {spec.latent_channels}:] = std"},
            "tokens": {"dtype": spec.token_dtype,
                       "quantization": ("int8 absmax per token, fp16 scale in tokens_scale"
                                        if spec.token_dtype == "int8" else None)},
            **({"attention": attention_record(spec)} if spec.attn_blocks else {}),
            "provenance": {**provenance, "created": _now(), "software": software_versions()},
            **zarr_meta,
        }
        root.write_bytes(MANIFEST_NAME, json_bytes(sealed(manifest)))
    return CacheWriter(root)


def check_resumable(root: str | Path | Store, spec: CacheSpec,
                    provenance: Mapping[str, Any], ignore: tuple[str, ...] = ()) -> None:
    """Raise CacheMismatchError, one line per differing key, unless the cache at `root`
    (which has a manifest) was created with this spec and provenance (volatile keys and
    `ignore` left out). The encode job calls it before starting Ray, create_cache again."""
    m = read_manifest(root)
    problems = _diff(m["spec"], spec.to_json())
    problems += _diff(m.get("provenance", {}), provenance,
                      ignore=VOLATILE_PROVENANCE + tuple(ignore))
    if problems:
        why = ""
        if any(p.startswith("attn_") for p in problems):
            why = ("\n  (the teacher attention, its blocks and its storage dtype are "
                   "part of every shard: they cannot change once a cache is created, "
                   "nor can the field be added or dropped. Encode into a new "
                   "--out; the attention comes from the same teacher forward as the "
                   "tokens, so that costs one encode)")
        raise CacheMismatchError(
            f"{Store.of(root)} already holds a cache built with other parameters; use a new "
            "--out directory or the original parameters:\n  " + "\n  ".join(problems)
            + why)


def attention_record(spec: CacheSpec) -> dict[str, Any]:
    """The manifest's description of the stored teacher attention (HASTE)."""
    return {
        "field": ATTN, "teacher_blocks": list(spec.attn_blocks), "heads": spec.attn_heads,
        "head_dim": spec.attn_head_dim, "tokens": spec.tokens, "dtype": spec.attn_dtype,
        "layout": f"{ATTN}[v, l, 0] = q, {ATTN}[v, l, 1] = k of teacher block "
                  "attn_blocks[l], per head, over the patch tokens (CLS and registers "
                  "dropped), after the block's q/k norm",
        "scaling": "q is stored pre-multiplied by head_dim^-0.5: the pre-softmax logits "
                   "are q @ k^T (no temperature)",
        "quantization": (f"int8 absmax per (token, head) over head_dim, fp16 scale in "
                         f"{ATTN_SCALE}" if spec.attn_dtype == "int8" else None),
    }


class CacheWriter:
    """Writes shards of an existing (created) cache. Cheap to construct in every worker."""

    def __init__(self, root: str | Path | Store):
        self.store = Store.of(root)
        self.manifest = read_manifest(self.store)
        self.spec = CacheSpec.from_json(self.manifest["spec"])
        if self.manifest["format_version"] != FORMAT_VERSION:
            raise CacheMismatchError(
                f"{self.store} was written in cache format v{self.manifest['format_version']}"
                f"; this code writes v{FORMAT_VERSION} and does not mix the two: encode "
                "into a new --out")
        self.dataset = dataset_sha256(self.manifest)
        self._writers = {b: WRITERS[b](self.store, self.spec) for b in self.spec.backends}

    def is_done(self, shard: int) -> bool:
        return all(read_done_marker(self.store, b, shard) is not None
                   for b in self.spec.backends)

    def pending_shards(self) -> list[int]:
        done = set.intersection(*(done_shards(self.store, b) for b in self.spec.backends))
        return [k for k in range(self.spec.num_shards) if k not in done]

    def prepare(self, shard: int, arrays: Mapping[str, np.ndarray],
                failures: Mapping[int, str]) -> dict[str, np.ndarray]:
        """Check a shard's logical arrays and convert them to the stored dtypes."""
        spec, fields = self.spec, self.spec.fields
        start, stop = spec.shard_range(shard)
        n = stop - start
        need = (MOMENTS, TOKENS, CLS, LABEL, KEY) + ((ATTN,) if spec.attn_blocks else ())
        missing = [k for k in need if k not in arrays]
        if missing:
            raise ValueError(f"shard {shard}: missing fields {missing} (need {list(need)})")
        bad_rows = [i for i in failures if not 0 <= i < n]
        if bad_rows:
            raise ValueError(f"shard {shard}: failure offsets {bad_rows} outside [0, {n})")
        ok = np.ones(n, dtype=bool)
        ok[list(failures)] = False
        out: dict[str, np.ndarray] = {}
        for name in need:
            a = np.asarray(arrays[name])
            want = fields[name].shape if name != TOKENS else (spec.views, spec.tokens,
                                                               spec.token_dim)
            if a.shape != (n, *want):
                raise ValueError(f"shard {shard}: field {name!r} has shape {a.shape}, "
                                 f"expected {(n, *want)}")
            if a.dtype.kind == "f" and name != ATTN:   # ATTN: checked once, as stored
                bad = ok & ~np.isfinite(a.reshape(n, -1)).all(axis=1)
                if bad.any():
                    raise ValueError(f"shard {shard}: field {name!r} has NaN/Inf in rows "
                                     f"{(np.flatnonzero(bad) + start).tolist()[:10]} "
                                     "(global indices)")
            out[name] = a
        # one converting copy per field; rows of failed samples are then zeroed in place
        for name, dtype in ((MOMENTS, fields[MOMENTS].dtype), (CLS, fields[CLS].dtype),
                            (TOKENS, "float32" if spec.token_dtype == "int8" else "float16"),
                            (LABEL, "int64")):
            out[name] = out[name].astype(dtype)
            out[name][~ok] = -1 if name == LABEL else 0
        if spec.token_dtype == "int8":
            out[TOKENS], out[TOKENS_SCALE] = quantize_tokens(out[TOKENS])
        if ATTN in out:
            out.update(self._attention(shard, out[ATTN], ok))
        out[INDEX] = np.arange(start, stop, dtype=np.int64)
        out[KEY] = np.asarray([str(k) for k in out[KEY]], dtype=object)
        return out

    def _attention(self, shard: int, qk: np.ndarray, ok: np.ndarray) -> dict[str, np.ndarray]:
        """q, k [n, V, L, 2, H, T, d] in storage form. 3 MiB per sample and view at 256 px
        (DINOv2-B, 4 blocks): no converting copy when they come as fp16 (the encoder's
        output), and one check that the fp16 values are finite (q, k beyond fp16's range
        would be stored as Inf)."""
        qk = qk.astype(np.float32 if self.spec.attn_dtype == "int8" else np.float16,
                       copy=False)
        if not ok.all():   # a copy: the caller's array (may be read-only: Ray's) stays
            qk = qk.copy()
            qk[~ok] = 0
        bad = ok & ~np.isfinite(qk.reshape(len(qk), -1)).all(axis=1)
        if bad.any():
            start = self.spec.shard_range(shard)[0]
            raise ValueError(f"shard {shard}: teacher q/k of rows "
                             f"{(np.flatnonzero(bad) + start).tolist()[:10]} (global indices) "
                             "are not finite in fp16 (NaN, or beyond its range)")
        if self.spec.attn_dtype == "int8":
            q, scale = quantize_tokens(qk)
            return {ATTN: q, ATTN_SCALE: scale}
        return {ATTN: qk}

    def write_shard(self, shard: int, arrays: Mapping[str, np.ndarray],
                    failures: Mapping[int, str] | None = None, *,
                    overwrite: bool = False) -> bool:
        """Write shard `shard` to every backend that has not finished it.

        `arrays` holds the shard's samples in order: moments [n, V, 2C, H/8, W/8] and
        tokens [n, V, T, D] and cls [n, V, D] as floats, label [n] ints, key [n] strings.
        `failures` maps local offsets of samples that failed to encode to a reason; their
        rows are ignored. Returns False if the shard was already done (nothing written).
        """
        shard = int(shard)  # numpy integers are not JSON-serializable
        failures = {int(i): str(r) for i, r in (failures or {}).items()}
        todo = [b for b in self.spec.backends
                if overwrite or read_done_marker(self.store, b, shard) is None]
        if not todo:
            return False
        stored = self.prepare(shard, arrays, failures)
        start, stop = self.spec.shard_range(shard)
        marker = {
            "shard": shard, "start": start, "stop": stop,
            "num_samples": stop - start - len(failures),
            "failures": [{"index": start + i, "key": str(stored[KEY][i]), "reason": r}
                         for i, r in sorted(failures.items())],
            "latent_sums": self._latent_sums(stored[MOMENTS], failures).tolist(),
        }
        store = self.store
        for backend in todo:
            marker_key = done_marker_key(backend, shard)
            store.remove(marker_key)
            store.remove_stale_tmp(marker_key)
            files = self._writers[backend].write_shard(shard, stored, failed=set(failures))
            # done marker last: its presence means every file above is complete. The
            # checksums are of the files as stored (read back, also from a remote store)
            digests = {rel: file_digest(store, rel, backend, self.spec) for rel in files}
            unreadable = [d["problem"] for d in digests.values() if "problem" in d]
            if unreadable:  # read back wrong right after writing: never mark it done
                raise OSError(f"shard {shard} reads back damaged: {unreadable[0]}")
            store.write_bytes(marker_key, json_bytes({
                **marker,
                "dataset": self.dataset,
                "files": {rel: {"bytes": d["bytes"], "sha256": d["sha256"]}
                          for rel, d in digests.items()},
                "checksums": {rel: d["checksums"] for rel, d in digests.items()},
                "written": _now(),
            }))
        return True

    def _latent_sums(self, moments: np.ndarray, failures: Mapping[int, str]) -> np.ndarray:
        """[4, C] count, sum(mean), sum(mean^2), sum(std^2) per channel over valid rows."""
        c = self.spec.latent_channels
        ok = np.ones(len(moments), dtype=bool)
        ok[list(failures)] = False
        m = moments[ok].astype(np.float64)
        mean, std = m[:, :, :c], m[:, :, c:]
        axes = (0, 1, 3, 4)
        count = np.full(c, mean.size // c if c else 0, dtype=np.float64)
        return np.stack([count, mean.sum(axes), (mean**2).sum(axes), (std**2).sum(axes)])


def finalize_cache(root: str | Path | Store, provenance_update: Mapping[str, Any] | None = None
                   ) -> dict[str, Any]:
    """Check that every shard of every backend is done, gather the shard table, failures
    and latent statistics into the manifest and mark it complete (written last)."""
    root = Store.of(root)
    m = read_manifest(root)
    spec = CacheSpec.from_json(m["spec"])
    dataset = dataset_sha256(m)
    shards: dict[str, list] = {}
    missing, damaged = [], []
    markers = []
    for backend in spec.backends:
        table = []
        with ThreadPoolExecutor(16) as pool:  # one request each on a remote store
            read = list(pool.map(lambda k, b=backend: read_done_marker(root, b, k),
                                 range(spec.num_shards)))
        for k, mk in enumerate(read):
            if mk is None:
                missing.append(f"{backend}:{k}")
                continue
            problems = check_marker(mk, spec, backend, k, version=m["format_version"],
                                    dataset=dataset)
            if problems:
                damaged.append(f"{root}/_done/{backend}/{k:06d}.json: {problems[0]}")
                continue
            table.append({"shard": k, "status": "done", "num_samples": mk["num_samples"],
                          "files": mk["files"]})
            if backend == spec.backends[0]:
                markers.append(mk)
        shards[backend] = table
    if damaged:
        raise DamagedCacheError(
            f"{len(damaged)} done marker(s) are damaged; delete them and rerun the encode "
            "job to rewrite those shards:\n  " + "\n  ".join(damaged[:20]))
    if missing:
        raise IncompleteCacheError(
            f"{root}: {len(missing)} shard(s) not done: {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}; rerun the encode job to finish them")
    failures = [f for mk in markers for f in mk["failures"]]
    sums = np.sum([np.asarray(mk["latent_sums"]) for mk in markers], axis=0)
    m["status"] = "complete"
    m["num_samples"] = spec.num_samples
    m["num_valid"] = spec.num_samples - len(failures)
    m["failures"] = failures
    m["latent"]["channel_stats"] = latent_channel_stats(sums, m["latent"]["scale"])
    m["shards"] = shards
    m["finalized"] = _now()
    if provenance_update:
        m["provenance"].update(provenance_update)
    m = sealed(m)
    root.write_bytes(MANIFEST_NAME, json_bytes(m))
    return m
