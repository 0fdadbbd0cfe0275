"""`make demo`: the embedded default, end to end on this machine.

Today the demo exercises the cache, the contract between the two halves: it writes a
synthetic cache with real 256 px shapes (SD-VAE moments [1, 8, 32, 32], DINOv2-B tokens
[1, 256, 768], CLS [1, 768]) in both formats, inspects and verifies it, and streams one
epoch through the training loader. `pipeline encode` (issue 3), `train run` (issue 4)
and sampling (issue 5) join it as they land.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from cache import CacheLoader, CacheSpec, LoaderConfig, open_cache
from cache.synthetic import write_synthetic_cache

from . import cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--samples", type=int, default=512)
    args = p.parse_args(argv)
    cache = args.out / "cache"
    shutil.rmtree(cache, ignore_errors=True)

    spec = CacheSpec(num_samples=args.samples, shard_size=128, chunk_size=8,
                     backends=("zarr", "wds"), token_dtype="float16")
    print(f"[1/4] writing a synthetic cache: {args.samples} samples x "
          f"{spec.bytes_per_sample / 1024:.0f} KiB, {spec.num_shards} shards, zarr + wds")
    t = time.perf_counter()
    write_synthetic_cache(cache, spec, failures={7: "demo: a corrupt input"})
    print(f"      {time.perf_counter() - t:.1f} s -> {cache}")

    print("[2/4] pipeline inspect")
    cli.main(["inspect", str(cache), "--max-failures", "3"])
    print("[3/4] pipeline verify")
    if cli.main(["verify", str(cache)]) != 0:
        return 1

    print("[4/4] one epoch through the training loader (batch 64, moments + tokens + label)")
    for backend in spec.backends:
        loader = CacheLoader(open_cache(cache, backend=backend),
                             LoaderConfig(batch_size=64, shuffle_buffer=256, backend=backend))
        t, n = time.perf_counter(), 0
        for batch in loader:
            n += len(batch["label"])
        dt = time.perf_counter() - t
        shapes = {k: tuple(v.shape) for k, v in batch.items()}
        print(f"      {backend:4s}: {len(loader)} batches, {n / dt:,.0f} samples/s; last batch {shapes}")
    print(f"\ndone. The cache is in {cache}; `pipeline stats {cache}` summarises it.")
    print("pipeline encode, train run and train sample join this demo with issues 3-5.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
