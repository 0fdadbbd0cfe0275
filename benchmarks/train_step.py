"""Training-step throughput: teacher tokens read from the cache vs the teacher run online.

    python benchmarks/train_step.py [--arch sit-down-b/2] [--teacher dinov2-b]
                                    [--batch-size 256] [--steps 20] [--workers 8]

Both paths train the same student (U-REPA: backbone + projector, L_v + lambda (L_REPA +
w L_ML)) with AdamW at the same batch, in one run:

  cached  the trainer's path: CacheLoader streams moments + teacher tokens + labels from
          a zarr cache; z = (mean + std eps) * 0.18215 on the device; no teacher anywhere
  online  REPA's path: a DataLoader decodes the 256 px PNGs REPA's dataset tool writes
          (plus the stored latent), and every step runs the frozen DINOv2 on the images
          (/255, ImageNet mean/std, bicubic 224, fp16/bf16 autocast, no grad)

and prints images/s, steps/s and the data-wait fraction of each, the cached/online ratio,
and on a GPU the model-FLOPs utilisation of the cached path (3x forward FLOPs of the
student, counted by torch's FlopCounterMode, over the GPU's dense bf16 peak). Weights are
random: the speed of a network does not depend on its weights.

    python benchmarks/train_step.py --methods [all | repa,reg,...] [--arch sit-b/2]

instead times one optimizer step of each method (train/methods/) on the same backbone,
from batches already on the device (the method's compute, not the loader), against
plain REPA measured in the same run: rounds alternate the methods (each round starts one
method later, so none is always first), and the ratio is each method's median step time
over REPA's. ERW is timed in both of its phases.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import in_processes, peak_tflops, sync  # noqa: E402
from cache import CacheLoader, CacheSpec, LoaderConfig, open_cache  # noqa: E402
from cache.synthetic import write_synthetic_cache  # noqa: E402
from pipeline.encoders import (IMAGENET_MEAN, IMAGENET_STD, TEACHERS, build_teacher,  # noqa: E402
                               teacher_input_size, teacher_pixels, token_grid)
from train.config import AlignConfig, ModelConfig  # noqa: E402
from train.config import load_config  # noqa: E402
from train.methods import METHODS, build_method  # noqa: E402
from train.models import build_model, num_blocks  # noqa: E402
from train.step import Student, build_generator  # noqa: E402

def method_for(name: str, arch: str, dim: int):
    """Method `name` (default arguments) for `arch` and teacher width `dim`."""
    return build_method(AlignConfig(method=name, teacher_dim=dim), {}, ModelConfig(arch=arch))


def urepa(arch: str, dim: int):
    """U-REPA (the trainer's default method) for `arch` and teacher width `dim`."""
    return method_for("urepa", arch, dim)


def training_flops(arch: str, method, resolution: int, tokens: int, dim: int) -> float:
    """FLOPs of one training step per image: 3x the student's forward (backbone +
    projector + loss), counted by torch's FlopCounterMode on the meta device."""
    latent = resolution // 8
    with torch.device("meta"):
        s_meta = Student(build_model(arch, latent_size=latent), method, latent_scale=0.18215)
        batch = {"moments": torch.randn(1, 8, latent, latent),
                 "label": torch.zeros(1, dtype=torch.long), "tokens": torch.randn(1, tokens, dim)}
    counter = FlopCounterMode(display=False)
    with counter:
        s_meta(batch)
    return 3 * counter.get_total_flops()  # forward + backward ~ 3x forward


def _write_pngs(files: list[Path], size: int) -> None:
    from PIL import Image
    for f in files:  # smooth noise, so PNG compresses like a photo, roughly
        small = np.random.default_rng([0, int(f.stem)]).integers(
            0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC).save(f)


def make_pngs(root: Path, n: int, size: int, workers: int = 1) -> list[Path]:
    """REPA's dataset: ADM-cropped 256 px PNGs (random content: decode cost is what counts),
    written once (by `workers` processes) and reused."""
    files = [root / f"{i:06d}.png" for i in range(n)]
    if not (root / f".{n}").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        in_processes(_write_pngs, files, workers, size)
        (root / f".{n}").touch()
    return files


class PngLatents(torch.utils.data.Dataset):
    """What REPA's training dataset returns: the decoded image, the stored latent moments
    (here read from the cache) and the label."""

    def __init__(self, files: list[Path], cache: Path):
        self.files, self.cache = files, cache
        self.ds = None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image
        if self.ds is None:
            self.ds = open_cache(self.cache)
        img = np.asarray(Image.open(self.files[i]).convert("RGB"))
        row = self.ds.gather(np.array([i]), ["moments", "label"])
        return (torch.from_numpy(img.copy()), torch.from_numpy(row["moments"][0, 0]),
                int(row["label"][0]))


def teacher_tokens(teacher, images: torch.Tensor, size: int, dtype) -> torch.Tensor:
    """REPA's online teacher: uint8 [B, R, R, 3] -> final-norm patch tokens [B, T, D]."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    x = teacher_pixels(images.permute(0, 3, 1, 2).float(), mean, std, size)
    with torch.no_grad(), torch.autocast(images.device.type, dtype=dtype,
                                         enabled=dtype != torch.float32):
        feats = teacher.forward_features(x)
    return feats[:, getattr(teacher, "num_prefix_tokens", 1):].float()


def timed(batches, step, n_steps: int, warmup: int, batch_size: int,
          max_seconds: float | None = None) -> dict:
    """images/s, steps/s and the data-wait share (time blocked on `batches` over the
    whole) of `n_steps` steps after `warmup`; stops early after `max_seconds`."""
    it = iter(batches)
    for _ in range(warmup):
        step(next(it))
    sync()
    wait, done = 0.0, 0
    t0 = time.perf_counter()
    while done < n_steps and (max_seconds is None or time.perf_counter() - t0 < max_seconds):
        tw = time.perf_counter()
        b = next(it)
        wait += time.perf_counter() - tw
        step(b)
        done += 1
    sync()
    dt = time.perf_counter() - t0
    return {"img_s": done * batch_size / dt, "steps_s": done / dt, "wait": wait / dt,
            "steps": done}


def run(name: str, batches, step, n_steps: int, warmup: int, batch_size: int) -> dict:
    r = timed(batches, step, n_steps, warmup, batch_size)
    print(f"{name:7s} {r['img_s']:9.1f} img/s  {r['steps_s']:7.3f} steps/s  "
          f"data wait {100 * r['wait']:5.1f}% of step time")
    return r


def optimizer_step(student, opt, device, dtype):
    """One training step on a batch dict: autocast forward, backward, clip at 1, AdamW."""
    def step(batch):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = student(batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def online_path(files: list[Path], cache: Path, teacher, step, device, dtype,
                batch_size: int, workers: int, resolution: int):
    """REPA's path: (batches, step_fn). A DataLoader of decoded PNGs with the stored
    moments and labels, and a step that runs the frozen teacher on the images, then
    `step` on {moments, label, tokens}."""
    size = teacher_input_size(resolution)
    dl = torch.utils.data.DataLoader(PngLatents(files, cache), batch_size=batch_size,
                                     shuffle=True, num_workers=workers, drop_last=True,
                                     pin_memory=device.type == "cuda",
                                     persistent_workers=workers > 0)

    def batches():
        for img, moments, label in forever(dl):
            # all non-blocking: a blocking copy would wait for the last step's GPU work
            # and count it as data wait
            yield (img.to(device, non_blocking=True), moments.to(device, non_blocking=True),
                   label.to(device, non_blocking=True))

    def online_step(b):
        img, moments, label = b
        step({"moments": moments, "label": label,
              "tokens": teacher_tokens(teacher, img, size, dtype)})
    return batches(), online_step


def haste_map(arch: str) -> tuple[list[int], list[int]]:
    """HASTE's layer map for a backbone (0-indexed teacher -> student blocks): B's for the
    B-sized ones, L/XL's otherwise."""
    return ([7, 9, 11], [2, 3, 4]) if num_blocks(arch) <= 15 else ([8, 9, 10, 11], [4, 5, 6, 7])


def method_students(names: list[str], arch: str, latent: int, dim: int, device):
    """{label: (student, optimizer, step index)} for each method on `arch`; ERW twice,
    in its warm-up (step 0) and full phase (step >= warm-up); HASTE before and after
    tau (its attention logits on the mapped blocks, then fused attention alone)."""
    out = {}
    for name in names:
        phases = [("", 0)]
        extra = []
        if name == "erw":
            extra = ["method_args.warmup_steps=10", "method_args.l2r_depth=4"]
            phases = [(" (warm-up)", 0), (" (full)", 10)]
        if name in ("haste", "urepa-haste"):
            teacher, student = haste_map(arch)
            extra = [f"method_args.teacher_blocks={teacher}",
                     f"method_args.student_blocks={student}", "method_args.tau=10"]
            phases = [(" (aligning)", 0), (" (after tau)", 10)]
        cfg = load_config(None, ["run_dir=unused", "data.cache=unused", f"model.arch={arch}",
                                 f"model.latent_size={latent}", f"align.method={name}",
                                 f"align.teacher_dim={dim}", *extra])
        for label, step in phases:
            torch.manual_seed(0)
            net, method = build_generator(cfg)
            g = latent // 2
            method.use_cache(CacheSpec(num_samples=1, shard_size=1, chunk_size=1,
                                       latent_size=latent, tokens=g * g, token_dim=dim,
                                       attn_blocks=haste_map(arch)[0], attn_heads=12,
                                       attn_head_dim=64))
            student = Student(net, method, latent_scale=0.18215).to(device)
            out[name + label] = (student, torch.optim.AdamW(student.parameters(), lr=1e-4),
                                 step)
    return out


def methods_main(args, device, dtype, bs: int, n_steps: int) -> None:
    names = list(METHODS) if args.methods == "all" else args.methods.split(",")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        sys.exit(f"--methods: unknown {unknown}; choose from {sorted(METHODS)} or all")
    names = ["repa"] + [n for n in names if n != "repa"]     # the baseline first
    latent, g = args.resolution // 8, args.resolution // 16
    dim = 768
    batch = {"moments": torch.randn(bs, 8, latent, latent, device=device),
             "label": torch.randint(1000, (bs,), device=device),
             "tokens": torch.randn(bs, g * g, dim, device=device),
             "cls": torch.randn(bs, dim, device=device),
             # DINOv2-B's q, k of HASTE's teacher blocks, as the loader yields them
             "attn_qk": torch.randn(bs, len(haste_map(args.arch)[0]), 2, 12, g * g, 64,
                                    device=device).half() * 0.5}
    students = method_students(names, args.arch, latent, dim, device)

    def one_step(student, opt, step) -> float:
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = student(batch, None, step)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0

    times = {k: [] for k in students}
    for _ in range(args.warmup):
        for k, (st, opt, step) in students.items():
            one_step(st, opt, step)
    order = list(students)
    for r in range(n_steps):     # rounds alternate the methods, each round starting at
        for k in order[r % len(order):] + order[:r % len(order)]:   # the next one
            st, opt, step = students[k]
            times[k].append(one_step(st, opt, step))
    base = float(np.median(times["repa"]))
    print(f"{'method':18s} {'step s':>8s} {'img/s':>8s} {'vs REPA':>8s}")
    for k, ts in times.items():
        med = float(np.median(ts))
        print(f"{k:18s} {med:8.3f} {bs / med:8.1f} {med / base:7.2f}x")


def forever(loader):
    while True:
        yield from loader


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sit-down-b/2")
    p.add_argument("--teacher", default="dinov2-b", choices=sorted(TEACHERS))
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 GPU, 4 CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 GPU, 3 CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--workers", type=int, default=None, help="loader processes (default 8/1)")
    p.add_argument("--precision", default=None, help="bf16 (GPU default) or fp32 (CPU)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "urepa-bench")
    p.add_argument("--methods", default=None,
                   help="time each method's step against REPA on the same --arch instead "
                        "(all, or a comma list, e.g. repa,urepa,reg,erw,gmem,none)")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    bs = args.batch_size or (256 if cuda else 4)
    n_steps = args.steps or (20 if cuda else 3)
    workers = args.workers if args.workers is not None else (8 if cuda else 1)
    precision = args.precision or ("bf16" if cuda else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    print(f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{torch.cuda.get_device_name() if cuda else 'no GPU'}, torch {torch.__version__}; "
          f"{args.arch}" + ("" if args.methods else f" + {args.teacher} teacher")
          + f", {args.resolution} px, batch {bs}, {precision}"
          + ("" if args.methods else f", {workers} loader worker(s)")
          + (", compiled" if args.compile else ""))
    if args.methods:
        methods_main(args, device, dtype, bs, n_steps)
        return

    teacher = build_teacher(args.teacher, resolution=args.resolution, random_weights=True)
    g, dim = token_grid(args.resolution), teacher.embed_dim
    n = max(4 * bs, 64)
    spec = CacheSpec(num_samples=n, shard_size=min(n, 1024), latent_size=args.resolution // 8,
                     tokens=g * g, token_dim=dim)
    cache = args.dir / f"train-cache-{n}-{args.resolution}-{dim}"
    if not (cache / "manifest.json").exists() or open_cache(cache).spec != spec:
        shutil.rmtree(cache, ignore_errors=True)
        write_synthetic_cache(cache, spec)
    files = make_pngs(args.dir / f"png-{n}-{args.resolution}", n, args.resolution)

    def new_student() -> tuple[Student, torch.optim.Optimizer]:
        torch.manual_seed(0)
        net = build_model(args.arch, latent_size=args.resolution // 8)
        s = Student(net, urepa(args.arch, dim), latent_scale=0.18215).to(device)
        if args.compile:
            s.net.compile()
        return s, torch.optim.AdamW(s.parameters(), lr=1e-4)

    # ---- cached: the trainer's loader, teacher tokens from the cache
    student, opt = new_student()
    loader = CacheLoader(cache, LoaderConfig(batch_size=bs, shuffle_buffer=2 * bs,
                                             num_workers=workers))

    def cached_batches():
        for b in forever(loader):
            yield {k: v.to(device, non_blocking=True) for k, v in b.items()}
    cached = run("cached", cached_batches(), optimizer_step(student, opt, device, dtype),
                 n_steps, args.warmup, bs)

    # ---- online: decoded PNGs + the frozen teacher every step (REPA)
    student, opt = new_student()
    online_batches, online_step = online_path(files, cache, teacher.to(device),
                                              optimizer_step(student, opt, device, dtype),
                                              device, dtype, bs,
                                              workers, args.resolution)
    online = run("online", online_batches, online_step, n_steps, args.warmup, bs)

    print(f"cached/online: {cached['img_s'] / online['img_s']:.2f}x images/s")
    train_flops = training_flops(args.arch, urepa(args.arch, dim), args.resolution, g * g, dim)
    achieved = train_flops * cached["img_s"] / 1e12
    peak = peak_tflops()
    print(f"student training FLOPs/image {train_flops / 1e9:.1f} G -> {achieved:.1f} TFLOP/s"
          + (f", MFU {100 * achieved / peak:.1f}% of {peak} bf16 peak" if peak else ""))


if __name__ == "__main__":
    main()
