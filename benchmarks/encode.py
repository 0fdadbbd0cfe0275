"""Encode throughput: end to end from JPEG files, the encoder stage alone, and the baseline.

    python benchmarks/encode.py [--images 256] [--model real|tiny] [--batch-size 64]
                                [--teacher-attn 8,9,10,11]

Writes ImageNet-like JPEGs (400-500 px sides, quality 90) once, then measures, in one run:
  decode   the CPU stage alone (PIL decode + ADM crop), images/s on one core
  encoder  the GPU stage alone: Encoder.encode on decoded uint8 images, at --batch-size,
           images/s, achieved TFLOP/s and model-FLOPs utilisation (MFU) on a GPU
  baseline REPA's own preprocessing: one image at a time (decode, encode at batch 1)
  pipeline `pipeline encode` on embedded Ray (decode tasks -> encoder actors -> writers),
           images/s after the first shard (start-up excluded) and overall
and prints pipeline/baseline and encoder/baseline. Weights are random (the speed of a
network does not depend on its weights); `--model real` is SD-VAE + DINOv2-B/14.
FLOPs per image and view at 256 px (methods.md section 7): 272.7 G (VAE encoder) + 46.3 G
(DINOv2-B at 224) = 319.0 G.

--teacher-attn B,B,... (HASTE, issue 16) also measures what storing those blocks' q, k
costs: the encoder stage with and without them, alternating, --repeats times (median
ratio), and `pipeline encode` with them (3 MiB more per image to move and write).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import in_processes, peak_tflops, sync  # noqa: E402
from pipeline.demo_data import demo_image  # noqa: E402
from pipeline.encoders import Encoder, build_teacher, build_vae  # noqa: E402
from pipeline.job import EncodeConfig, run_encode  # noqa: E402
from pipeline.preprocess import decode_items  # noqa: E402
from pipeline.sources import list_source  # noqa: E402

GFLOPS_PER_IMAGE = {"real": 272.7 + 46.3}
MODELS = {"real": ("stabilityai/sd-vae-ft-mse", "dinov2-b"), "tiny": ("tiny", "dinov2-tiny")}


def _write_jpegs(indices: list[int], root: Path) -> None:
    from PIL import Image
    for i in indices:
        rng = np.random.default_rng([0, i])
        w, h = (int(x) for x in rng.integers(400, 501, size=2))
        img = demo_image(i % 10, i).resize((w, h), Image.Resampling.BICUBIC)
        img.save(root / f"n{i % 10:08d}" / f"{i:06d}.JPEG", quality=90)


def make_jpegs(root: Path, n: int, workers: int = 1) -> Path:
    """n ImageNet-like JPEGs (400-500 px sides, quality 90) in 10 class folders, written
    once (by `workers` processes) and reused."""
    done = root / f".{n}"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    for c in range(min(n, 10)):
        (root / f"n{c:08d}").mkdir(parents=True)
    in_processes(_write_jpegs, list(range(n)), workers, root)
    done.touch()
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--model", choices=sorted(MODELS), default="real")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--baseline-images", type=int, default=8)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads of the CPU encoder (CPU runs)")
    p.add_argument("--precision", default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "urepa-bench")
    p.add_argument("--teacher-attn", default="",
                   help="also time encoding with these teacher blocks' q, k (e.g. 8,9,10,11)")
    p.add_argument("--repeats", type=int, default=3, help="alternations for --teacher-attn")
    args = p.parse_args()
    attn_blocks = tuple(int(b) for b in args.teacher_attn.split(",") if b.strip())

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    precision = args.precision or ("bf16" if cuda else "fp32")
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{torch.cuda.get_device_name() if cuda else 'no GPU'}, torch {torch.__version__}, "
          f"model {args.model}, {args.resolution} px, batch {args.batch_size}, {precision}, "
          f"threads {args.threads}")
    data = make_jpegs(args.dir / f"jpeg-{args.images}", args.images)
    items = list_source("imagefolder", data).items

    t = time.perf_counter()
    images, failures = decode_items(items, args.resolution)
    decode_rate = len(items) / (time.perf_counter() - t)
    assert not failures, failures
    flat = images[:, 0]

    vae_id, teacher_id = MODELS[args.model]
    enc = Encoder(build_vae(vae_id, random_weights=True),
                  build_teacher(teacher_id, resolution=args.resolution, random_weights=True),
                  resolution=args.resolution, device=device, precision=precision,
                  batch_size=args.batch_size, compile=args.compile)
    enc.encode(flat[:args.batch_size])              # warm-up (cuDNN autotune, compile)
    sync()
    t = time.perf_counter()
    enc.encode(flat)
    sync()
    encoder_rate = len(flat) / (time.perf_counter() - t)

    # REPA's preprocessing: one image at a time, decode then encode at batch 1
    one = Encoder(enc.vae, enc.teacher, resolution=args.resolution, device=device,
                  precision=precision, batch_size=1)
    one.encode(flat[:1])
    sync()
    nb = min(args.baseline_images, len(items))
    t = time.perf_counter()
    for it in items[:nb]:
        img, _ = decode_items([it], args.resolution)
        one.encode(img[:, 0])
    sync()
    baseline_rate = nb / (time.perf_counter() - t)
    attn_ratio = None
    if attn_blocks:   # the same encoder with and without the q, k hooks, alternating
        with_attn = Encoder(enc.vae, enc.teacher, resolution=args.resolution, device=device,
                            precision=precision, batch_size=args.batch_size,
                            attn_blocks=attn_blocks)
        with_attn.encode(flat[:args.batch_size])
        rates: dict[str, list[float]] = {"plain": [], "attn": []}
        for _ in range(args.repeats):
            for name, e in (("plain", enc), ("attn", with_attn)):
                sync()
                t = time.perf_counter()
                e.encode(flat)
                sync()
                rates[name].append(len(flat) / (time.perf_counter() - t))
        plain, attn = (float(np.median(rates[k])) for k in ("plain", "attn"))
        attn_ratio = attn / plain
        del with_attn
    del enc, one
    if cuda:
        torch.cuda.empty_cache()

    def pipeline(blocks: tuple[int, ...]) -> dict:
        out = args.dir / f"cache-{args.model}-{args.images}{'-attn' if blocks else ''}"
        shutil.rmtree(out, ignore_errors=True)
        return run_encode(EncodeConfig(
            out=str(out), dataset="imagefolder", data_dir=str(data),
            resolution=args.resolution, vae=vae_id, teacher=teacher_id, random_weights=True,
            shard_size=args.shard_size, batch_size=args.batch_size,
            encoder_threads=args.threads, precision=args.precision, compile=args.compile,
            progress=False, teacher_attn=blocks,
            # CPU runs: room for the encoder's threads plus decode and write tasks
            num_cpus=None if cuda else max(os.cpu_count() or 1, args.threads + 1)),
            log=lambda s: None)
    summary = pipeline(())
    steady, overall = summary["steady_images_per_second"], summary["images_per_second"]
    if attn_blocks:
        steady_attn = pipeline(attn_blocks)["steady_images_per_second"]

    print(f"{'stage':10s} {'images/s':>10s}  notes")
    print(f"{'decode':10s} {decode_rate:10.1f}  one core, PIL + ADM crop")
    flops = GFLOPS_PER_IMAGE.get(args.model) if args.resolution == 256 else None
    note = ""
    if flops:
        tflops = encoder_rate * flops / 1e3
        peak = peak_tflops()
        note = f"{tflops:.2f} TFLOP/s" + (f", MFU {tflops / peak:.1%} of bf16 peak"
                                           if peak else "")
    print(f"{'encoder':10s} {encoder_rate:10.1f}  {note}")
    print(f"{'baseline':10s} {baseline_rate:10.1f}  batch 1, decode + encode in turn")
    print(f"{'pipeline':10s} {steady:10.1f}  after the first shard ({overall:.1f} overall, "
          f"with Ray start-up and model loading)")
    print(f"ratio pipeline/baseline {steady / baseline_rate:.2f}x, "
          f"encoder/baseline {encoder_rate / baseline_rate:.2f}x")
    if attn_blocks:
        print(f"--teacher-attn {args.teacher_attn}: encoder with q, k / without "
              f"{attn_ratio:.3f}x (median of {args.repeats} alternations); pipeline "
              f"{steady_attn:.1f} images/s with them, {steady_attn / steady:.3f}x without")


if __name__ == "__main__":
    main()
