"""Every GPU question in one bounded command (issue 19): the card, the loader's pinned
path, encoding and training, as one table and one JSON file.

    python benchmarks/gpu_suite.py [--json gpu_suite.json] [--budget 480]
                                   [--phases card,encode,...] [--cap train-repa=60]
    python benchmarks/gpu_suite.py --smoke     # CPU, tiny sizes, seconds (the tests run it)

Each phase runs in its own process under a time cap (its own and what is left of
--budget), so a slow or hung phase cannot eat the lease: on expiry its process group is
killed and the table says "timed out" with whatever the phase had measured by then (a
phase writes each number as soon as it has it). Phases, in the order they run (the most
wanted first, so a short budget loses the least):

  card            what this card does: a bf16 matmul (TFLOP/s), a device-to-device copy
                  (bytes read + written per second), a pinned host-to-device copy
  loader          CacheLoader with 2 workers and pinned shared buffers, batches copied
                  to the device with non_blocking=True while the next are gathered: equal
                  to the in-process loader's, byte for byte; and images/s
  encode          the encoder stage alone (SD-VAE + DINOv2-B, random weights, bf16, batch
                  256): images/s, TFLOP/s from 319.0 GFLOPs per image, MFU, peak memory
  train-urepa     SiT-down-XL/2 + U-REPA at the batch that fills the card (probed), one
  train-repa      SiT-XL/2 + REPA        student, from the cache (CacheLoader, workers)
                  and with the online teacher (decoded PNGs + DINOv2-B every step):
                  images/s, MFU, data-wait share, cached/online ratio, peak memory
  decode-encode   end to end from JPEG files without Ray: decode processes (PIL + ADM
                  crop, every core but one) feed the encoder: images/s, decode cores
  pipeline        `pipeline encode` on embedded Ray from the same JPEGs (writes a cache):
                  steady images/s; not run where Ray is not installed
  encode-compile, train-urepa-compile, train-repa-compile: the same with torch.compile

MFU is given against the bf16 datasheet peak and against the matmul this card did in the
card phase. Weights are random: the speed of a network does not depend on them.
--smoke runs every phase on the CPU with tiny models and sizes (torch.compile with its
eager backend there: the wiring is checked, not the speed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

ENCODE_GFLOPS = 272.7 + 46.3   # SD-VAE encoder + DINOv2-B/14 at 256 px (methods.md 7)
TRAIN = {"train-urepa": ("sit-down-xl/2", "urepa", "sit-down-tiny/2"),
         "train-repa": ("sit-xl/2", "repa", "sit-tiny/2")}
# name: (cap in seconds on a GPU, cap with --smoke)
PHASES: dict[str, tuple[float, float]] = {
    "card": (40, 30), "loader": (60, 60), "encode": (60, 60),
    "train-urepa": (90, 90), "train-repa": (90, 90),
    "decode-encode": (90, 90), "pipeline": (120, 120),
    "encode-compile": (150, 90), "train-urepa-compile": (150, 90),
    "train-repa-compile": (150, 90),
}


class Result:
    """A phase's numbers, rewritten to its JSON file (atomically) as each one arrives, so
    a phase killed at its cap still reports what it had."""

    def __init__(self, path: Path):
        self.path, self.data = path, {}

    def put(self, **kv) -> None:
        self.data.update(kv)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)


# ----------------------------------------------------------------------------- phases
# Each runs in a child process: (args, Result) -> None.

def _setup(args):
    import torch
    cuda = torch.cuda.is_available() and not args.smoke
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.smoke:   # the wiring of compile, in seconds: no code generation on a CPU
        import functools
        torch.compile = functools.partial(torch.compile, backend="eager")
    return torch, torch.device("cuda" if cuda else "cpu")


def _time(torch, device, fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` after two warm-up calls (device events on
    a GPU)."""
    import statistics
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def phase_card(args, res: Result) -> None:
    torch, device = _setup(args)
    gpu = device.type == "cuda"
    res.put(device=torch.cuda.get_device_name() if gpu else "cpu",
            memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
            if gpu else None, cpu_cores=os.cpu_count())
    n = 8192 if gpu else 256
    dtype = torch.bfloat16 if gpu else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))  # not zeros
    s = _time(torch, device, lambda: a @ b, 10)
    res.put(matmul_tflops=round(2 * n ** 3 / s / 1e12, 2), matmul=f"{n}^3 {dtype}")
    nbytes = (1 << 30) if gpu else (8 << 20)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    s = _time(torch, device, lambda: dst.copy_(src), 10)
    res.put(copy_gbs=round(2 * nbytes / s / 1e9, 1))   # bytes read + bytes written
    if gpu:
        host = torch.randint(0, 255, (256 << 20,), dtype=torch.uint8).pin_memory()
        dev = torch.empty(host.shape, dtype=torch.uint8, device=device)
        s = _time(torch, device, lambda: dev.copy_(host, non_blocking=True), 10)
        res.put(h2d_gbs=round(host.numel() / s / 1e9, 1))


