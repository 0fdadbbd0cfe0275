"""Training-loader throughput against the machine's limits and a peer reader.

    python benchmarks/loader.py [--samples 2048] [--workers 2] [--repeats 7] [--epochs 3]
                                [--modes warm,workers,cold] [--backends zarr,wds]
                                [--peers safetensors] [--json out.json]
                                [--checks] [--via-url] [--attn L] [--dir /tmp/urepa-bench]

Builds (once) a synthetic cache with real 256 px shapes (moments fp16 [1, 8, 32, 32],
DINOv2-B tokens fp16 [1, 256, 768], cls fp16 [1, 768], label: 411 KB per sample) in both
backends, and the same values as one safetensors file per shard for the peer. Then times
one epoch of batches of 256 (block shuffle + shuffle buffer) in three modes:

- warm: page cache warm, in the loading process (`--workers 0`);
- workers: page cache warm, through `--workers` DataLoader worker processes;
- cold: the files dropped from the page cache (posix_fadvise DONTNEED: no root needed)
  and a fresh reader's first epoch, in process.

Limits, measured in the same run: warm modes against a plain memcpy of the same bytes,
sample by sample into a reused batch buffer (what any loader must at least do), taking
turns with the readers; cold against a sequential read of the same files after dropping
them (what the disk gives a `cat`). The peer ("safetensors") reads each sample from its shard with
safetensors' safe_open (LightningDiT-style latents) and batches with DataLoader's default
collate. Every figure is the median of --repeats runs, with the spread (min-max).

--checks adds what the read checks cost (a fresh loader's epoch, each chunk/member checked
against its CRC32C the first time: the default, against `verify=False`). --via-url adds
the loader on the cache opened as a file:// URL (fsspec, like a remote store). --attn L
adds HASTE's attention field for L DINOv2-B blocks (3 MiB per sample at L = 4) to what is
read, and prints the bytes of one step before and after tau.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache import CacheLoader, CacheSpec, LoaderConfig, open_cache  # noqa: E402
from cache.synthetic import write_synthetic_cache  # noqa: E402

FIELDS = ("moments", "tokens", "cls", "label")
AFTER_TAU = ("moments", "label")   # what HASTE reads once its alignment has ended
Run = Callable[[], tuple[float, int]]  # -> (seconds, samples)


def build(root: Path, n: int, shard_size: int, attn: int = 0,
          backends: tuple[str, ...] = ("zarr", "wds")) -> Path:
    extra = dict(attn_blocks=tuple(range(8, 8 + attn)), attn_heads=12, attn_head_dim=64) \
        if attn else {}
    spec = CacheSpec(num_samples=n, shard_size=shard_size, chunk_size=8, backends=backends,
                     **extra)
    tag = f"-attn{attn}" if attn else ""
    cache = root / f"cache-{n}{tag}-{'+'.join(backends)}"
    if not (cache / "manifest.json").exists() or \
            open_cache(cache, allow_partial=True).manifest.get("status") != "complete":
        t = time.perf_counter()
        write_synthetic_cache(cache, spec)
        print(f"built cache of {n} samples in {time.perf_counter() - t:.1f} s")
    return cache


def cache_files(cache: Path, backend: str, fields: tuple[str, ...]) -> list[Path]:
    """The files a loader of `fields` reads: zarr shard objects of those fields, or tars."""
    if backend == "wds":
        return sorted((cache / "wds").glob("*.tar"))
    return sorted(p for f in fields for p in (cache / "zarr" / f / "c").rglob("*")
                  if p.is_file())


def drop_from_page_cache(files: list[Path]) -> None:
    """Evict the files' pages (clean pages go at once; fsync first writes back dirty ones).
    Pages still mapped by a reader stay: collect dropped readers first."""
    gc.collect()
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sequential_read(files: list[Path], samples: int) -> Run:
    """Read the (dropped) files front to back in 8 MiB requests: the disk's speed."""
    def run() -> tuple[float, int]:
        drop_from_page_cache(files)
        buf = bytearray(8 << 20)
        t = time.perf_counter()
        for p in files:
            with open(p, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
        return time.perf_counter() - t, samples
    return run


def disk_bytes_read() -> int:
    """Bytes this process has had read from the disk (not the page cache) so far."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def memcpy(sample_bytes: int, batches: int, batch_size: int) -> Run:
    """Copy a batch's bytes into a reused batch buffer one sample at a time (what any
    loader does at least), `batches` times. One copy of the whole batch runs at about
    the same speed here, a little slower (glibc's non-temporal stores)."""
    src = np.ones((batch_size, sample_bytes), np.uint8)
    dst = np.empty_like(src)

    def run() -> tuple[float, int]:
        t = time.perf_counter()
        for _ in range(batches):
            for i in range(batch_size):
                dst[i] = src[i]
        return time.perf_counter() - t, batches * batch_size
    return run


def epoch(loader, epochs: int = 1) -> tuple[float, int]:
    """`epochs` epochs of `loader` (ours: epoch 0 again, the same batches every time)."""
    t = time.perf_counter()
    n = 0
    for _ in range(epochs):
        if isinstance(loader, CacheLoader):
            loader.set_epoch(0)
        for batch in loader:
            n += len(batch["label"])
    return time.perf_counter() - t, n


# ------------------------------------------------------------------- the peer reader
def write_safetensors(cache: Path, out: Path, fields: tuple[str, ...]) -> list[Path]:
    """The cache's values as one safetensors file per shard (tensors named by field)."""
    from safetensors.numpy import save_file
    ds = open_cache(cache)
    files = []
    for k in range(ds.spec.num_shards):
        path = out / f"shard-{k:06d}.safetensors"
        if not path.exists():
            out.mkdir(parents=True, exist_ok=True)
            data = ds.gather(np.arange(*ds.spec.shard_range(k)), list(fields))
            save_file({f: np.ascontiguousarray(a) for f, a in data.items()},
                      str(path) + ".tmp")
            os.replace(str(path) + ".tmp", path)
        files.append(path)
    return files


class SafetensorsSamples(torch.utils.data.Dataset):
    """Per-sample reads from safetensors shards, as latent-caching trainers do; the
    files are opened once per process."""

    def __init__(self, files: list[Path], shard_size: int, fields: tuple[str, ...]):
        self.files, self.shard_size, self.fields = files, shard_size, fields
        self._open: dict[int, object] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}

    def __len__(self) -> int:
        return len(self.files) * self.shard_size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from safetensors import safe_open
        shard, row = divmod(int(i), self.shard_size)
        f = self._open.get(shard)
        if f is None:
            f = self._open[shard] = safe_open(str(self.files[shard]), framework="pt")
        return {name: f.get_slice(name)[row] for name in self.fields}


