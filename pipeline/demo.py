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
from cache.format import CacheError

from . import cli
from .demo_figure import FigureError, write_figure
from .demo_vae import write_pooling_vae


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
    p.add_argument("--figure", action="store_true",
                   help="only draw OUT/figure.png: real images beside the samples of each "
                        "class (after train sample --out OUT/samples)")
    args = p.parse_args(argv)
    if args.figure:
        try:
            print(write_figure(args.out))
        except (FigureError, CacheError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
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
        vae = write_pooling_vae(args.out / "vae")
        print("[1/4] pipeline encode with the demo's pooling VAE (an AutoencoderKL whose "
              "weights are set to 8x8 block averages: pipeline/demo_vae.py) and a RANDOM-INIT "
              "small teacher (--teacher dinov2-tiny --random-teacher): the demo runs the real "
              "pipeline; real runs: see README, 'Encoding ImageNet'.")
        encode += ["--resolution", "128", "--vae", str(vae), "--teacher", "dinov2-tiny",
                   "--random-teacher"]
    t = time.perf_counter()
    if cli.main(encode) != 0:
        if cache.exists():
            print(f"(if {cache} was made by an older version of the demo, it cannot be "
                  f"resumed: rm -rf {args.out} and run make demo again)")
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
    # configs/demo.yaml fits the pooling-VAE cache (128 px, 64-wide tokens); real weights
    # make 256 px latents and DINOv2-B's 768-wide tokens, and decode with the VAE found
    # locally (ft-mse; the papers decode with ft-ema, which may not be here)
    decoder = "stabilityai/sd-vae-ft-mse" if real else str(args.out / "vae")
    overrides = "model.latent_size=32 align.teacher_dim=768 " if real else ""
    overrides += f"preview.vae={decoder}"
    (args.out / "train-overrides").write_text(overrides + "\n")
    (args.out / "sample-args").write_text(f"--vae {decoder}\n")
    print(f"\ndone. The cache is in {cache}; `pipeline stats {cache}` summarises it; rerunning "
          "the demo resumes it (nothing to do).")
    print(f"next (make demo runs it): train run configs/demo.yaml {overrides}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