def _loader_cache(args, n: int, tokens: int, dim: int) -> Path:
    from cache import CacheSpec, open_cache
    from cache.synthetic import write_synthetic_cache
    spec = CacheSpec(num_samples=n, shard_size=min(n, 1024), latent_size=32, tokens=tokens,
                     token_dim=dim)
    root = args.dir / f"suite-cache-{n}-{spec.latent_size}-{tokens}-{dim}"
    try:
        if open_cache(root).spec == spec:
            return root
    except Exception:   # absent or unfinished: written anew
        pass
    import shutil
    shutil.rmtree(root, ignore_errors=True)
    write_synthetic_cache(root, spec)
    return root


def phase_loader(args, res: Result) -> None:
    torch, device = _setup(args)
    from cache import CacheLoader, LoaderConfig
    n, B = (64, 8) if args.smoke else (2048, 256)
    root = _loader_cache(args, n, *((16, 32) if args.smoke else (256, 768)))
    cfg = dict(batch_size=B, shuffle_buffer=4 * B, seed=1)
    reference = [{k: v.to(device, copy=True) for k, v in b.items()}
                 for b in CacheLoader(root, LoaderConfig(num_workers=0, pin_memory=False, **cfg))]
    loader = CacheLoader(root, LoaderConfig(num_workers=2, pin_memory=True, **cfg))
    loader.start()
    equal, batches = True, 0
    t = time.perf_counter()
    for epoch in range(3):
        loader.set_epoch(0)   # the reference's epoch, three times over
        for ref, b in zip(reference, loader):
            on_device = {k: v.to(device, non_blocking=True) for k, v in b.items()}
            equal &= all(torch.equal(on_device[k], ref[k]) for k in ref)
            batches += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    loader.close()
    res.put(batches=batches, equal=bool(equal and batches == 3 * len(reference)),
            pinned=device.type == "cuda", img_s_with_checks=round(batches * B / dt, 1))
    if not equal:
        raise SystemExit("the pinned worker path gave other bytes than the in-process loader")


def _encoder(args, device, compile: bool):
    from pipeline.encoders import Encoder, build_teacher, build_vae
    vae, teacher = ("tiny", "dinov2-tiny") if args.smoke else ("stabilityai/sd-vae-ft-mse",
                                                               "dinov2-b")
    return Encoder(build_vae(vae, random_weights=True),
                   build_teacher(teacher, resolution=256, random_weights=True),
                   resolution=256, device=device, precision="fp32" if args.smoke else "bf16",
                   batch_size=args.encode_batch or (4 if args.smoke else 256), compile=compile)


def _mfu(args, achieved_tflops: float) -> dict:
    from common import peak_tflops
    peak = peak_tflops()
    out = {"tflops": round(achieved_tflops, 2)}
    if peak:
        out["mfu_datasheet"] = round(achieved_tflops / peak, 4)
    if args.card_tflops:
        out["mfu_measured_matmul"] = round(achieved_tflops / args.card_tflops, 4)
    return out