def peer_loader(files: list[Path], shard_size: int, fields: tuple[str, ...],
                order: np.ndarray, batch_size: int, workers: int):
    return torch.utils.data.DataLoader(
        SafetensorsSamples(files, shard_size, fields), batch_size=batch_size,
        sampler=order.tolist(), num_workers=workers, persistent_workers=workers > 0,
        multiprocessing_context="forkserver" if workers else None)


# ------------------------------------------------------------------- measuring
def taking_turns(repeats: int, runs: dict[str, Run]) -> dict[str, list[float]]:
    """samples/s of each run, the runs taking turns `repeats` times."""
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, run in runs.items():
            dt, n = run()
            rates[k].append(n / dt)
    return rates


def row(reader: str, mode: str, rates: list[float], limit: float, bytes_per_sample: int
        ) -> dict:
    med = statistics.median(rates)
    return {"reader": reader, "mode": mode, "samples_per_s": round(med),
            "min": round(min(rates)), "max": round(max(rates)),
            "GB_per_s": round(med * bytes_per_sample / 1e9, 2),
            "vs_limit": round(med / limit, 2)}


def print_table(rows: list[dict]) -> None:
    print(f"{'reader':22s} {'mode':8s} {'samples/s':>9s} {'spread':>15s} {'GB/s':>6s} "
          f"{'x limit':>7s}")
    for r in rows:
        read = (f"  {r['read_from_disk']:.0%} of its files read from the disk"
                if "read_from_disk" in r else "")
        print(f"{r['reader']:22s} {r['mode']:8s} {r['samples_per_s']:9,d} "
              f"{r['min']:7,d}-{r['max']:<7,d} {r['GB_per_s']:6.2f} {r['vs_limit']:6.2f}x{read}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--dir", type=Path, default=Path("/tmp/urepa-bench"))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--shuffle-buffer", type=int, default=1024)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers in 'workers'")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--epochs", type=int, default=3, help="epochs per timed warm run")
    p.add_argument("--modes", default="warm,workers,cold")
    p.add_argument("--backends", default="zarr,wds", help="zarr, wds or zarr,wds")
    p.add_argument("--peers", default="safetensors", help="safetensors, or '' for none")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--checks", action="store_true", help="what the read checks cost")
    p.add_argument("--via-url", action="store_true",
                   help="also read the cache through fsspec (file:// URL)")
    p.add_argument("--attn", type=int, default=0, metavar="L",
                   help="add HASTE's attn_qk field for L DINOv2-B blocks (4: 3 MiB/sample)")
    args = p.parse_args()

    backends = tuple(args.backends.split(","))
    modes = set(args.modes.split(","))
    fields = FIELDS + (("attn_qk",) if args.attn else ())
    cache = build(args.dir, args.samples, args.shard_size, args.attn, backends)
    spec = open_cache(cache).spec
    per_sample = sum(spec.fields[f].nbytes for f in fields)
    B = args.batch_size
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}; "
          f"{args.samples} samples x {per_sample:,} B, batch {B}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    if args.attn:
        step = {name: sum(spec.fields[f].nbytes for f in names) * B
                for name, names in (("before", ("moments", "tokens", "attn_qk", "label")),
                                    ("after", AFTER_TAU))}
        print(f"bytes per training step (batch {B}): before tau {step['before'] / 2**20:,.1f}"
              f" MiB, after tau {step['after'] / 2**20:,.2f} MiB: "
              f"{step['before'] / step['after']:.0f}x fewer")

    def cfg(backend: str, **kw) -> LoaderConfig:
        return LoaderConfig(**{**dict(batch_size=B, fields=fields, block_size=args.block_size,
                                      shuffle_buffer=args.shuffle_buffer, backend=backend,
                                      pin_memory=False), **kw})

    ours = {f"ours, {b}": b for b in backends}
    order = np.concatenate([b["index"].numpy() for b in CacheLoader(
        cache, cfg(backends[0], fields=("index",)))])
    batches = len(order) // B
    peers = [x for x in args.peers.split(",") if x]
    st_files = write_safetensors(cache, args.dir / f"safetensors-{args.samples}-{args.attn}",
                                 fields) if peers else []

    def reader(name: str, workers: int):
        if name in ours:
            return CacheLoader(cache, cfg(ours[name], num_workers=workers))
        return peer_loader(st_files, spec.shard_size, fields, order, B, workers)
    names = list(ours) + (["safetensors (peer)"] if peers else [])
    rows = []
    if "cold" in modes:  # first: no reader of the warm modes holds a file mapped
        files = {n: (cache_files(cache, ours[n], fields) if n in ours else st_files)
                 for n in names}
        read: dict[str, list[float]] = {n: [] for n in names}  # share of the files read

        def cold(n: str, workers: int) -> Run:
            def run() -> tuple[float, int]:
                ld = reader(n, workers)
                if workers and n in ours:
                    ld.start()  # worker start-up is not reading: not timed
                drop_from_page_cache(files[n])
                before = disk_bytes_read()
                out = epoch(ld)
                if not workers:  # what workers read is counted in their processes
                    read[n].append((disk_bytes_read() - before) / sum(
                        p.stat().st_size for p in files[n]))
                return out
            return run
        runs = {}
        for n in names:  # each reader, and a sequential read of its files, taking turns
            runs[f"disk read ({n.split(' (')[0]})"] = sequential_read(files[n], args.samples)
            runs[n] = cold(n, 0)
            if n in ours and "workers" in modes:
                runs[f"{n} +{args.workers}w"] = cold(n, args.workers)
        rates = taking_turns(args.repeats, runs)
        limit = None
        for n, r in rates.items():
            if n.startswith("disk read"):
                limit = statistics.median(r)
            extra = {"read_from_disk": round(statistics.median(read[n]), 2)} if read.get(n) \
                else {}
            rows.append({**row(n, "cold", r, limit, per_sample), **extra})
    for mode, workers in (("warm", 0), ("workers", args.workers)):
        if mode not in modes:
            continue
        loaders = {n: reader(n, workers) for n in names}
        for ld in loaders.values():
            epoch(ld)  # opens files, starts workers, fills buffers
        e = args.epochs
        rates = taking_turns(args.repeats, {"memcpy": memcpy(per_sample, batches * e, B),
                                            **{n: (lambda ld=ld: epoch(ld, e))
                                               for n, ld in loaders.items()}})
        limit = statistics.median(rates["memcpy"])
        rows += [row(n, mode, r, limit, per_sample) for n, r in rates.items()]
        del loaders
    print("limits: warm modes against memcpy of the same bytes sample by sample; cold "
          "against a sequential read of the reader's own files, both after dropping them "
          "from the page cache")
    print_table(rows)

    for name, backend in ours.items():
        if args.checks:
            rates = taking_turns(args.repeats, {
                "checked": lambda: epoch(CacheLoader(cache, cfg(backend))),
                "unchecked": lambda: epoch(CacheLoader(cache, cfg(backend, verify=False)))})
            c, u = (statistics.median(rates[k]) for k in ("checked", "unchecked"))
            print(f"{name}: a fresh loader's epoch, read checks on {c:,.0f} vs verify=False "
                  f"{u:,.0f} samples/s: {c / u:.2f}x")
        if args.attn:
            after = CacheLoader(cache, cfg(backend, fields=AFTER_TAU))
            epoch(after)
            a = statistics.median(taking_turns(args.repeats, {"a": lambda: epoch(after)})["a"])
            print(f"{name}: after tau (moments, label) {a:,.0f} samples/s")
        if args.via_url:
            url = CacheLoader(f"file://{cache.absolute()}", cfg(backend))
            local = CacheLoader(cache, cfg(backend))
            epoch(url), epoch(local)
            rates = taking_turns(args.repeats, {"url": lambda: epoch(url),
                                                "local": lambda: epoch(local)})
            u, lo = (statistics.median(rates[k]) for k in ("url", "local"))
            print(f"{name}: via file:// URL (fsspec) {u:,.0f} samples/s, {u / lo:.2f}x the "
                  "local path")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": platform.node(), "cores": os.cpu_count(), "date": time.strftime("%F"),
            "numpy": np.__version__, "torch": torch.__version__, "samples": args.samples,
            "bytes_per_sample": per_sample, "batch_size": B, "workers": args.workers,
            "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
