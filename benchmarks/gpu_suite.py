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
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from cache.loader import _cores  # noqa: E402  (the cores this process may run on)

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
            if gpu else None, cpu_cores=_cores(),
            shm_free_gib=round(shutil.disk_usage("/dev/shm").free / 2**30, 1)
            if os.path.isdir("/dev/shm") else None)
    n = 8192 if gpu else 256
    dtype = torch.bfloat16 if gpu else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))  # not zeros
    s = _time(torch, device, lambda: a @ b, 10)
    res.put(matmul_tflops=float(f"{2 * n ** 3 / s / 1e12:.4g}"), matmul=f"{n}^3 {dtype}")
    nbytes = (1 << 30) if gpu else (8 << 20)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    s = _time(torch, device, lambda: dst.copy_(src), 10)
    res.put(copy_read_write_gbs=round(2 * nbytes / s / 1e9, 1))
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
    equal, batches, timed = True, 0, 0.0
    for epoch in range(3):
        loader.set_epoch(0)   # the reference's epoch, three times over
        # every batch's copy queued without waiting (more batches than shared buffers, so
        # buffers are reused while copies from them may be pending: the loader must wait
        # for their CUDA events), compared only after the epoch
        t = time.perf_counter()
        on_device = [{k: v.to(device, non_blocking=True) for k, v in b.items()}
                     for b in loader]
        if device.type == "cuda":
            torch.cuda.synchronize()
        timed += time.perf_counter() - t
        equal &= len(on_device) == len(reference) and all(
            torch.equal(got[k], ref[k]) for got, ref in zip(on_device, reference) for k in ref)
        batches += len(on_device)
    pinned = len(loader._pinned)
    loader.close()
    res.put(batches=batches, equal=bool(equal), pinned_buffers=pinned,
            img_s=round(batches * B / timed, 1))
    if not equal:
        raise SystemExit("the pinned worker path gave other bytes than the in-process loader")


def _models(args) -> tuple[str, str]:
    """(VAE, teacher) of benchmarks/encode.py: the real architectures, tiny with --smoke."""
    from encode import MODELS
    return MODELS["tiny" if args.smoke else "real"]


def _encoder(args, device, compile: bool):
    from pipeline.encoders import Encoder, build_teacher, build_vae
    vae, teacher = _models(args)
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
    from encode import GFLOPS_PER_IMAGE
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
            **({} if args.smoke else _mfu(args, rate * GFLOPS_PER_IMAGE["real"] / 1e3)))


def _jpegs(args) -> Path:
    from encode import make_jpegs
    n = 16 if args.smoke else args.jpegs
    return make_jpegs(args.dir / f"jpeg-{n}", n, workers=_cores())


def _decode_shard(paths_and_res):
    from pipeline.preprocess import decode_items
    items, resolution = paths_and_res
    images, failures = decode_items(items, resolution)
    return images[:, 0], len(failures)


def phase_decode_encode(args, res: Result) -> None:
    torch, device = _setup(args)
    import numpy as np
    from concurrent.futures import ProcessPoolExecutor
    from pipeline.sources import list_source
    items = list_source("imagefolder", _jpegs(args)).items
    t = time.perf_counter()
    one, _ = _decode_shard((items[:64], 256))
    per_core = len(one) / (time.perf_counter() - t)
    enc = _encoder(args, device, compile=False)
    bs = enc.batch_size
    enc.encode(one[:min(bs, len(one))])
    cores = max(1, _cores() - 1)
    res.put(decode_img_s_per_core=round(per_core, 1), decode_processes=cores, batch=bs)
    if args.encode_img_s:   # the encoder stage's rate, from the encode phase
        res.put(cores_to_feed_encoder=round(args.encode_img_s / per_core, 1))
    # small chunks, so that all processes are busy at once and the pipe is soon full;
    # the clock starts at the first decoded chunk (pool start-up and fill left out)
    chunk = 4 if args.smoke else 32
    chunks = [(items[k:k + chunk], 256) for k in range(0, len(items), chunk)]
    done, pending, t = 0, [], None
    with ProcessPoolExecutor(cores) as pool:
        decoded = pool.map(_decode_shard, chunks)   # in order, read ahead
        for last, (images, _) in enumerate(decoded, 1 - len(chunks)):
            if t is None:
                t, first = time.perf_counter(), len(images)
            pending.append(images)
            if sum(len(p) for p in pending) >= bs or last == 0:   # a batch, or the rest
                enc.encode(np.concatenate(pending))
                done += sum(len(p) for p in pending)
                pending = []
        if device.type == "cuda":
            torch.cuda.synchronize()
    rate = (done - first) / max(time.perf_counter() - t, 1e-9)
    res.put(img_s=round(rate, 1), images=done, **_peak_memory(torch, device))