def _peak_memory(torch, device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def phase_encode(args, res: Result, compile: bool = False) -> None:
    torch, device = _setup(args)
    import numpy as np
    t = time.perf_counter()
    enc = _encoder(args, device, compile)
    bs = enc.batch_size
    images = np.random.default_rng(0).integers(0, 256, (4 * bs, 256, 256, 3), dtype=np.uint8)
    enc.encode(images[:bs])       # warm-up: cuDNN autotuning, compilation
    if device.type == "cuda":
        torch.cuda.synchronize()
    res.put(batch=bs, compile=compile, warmup_s=round(time.perf_counter() - t, 1))
    done, t = 0, time.perf_counter()
    while done == 0 or time.perf_counter() - t < args.seconds:
        enc.encode(images)
        done += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = done / (time.perf_counter() - t)
    res.put(img_s=round(rate, 1), images=done, **_peak_memory(torch, device),
            **({} if args.smoke else _mfu(args, rate * ENCODE_GFLOPS / 1e3)))


def _jpegs(args) -> Path:
    from encode import make_jpegs
    n = 16 if args.smoke else args.jpegs
    return make_jpegs(args.dir / f"jpeg-{n}", n, workers=os.cpu_count() or 1)


def _decode_shard(paths_and_res):
    from pipeline.preprocess import decode_items
    items, resolution = paths_and_res
    images, failures = decode_items(items, resolution)
    return images[:, 0], len(failures)


def phase_decode_encode(args, res: Result) -> None:
    torch, device = _setup(args)
    from concurrent.futures import ProcessPoolExecutor
    from pipeline.sources import list_source
    items = list_source("imagefolder", _jpegs(args)).items
    t = time.perf_counter()
    one, _ = _decode_shard((items[:64], 256))
    per_core = len(one) / (time.perf_counter() - t)
    enc = _encoder(args, device, compile=False)
    bs = enc.batch_size
    enc.encode(one[:min(bs, len(one))])
    cores = max(1, (os.cpu_count() or 2) - 1)
    res.put(decode_img_s_per_core=round(per_core, 1), decode_processes=cores, batch=bs)
    chunks = [(items[k:k + bs], 256) for k in range(0, len(items), bs)]
    done = 0
    with ProcessPoolExecutor(cores) as pool:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for images, failed in pool.map(_decode_shard, chunks):   # in order, read ahead
            enc.encode(images)
            done += len(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
    rate = done / (time.perf_counter() - t)
    res.put(img_s=round(rate, 1), images=done,
            decode_cores_needed=round(rate / per_core, 1), **_peak_memory(torch, device))


def phase_pipeline(args, res: Result) -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        res.put(skipped="Ray is not installed here")
        return
    torch, device = _setup(args)
    import shutil
    from pipeline.job import EncodeConfig, run_encode
    data = _jpegs(args)
    out = args.dir / "suite-pipeline-cache"
    shutil.rmtree(out, ignore_errors=True)
    smoke = args.smoke
    summary = run_encode(EncodeConfig(
        out=str(out), dataset="imagefolder", data_dir=str(data), resolution=256,
        vae="tiny" if smoke else "stabilityai/sd-vae-ft-mse",
        teacher="dinov2-tiny" if smoke else "dinov2-b", random_weights=True,
        shard_size=8 if smoke else 1024, batch_size=4 if smoke else 256, progress=False,
        num_gpus=0 if device.type == "cpu" else None,
        num_cpus=max(2, os.cpu_count() or 2) if smoke else None), log=lambda s: None)
    res.put(img_s_steady=summary["steady_images_per_second"],
            img_s_overall=summary["images_per_second"], images=summary["images"],
            ray_cpus=os.cpu_count())


def _fill_batch(torch, device, make_step, smoke: bool) -> int:
    """The largest batch (a multiple of 32) that fits in 90% of the card's memory, from
    the peak memory of two small batches (linear in the batch), then checked."""
    if smoke:
        return 4
    peaks = []
    for b in (8, 16):
        torch.cuda.reset_peak_memory_stats()
        make_step(b)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
    per = max(1, (peaks[1] - peaks[0]) / 8)
    total = torch.cuda.get_device_properties(0).total_memory
    b = int((0.9 * total - (peaks[0] - 8 * per)) / per) // 32 * 32
    b = max(32, min(b, 1024))
    while b > 8:
        try:
            make_step(b)
            torch.cuda.synchronize()
            return b
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            b //= 2
    return b


def phase_train(args, res: Result, name: str, compile: bool = False) -> None:
    torch, device = _setup(args)
    from train_step import (PngLatents, forever, make_pngs, method_for, teacher_tokens,
                            timed, training_flops)
    from cache import CacheLoader, LoaderConfig
    from pipeline.encoders import build_teacher, teacher_input_size, token_grid
    from train.models import build_model
    from train.step import Student
    arch, method, tiny = TRAIN[name]
    arch = tiny if args.smoke else arch
    teacher = build_teacher("dinov2-tiny" if args.smoke else "dinov2-b", resolution=256,
                            random_weights=True)
    g, dim = token_grid(256), teacher.embed_dim
    dtype = torch.float32 if args.smoke else torch.bfloat16
    torch.manual_seed(0)
    student = Student(build_model(arch, latent_size=32), method_for(method, arch, dim),
                      latent_scale=0.18215).to(device)
    if compile:
        student.net.compile()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)

    def step(batch):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = student(batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def random_step(b: int) -> None:
        step({"moments": torch.randn(b, 8, 32, 32, device=device),
              "label": torch.randint(1000, (b,), device=device),
              "tokens": torch.randn(b, g * g, dim, device=device)})
    t = time.perf_counter()
    # a compiled phase takes the batch its eager phase found (each new size recompiles)
    bs = args.train_batch or args.found_batch.get(name) or \
        _fill_batch(torch, device, random_step, args.smoke)
    res.put(arch=arch, method=method, batch=bs, compile=compile,
            probe_s=round(time.perf_counter() - t, 1))
    flops = training_flops(arch, method_for(method, arch, dim), 256, g * g, dim)
    n = max(2 * bs, 16)
    root = _loader_cache(args, n, g * g, dim)
    workers = 1 if args.smoke else max(1, min(8, (os.cpu_count() or 2) - 2))
    loader = CacheLoader(root, LoaderConfig(batch_size=bs, shuffle_buffer=2 * bs,
                                            num_workers=workers))

    def cached_batches():
        for b in forever(loader):
            yield {k: v.to(device, non_blocking=True) for k, v in b.items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps, warm = (2, 1) if args.smoke else (args.steps, 3)
    r = timed(cached_batches(), step, steps, warm, bs, args.seconds)
    res.put(cached_img_s=round(r["img_s"], 1), data_wait=round(r["wait"], 4),
            train_gflops_per_image=round(flops / 1e9, 1),
            **_mfu(args, r["img_s"] * flops / 1e12), **_peak_memory(torch, device))
    loader.close()

    teacher = teacher.to(device).eval()
    size = teacher_input_size(256)
    files = make_pngs(args.dir / f"png-{n}-256", n, 256)
    dl = torch.utils.data.DataLoader(PngLatents(files, root), batch_size=bs, shuffle=True,
                                     num_workers=workers, drop_last=True,
                                     pin_memory=device.type == "cuda",
                                     persistent_workers=True)

    def online_batches():
        for img, moments, label in forever(dl):
            yield img.to(device, non_blocking=True), moments.to(device), label.to(device)

    def online_step(b):
        img, moments, label = b
        step({"moments": moments, "label": label,
              "tokens": teacher_tokens(teacher, img, size, dtype)})
    o = timed(online_batches(), online_step, steps, warm, bs, args.seconds)
    res.put(online_img_s=round(o["img_s"], 1), online_data_wait=round(o["wait"], 4),
            cached_over_online=round(r["img_s"] / o["img_s"], 3))


RUN = {
    "card": phase_card, "loader": phase_loader, "encode": phase_encode,
    "encode-compile": lambda a, r: phase_encode(a, r, compile=True),
    "decode-encode": phase_decode_encode, "pipeline": phase_pipeline,
    **{n: (lambda a, r, n=n: phase_train(a, r, n)) for n in TRAIN},
    **{f"{n}-compile": (lambda a, r, n=n: phase_train(a, r, n, compile=True)) for n in TRAIN},
}


# ----------------------------------------------------------------------------- runner
def _child(name: str, args, out: Path, log: Path) -> None:
    """A phase's process: its own session (so its workers die with it), output to log."""
    os.setsid()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    RUN[name](args, Result(out))


def run_phase(name: str, cap: float, args, scratch: Path) -> dict:
    """Run one phase in a forked process (the imports are the parent's: seconds saved
    per phase; the parent never touches CUDA), its process group killed at `cap`."""
    import multiprocessing as mp
    out, log = scratch / f"{name}.json", scratch / f"{name}.log"
    t = time.perf_counter()
    proc = mp.get_context("fork").Process(target=_child, args=(name, args, out, log))
    proc.start()
    proc.join(cap)
    if proc.exitcode is None:
        status = f"timed out at {cap:.3g} s"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.join()
    else:
        status = "ok" if proc.exitcode == 0 else f"failed (exit {proc.exitcode})"
    data = json.loads(out.read_text()) if out.exists() else {}
    if status.startswith("failed"):
        lines = log.read_text().strip().splitlines() if log.exists() else []
        status += ": " + (lines[-1][:200] if lines else "no output")
    if status == "ok" and "skipped" in data:
        status = "not run: " + data.pop("skipped")
    return {"status": status, "seconds": round(time.perf_counter() - t, 1), **data}


def _preload() -> None:
    """Import once, before the phases fork, what they all import (torch and timm take
    ~6 s on a small CPU). Nothing here may touch CUDA, or the forked phases could not
    use it: diffusers stays out (its import asks torch whether CUDA is available)."""
    import timm  # noqa: F401
    import torch  # noqa: F401

    import cache  # noqa: F401
    import encode  # noqa: F401
    import pipeline.encoders  # noqa: F401
    import train.step  # noqa: F401
    import train_step  # noqa: F401


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny models, seconds")
    p.add_argument("--phases", default=",".join(PHASES), help="comma list, in this order")
    p.add_argument("--budget", type=float, default=480, help="seconds for all phases")
    p.add_argument("--cap", action="append", default=[], metavar="PHASE=S",
                   help="another time cap for a phase (repeatable)")
    p.add_argument("--json", type=Path, default=None, help="default: DIR/gpu_suite.json")
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "urepa-bench")
    p.add_argument("--seconds", type=float, default=None,
                   help="timed seconds per measurement (default 8, 1 with --smoke)")
    p.add_argument("--steps", type=int, default=20, help="training steps per measurement")
    p.add_argument("--encode-batch", type=int, default=None)
    p.add_argument("--train-batch", type=int, default=None, help="default: probed")
    p.add_argument("--jpegs", type=int, default=4096, help="JPEGs of the end-to-end phases")
    args = p.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.seconds is None:
        args.seconds = 1.0 if args.smoke else 8.0
    names = [n for n in args.phases.split(",") if n]
    unknown = [n for n in names if n not in PHASES]
    if unknown:
        p.error(f"--phases: unknown {unknown}; choose from {list(PHASES)}")
    caps = {n: PHASES[n][1 if args.smoke else 0] for n in names}
    for item in args.cap:
        n, _, s = item.partition("=")
        if n not in PHASES or not s:
            p.error(f"--cap {item!r}: expected PHASE=SECONDS with PHASE in {list(PHASES)}")
        caps[n] = float(s)
    _preload()
    args.card_tflops, args.found_batch = None, {}
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(),
              "python": platform.python_version(), "smoke": args.smoke, "phases": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="urepa-suite-") as tmp:
        for n in names:
            left = args.budget - (time.perf_counter() - start)
            cap = min(caps[n], left)
            if left < 5:
                report["phases"][n] = {"status": "not run: the budget was spent"}
                continue
            report["phases"][n] = run_phase(n, cap, args, Path(tmp))
            args.card_tflops = report["phases"].get("card", {}).get("matmul_tflops")
            if n in TRAIN and "batch" in report["phases"][n]:
                args.found_batch[n] = report["phases"][n]["batch"]
            print(f"{n:20s} {report['phases'][n]['status']} "
                  f"({report['phases'][n]['seconds']} s)", flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    out = args.json or args.dir / "gpu_suite.json"
    out.write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"written: {out}")
    return 0 if all(v["status"] == "ok" or v["status"].startswith("not run: Ray")
                    for v in report["phases"].values()) else 1


def print_table(report: dict) -> None:
    """One line per phase: its status, then its numbers."""
    print(f"gpu suite, {report['date']}, {report['host']}"
          + (" (smoke: CPU, tiny sizes)" if report["smoke"] else "")
          + f", {report['seconds']} s")
    print(f"{'phase':20s} {'status':30s} numbers")
    for name, r in report["phases"].items():
        nums = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("status", "seconds"))
        print(f"{name:20s} {r['status']:30s} {nums}")


if __name__ == "__main__":
    sys.exit(main())
