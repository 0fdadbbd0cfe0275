"""`make demo`, first half: the embedded default of the encode side on this machine.

It generates the demo image set, runs `pipeline encode` on embedded Ray (real SD-VAE and
DINOv2-B weights when they are in the local Hugging Face cache, otherwise small random-init
models of the same structure, and it says which), inspects and verifies the cache, and
streams one epoch through the training loader. It writes OUT/train-overrides, the
`train run configs/demo.yaml` overrides that fit the cache it made; the Makefile then runs
`train run`, `train sample` and `train plot` (this package never imports `train`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from cache import CacheLoader, LoaderConfig, open_cache

from . import cli


def _real_weights_available() -> bool:
    """Both models' files already on this machine (nothing is downloaded by the demo)."""
    from huggingface_hub import try_to_load_from_cache
    return all(isinstance(try_to_load_from_cache(repo, name), str) for repo, name in (
        ("stabilityai/sd-vae-ft-mse", "config.json"),
        ("timm/vit_base_patch14_dinov2.lvd142m", "model.safetensors")))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("demo_out"),
                   help="everything goes here; the Makefile expects demo_out")
    p.add_argument("--random", action="store_true",
                   help="small random-init models even when real weights are present")
    args = p.parse_args(argv)
    cache = args.out / "cache"
    real = not args.random and _real_weights_available()
    encode = ["encode", "--dataset", "demo", "--data-dir", str(args.out / "images"),
              "--out", str(cache), "--format", "both", "--shard-size", "64",
              "--max-failures", "0",
              "--encoder-threads", str(max(1, (os.cpu_count() or 2) - 1))]
    if real:
        # ~1 image/s on 2 CPU cores at the real sizes: 64 images, one per 5 of the set
        print("[1/4] pipeline encode: real SD-VAE (ft-mse) and DINOv2-B weights found in "
              "the local Hugging Face cache; 64 images at 256 px")
        encode += ["--resolution", "256", "--limit", "64"]
    else:
        print("[1/4] pipeline encode with RANDOM-INIT small models (--vae tiny --teacher "
              "dinov2-tiny --random-weights): the demo runs the real pipeline, not real "
              "features. Real runs: see README, 'Encoding ImageNet'.")
        encode += ["--resolution", "128", "--vae", "tiny", "--teacher", "dinov2-tiny",
                   "--random-weights"]
    t = time.perf_counter()
    if cli.main(encode) != 0:
        return 1
    print(f"      {time.perf_counter() - t:.1f} s -> {cache}")

    print("[2/4] pipeline inspect")
    cli.main(["inspect", str(cache), "--max-failures", "3"])
    print("[3/4] pipeline verify")
    if cli.main(["verify", str(cache)]) != 0:
        return 1

    print("[4/4] one epoch through the training loader (batch 64, moments + tokens + label)")
    for backend in ("zarr", "wds"):
        loader = CacheLoader(open_cache(cache, backend=backend),
                             LoaderConfig(batch_size=64, shuffle_buffer=256, backend=backend))
        t, n = time.perf_counter(), 0
        for batch in loader:
            n += len(batch["label"])
        dt = time.perf_counter() - t
        shapes = {k: tuple(v.shape) for k, v in batch.items()}
        print(f"      {backend:4s}: {len(loader)} batches, {n / dt:,.0f} samples/s; "
              f"last batch {shapes}")
    # configs/demo.yaml fits the random-init cache (128 px, 64-wide tokens); real weights
    # make 256 px latents and DINOv2-B's 768-wide tokens, and decode with the VAE found
    # locally (ft-mse; the papers decode with ft-ema, which may not be here)
    decoder = "stabilityai/sd-vae-ft-mse"
    overrides = f"model.latent_size=32 align.teacher_dim=768 preview.vae={decoder}" if real else ""
    (args.out / "train-overrides").write_text(overrides + "\n")
    (args.out / "sample-args").write_text((f"--vae {decoder}" if real else "") + "\n")
    print(f"\ndone. The cache is in {cache}; `pipeline stats {cache}` summarises it; rerunning "
          "the demo resumes it (nothing to do).")
    print(f"next (make demo runs it): train run configs/demo.yaml {overrides}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
