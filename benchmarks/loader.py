"""Training-loader throughput against a raw memory-mapped gather of the same bytes.

    python benchmarks/loader.py [--samples 2048] [--dir /tmp/urepa-bench] [--workers 0]
                                [--via-url] [--attn 4] [--backends zarr,wds]

Builds (once) a synthetic cache with real 256 px shapes: moments fp16 [1, 8, 32, 32],
DINOv2-B tokens fp16 [1, 256, 768], cls fp16 [1, 768], in both backends, plus one raw
.npy file per field. Then, in one process, times the CacheLoader (batch 256, block
shuffle + shuffle buffer) and a raw `np.load(mmap_mode="r")[idx]` gather of exactly the
same batches (same indices, fields and bytes), alternating the two, page cache warm.
Prints samples/s, GB/s and loader/raw per backend, and what the read checks cost (the
loader that checks each chunk/member against its CRC32C the first time it reads it, the
default, against the same loader with `verify=False`), on a first pass and warm. --via-url also times the loader on
the same cache opened as a file:// URL, i.e. through fsspec like a remote store (zarr's
ranged reads, wds tars fetched whole), against the local path.

--attn L adds HASTE's attention field for L teacher blocks of DINOv2-B (attn_qk fp16
[1, L, 2, 12, 256, 64]: 3 MiB per sample at L = 4) to the cache, the raw files and the
fields read, and prints the bytes of one training step at --batch-size before tau (moments,
tokens, attn_qk, label) and after it (moments, label: the loader HASTE switches to), with
that loader's throughput. Mind the disk and page cache: 3.4 MB per sample per copy.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache import CacheLoader, CacheSpec, LoaderConfig, open_cache  # noqa: E402
from cache.synthetic import write_synthetic_cache  # noqa: E402

FIELDS = ("moments", "tokens", "cls", "label")
AFTER_TAU = ("moments", "label")   # what HASTE reads once its alignment has ended


def build(root: Path, n: int, shard_size: int, attn: int = 0,
          backends: tuple[str, ...] = ("zarr", "wds")) -> tuple[Path, Path]:
    extra = dict(attn_blocks=tuple(range(8, 8 + attn)), attn_heads=12, attn_head_dim=64) \
        if attn else {}
    spec = CacheSpec(num_samples=n, shard_size=shard_size, chunk_size=8, backends=backends,
                     **extra)
    tag = f"-attn{attn}" if attn else ""
    cache, raw = root / f"cache-{n}{tag}-{'+'.join(backends)}", root / f"raw-{n}{tag}"
    if not (cache / "manifest.json").exists() or \
            open_cache(cache, allow_partial=True).manifest.get("status") != "complete":
        t = time.perf_counter()
        write_synthetic_cache(cache, spec)
        print(f"built cache of {n} samples in {time.perf_counter() - t:.1f} s")
    if not (raw / "tokens.npy").exists():
        raw.mkdir(parents=True, exist_ok=True)
        ds = open_cache(cache)
        for f in FIELDS + (("attn_qk",) if attn else ()):  # the cache's stored values
            np.save(raw / f"{f}.npy", ds.gather(np.arange(n), [f])[f])
    return cache, raw


def time_loader(loader: CacheLoader) -> tuple[float, int]:
    t = time.perf_counter()
    n = 0
    for batch in loader:
        n += len(batch["label"])
    return time.perf_counter() - t, n


def epoch(loader: CacheLoader) -> tuple[float, int]:
    """time_loader over epoch 0 again."""
    loader.set_epoch(0)
    return time_loader(loader)


def alternating(repeats: int, **runs) -> dict[str, float]:
    """Median samples/s of each run (a function returning (seconds, samples)), the runs
    taking turns `repeats` times."""
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, run in runs.items():
            dt, n = run()
            rates[k].append(n / dt)
    return {k: statistics.median(v) for k, v in rates.items()}


def time_raw(arrays: dict, batches: list[np.ndarray]) -> tuple[float, int]:
    t = time.perf_counter()
    n = 0
    for idx in batches:
        out = {f: a[idx] for f, a in arrays.items()}  # one gather per field, like a loader
        n += len(out["label"])
    return time.perf_counter() - t, n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--dir", type=Path, default=Path("/tmp/urepa-bench"))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--shuffle-buffer", type=int, default=1024)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--via-url", action="store_true",
                   help="also read the cache through fsspec (file:// URL)")
    p.add_argument("--attn", type=int, default=0, metavar="L",
                   help="add HASTE's attn_qk field for L DINOv2-B blocks (4: 3 MiB/sample)")
    p.add_argument("--backends", default="zarr,wds", help="zarr, wds or zarr,wds")
    args = p.parse_args()

    backends = tuple(args.backends.split(","))
    fields = FIELDS + (("attn_qk",) if args.attn else ())
    cache, raw_dir = build(args.dir, args.samples, args.shard_size, args.attn, backends)
    raw = {f: np.load(raw_dir / f"{f}.npy", mmap_mode="r") for f in fields}
    bytes_per_sample = sum(a[0].nbytes for a in raw.values())
    print(f"machine: {platform.node()} {platform.machine()}, python {platform.python_version()}"
          f"; {args.samples} samples x {bytes_per_sample} B, batch {args.batch_size}, "
          f"workers {args.workers}; {time.strftime('%Y-%m-%d')}")
    if args.attn:
        step = {name: sum(raw[f][0].nbytes for f in names) * args.batch_size
                for name, names in (("before tau", ("moments", "tokens", "attn_qk", "label")),
                                    ("after tau", AFTER_TAU))}
        print(f"bytes per training step (batch {args.batch_size}): before tau "
              f"{step['before tau'] / 2**20:,.1f} MiB (moments, tokens, attn_qk, label), "
              f"after tau {step['after tau'] / 2**20:,.2f} MiB (moments, label): "
              f"{step['before tau'] / step['after tau']:.0f}x fewer")
    results = {}
    for backend in backends:
        cfg = LoaderConfig(batch_size=args.batch_size, fields=fields, block_size=args.block_size,
                           shuffle_buffer=args.shuffle_buffer, num_workers=args.workers,
                           backend=backend, pin_memory=False)
        loader = CacheLoader(cache, cfg)
        # the raw baseline gathers exactly the loader's batches
        batches = [b["index"].numpy() for b in CacheLoader(
            cache, LoaderConfig(**{**cfg.__dict__, "fields": ("index",)}))]
        # first pass: fresh mappings and buffers on both sides (page cache already warm)
        fresh_raw = {f: np.load(raw_dir / f"{f}.npy", mmap_mode="r") for f in fields}
        dt_l, n_l = time_loader(loader)
        dt_r, n_r = time_raw(fresh_raw, batches)
        print(f"{backend:5s} first pass: loader {n_l / dt_l:8.0f} samples/s | raw "
              f"{n_r / dt_r:8.0f} samples/s | ratio {(n_l / dt_l) / (n_r / dt_r):.2f}x")
        # the read checks: each chunk/member is checked the first time a reader uses it,
        # so they cost on a fresh loader's epoch (new mappings and buffers on both sides,
        # alternating) and not after
        fresh: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):
            for verify in (True, False):
                dt, n = time_loader(CacheLoader(cache, LoaderConfig(
                    **{**cfg.__dict__, "verify": verify})))
                fresh[verify].append(n / dt)
        fc, fu = statistics.median(fresh[True]), statistics.median(fresh[False])
        print(f"{backend:5s} fresh loader, read checks: checked {fc:8.0f} vs unchecked "
              f"(verify=False) {fu:8.0f} samples/s | ratio {fc / fu:.2f}x")
        unchecked = CacheLoader(cache, LoaderConfig(**{**cfg.__dict__, "verify": False}))
        time_loader(unchecked)  # its first pass, as the checked loader's above
        warm = alternating(args.repeats, loader=lambda: epoch(loader),
                           raw=lambda: time_raw(raw, batches),
                           unchecked=lambda: epoch(unchecked))
        lo, ra, un = warm["loader"], warm["raw"], warm["unchecked"]
        results[backend] = lo / ra
        print(f"{backend:5s} warm: loader {lo:8.0f} samples/s {lo * bytes_per_sample / 1e9:6.2f} GB/s | "
              f"raw mmap gather {ra:8.0f} samples/s {ra * bytes_per_sample / 1e9:6.2f} GB/s | "
              f"ratio {lo / ra:.2f}x")
        print(f"{backend:5s} warm read checks: checked {lo:8.0f} vs unchecked "
              f"{un:8.0f} samples/s | ratio {lo / un:.2f}x")
        if args.attn:   # the loader HASTE switches to at tau, against its own raw gather
            after = CacheLoader(cache, LoaderConfig(**{**cfg.__dict__, "fields": AFTER_TAU}))
            raw_after = {f: raw[f] for f in AFTER_TAU}
            tau = alternating(args.repeats, loader=lambda: epoch(after),
                              raw=lambda: time_raw(raw_after, batches))
            a, ra2 = tau["loader"], tau["raw"]
            print(f"{backend:5s} after tau (moments, label): loader {a:8.0f} samples/s | raw "
                  f"{ra2:8.0f} samples/s | ratio {a / ra2:.2f}x; {a / lo:.1f}x the samples/s "
                  "before tau")
        if args.via_url:
            url_loader = CacheLoader(f"file://{cache.absolute()}", cfg)
            t_url = []
            for _ in range(args.repeats):
                url_loader.set_epoch(0)
                dt, n = time_loader(url_loader)
                t_url.append(n / dt)
            u = statistics.median(t_url)
            print(f"{backend:5s} via file:// URL (fsspec): {u:8.0f} samples/s "
                  f"{u * bytes_per_sample / 1e9:6.2f} GB/s | vs local path {u / lo:.2f}x")
    print("goal: >= 0.8x raw in one process: " +
          ", ".join(f"{b} {'met' if r >= 0.8 else 'NOT met'}" for b, r in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