def phase_pipeline(args, res: Result) -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        res.put(skipped="Ray is not installed here")
        return
    torch, device = _setup(args)
    from pipeline.job import EncodeConfig, run_encode
    data = _jpegs(args)
    out = args.dir / "suite-pipeline-cache"
    shutil.rmtree(out, ignore_errors=True)
    smoke = args.smoke
    vae, teacher = _models(args)
    summary = run_encode(EncodeConfig(
        out=str(out), dataset="imagefolder", data_dir=str(data), resolution=256,
        vae=vae, teacher=teacher, random_weights=True,
        shard_size=8 if smoke else 1024, batch_size=4 if smoke else 256, progress=False,
        num_gpus=0 if device.type == "cpu" else None,
        num_cpus=max(2, _cores()) if smoke else None), log=lambda s: None)
    res.put(img_s_steady=summary["steady_images_per_second"],
            img_s_overall=summary["images_per_second"], images=summary["images"],
            ray_cpus=_cores())


def _fill_batch(torch, device, try_step, smoke: bool) -> int:
    """The largest batch (a multiple of 32, at most 1024) that fits in 90% of the card:
    peak memory is linear in the batch once the optimizer's state exists (a first step at
    8 makes it), measured at 16 and 64, extrapolated, then tried, smaller until it fits.
    `try_step(b)` runs one step and returns False on running out of memory."""
    import gc
    if smoke:
        return 4
    try_step(8)
    peaks = []
    for b in (16, 64):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        if not try_step(b):
            return 16 if b == 64 else 8
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
    per = max(1.0, (peaks[1] - peaks[0]) / 48)
    total = torch.cuda.get_device_properties(0).total_memory
    b = int((0.9 * total - (peaks[0] - 16 * per)) / per) // 32 * 32
    b = max(32, min(b, 1024))
    while b > 32 and not try_step(b):
        gc.collect()               # the failed step's tensors are gone once it returned
        torch.cuda.empty_cache()
        b = max(32, int(b * 0.85) // 32 * 32)
    return b


def phase_train(args, res: Result, name: str, compile: bool = False) -> None:
    torch, device = _setup(args)
    from train_step import (forever, make_pngs, method_for, online_path, optimizer_step,
                            timed, training_flops)
    from cache import CacheLoader, LoaderConfig
    from pipeline.encoders import build_teacher, token_grid
    from train.models import build_model
    from train.step import Student
    arch, method, tiny = TRAIN[name]
    arch = tiny if args.smoke else arch
    teacher = build_teacher("dinov2-tiny" if args.smoke else "dinov2-b", resolution=256,
                            random_weights=True)
    g, dim = token_grid(256), teacher.embed_dim
    dtype = torch.float32 if args.smoke else torch.bfloat16
    torch.manual_seed(0)
    with device:   # initialised on the card: seconds instead of ~15 s on the CPU for XL
        student = Student(build_model(arch, latent_size=32), method_for(method, arch, dim),
                          latent_scale=0.18215)
    if compile:
        student.net.compile()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)

    step = optimizer_step(student, opt, device, dtype)

    def try_step(b: int) -> bool:
        try:
            step({"moments": torch.randn(b, 8, 32, 32, device=device),
                  "label": torch.randint(1000, (b,), device=device),
                  "tokens": torch.randn(b, g * g, dim, device=device)})
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            return False
        return True
    t = time.perf_counter()
    # a compiled phase takes the batch its eager phase found (each new size recompiles)
    bs = args.train_batch or args.found_batch.get(name) or \
        _fill_batch(torch, device, try_step, args.smoke)
    res.put(arch=arch, method=method, batch=bs, compile=compile,
            probe_s=round(time.perf_counter() - t, 1))
    flops = training_flops(arch, method_for(method, arch, dim), 256, g * g, dim)
    # 4 windows of one batch per epoch, read by up to 4 workers: the loader drains at each
    # epoch's end (every 4 steps here, every ~5,000 on ImageNet), so the data wait
    # measured is an upper bound
    n = 4 * bs
    root = _loader_cache(args, n, g * g, dim)
    workers = 1 if args.smoke else max(1, min(4, _cores() - 2))
    loader = CacheLoader(root, LoaderConfig(batch_size=bs, shuffle_buffer=bs,
                                            num_workers=workers))

    def cached_batches():
        for b in forever(loader):
            yield {k: v.to(device, non_blocking=True) for k, v in b.items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps, warm = (2, 1) if args.smoke else (args.steps, 3)
    r = timed(cached_batches(), step, steps, warm, bs, args.seconds)
    res.put(cached_img_s=round(r["img_s"], 1), data_wait=round(r["wait"], 4),
            steps_per_epoch=n // bs, train_gflops_per_image=round(flops / 1e9, 1),
            **{f"cached_{k}": v for k, v in _mfu(args, r["img_s"] * flops / 1e12).items()},
            **_peak_memory(torch, device))
    loader.close()

    files = make_pngs(args.dir / f"png-{n}-256", n, 256, workers=_cores())
    batches, online_step = online_path(files, root, teacher.to(device).eval(), step, device,
                                       dtype, bs, workers, 256)
    o = timed(batches, online_step, steps, warm, bs, args.seconds)
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


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (a phase's own: its DataLoader workers,
    decode processes, Ray's raylet and workers, which start process groups of their own
    but stay in the phase's session)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:   # the fields after the command's closing parenthesis; session is the 4th
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ValueError, IndexError):   # gone meanwhile, or not ours
            pass


def run_phase(name: str, cap: float, args, logs: Path) -> dict:
    """Run one phase in a forked process (the imports are the parent's: seconds saved
    per phase; the parent never touches CUDA), its whole session killed at `cap` (and
    after it ends: nothing it started outlives it)."""
    import multiprocessing as mp
    out, log = logs / f"{name}.json", logs / f"{name}.log"
    out.unlink(missing_ok=True)
    t = time.perf_counter()
    proc = mp.get_context("fork").Process(target=_child, args=(name, args, out, log))
    proc.start()
    proc.join(cap)
    timed_out = proc.exitcode is None
    _kill_session(proc.pid)
    proc.join()
    if timed_out:
        status = f"timed out at {cap:.3g} s"
    elif proc.exitcode == 0:
        status = "ok"
    else:
        lines = log.read_text().strip().splitlines() if log.exists() else []
        status = f"failed (exit {proc.exitcode}): " + (lines[-1][:200] if lines else "no output")
    data = json.loads(out.read_text()) if out.exists() else {}
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


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny models, seconds")
    p.add_argument("--phases", default=",".join(PHASES), help="comma list, in this order")
    p.add_argument("--budget", type=float, default=480, help="seconds for all phases")
    p.add_argument("--cap", action="append", default=[], metavar="PHASE=S",
                   help="another time cap for a phase (repeatable)")
    p.add_argument("--json", type=Path, default=None, help="default: DIR/gpu_suite.json")
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "urepa-bench",
                   help="data, caches, and each phase's log in DIR/suite-logs")
    p.add_argument("--seconds", type=_positive(float), default=None,
                   help="timed seconds per measurement (default 8, 1 with --smoke)")
    p.add_argument("--steps", type=_positive(int), default=20,
                   help="training steps per measurement")
    p.add_argument("--encode-batch", type=_positive(int), default=None)
    p.add_argument("--train-batch", type=_positive(int), default=None, help="default: probed")
    p.add_argument("--jpegs", type=_positive(int), default=4096,
                   help="JPEGs of the end-to-end phases")
    args = p.parse_args()
    if args.seconds is None:
        args.seconds = 1.0 if args.smoke else 8.0
    names = [n for n in args.phases.split(",") if n]
    unknown = [n for n in names if n not in PHASES]
    if unknown or not names or len(set(names)) < len(names):
        p.error(f"--phases: {'unknown ' + str(unknown) if unknown else 'empty or repeated'}"
                f"; choose from {list(PHASES)}")
    caps = {n: PHASES[n][1 if args.smoke else 0] for n in names}
    for item in args.cap:
        n, _, text = item.partition("=")
        try:
            caps[n] = float(text) if n in PHASES and float(text) > 0 else None
        except ValueError:
            caps[n] = None
        if caps[n] is None:
            p.error(f"--cap {item!r}: expected PHASE=SECONDS (> 0) with PHASE in "
                    f"{list(PHASES)}")
    logs = args.dir / "suite-logs"
    logs.mkdir(parents=True, exist_ok=True)
    out = args.json or args.dir / "gpu_suite.json"
    _preload()
    args.card_tflops, args.encode_img_s, args.found_batch = None, None, {}
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(),
              "python": platform.python_version(), "smoke": args.smoke, "phases": {}}
    start = time.perf_counter()
    for n in names:
        left = args.budget - (time.perf_counter() - start)
        if left < 5:
            report["phases"][n] = {"status": "not run: the budget was spent"}
        else:
            r = report["phases"][n] = run_phase(n, min(caps[n], left), args, logs)
            print(f"{n:20s} {r['status']} ({r['seconds']} s)", flush=True)
            if n == "card":
                args.card_tflops = r.get("matmul_tflops")
            if n == "encode":
                args.encode_img_s = r.get("img_s")
            if n in TRAIN and "batch" in r:
                args.found_batch[n] = r["batch"]
        report["seconds"] = round(time.perf_counter() - start, 1)
        tmp = out.with_suffix(".tmp")   # after every phase: a kill from outside keeps them
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, out)
    print_table(report)
    print(f"written: {out}; logs: {logs}")
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
