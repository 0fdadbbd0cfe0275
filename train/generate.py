"""`train sample`: images from a checkpoint's EMA weights, resumable and split over processes.

    OUT/
      sample.json            the settings and the checkpoint (a rerun must agree with them)
      images/000000.png ...  one PNG per sample, each written atomically
      grid.png               the first --grid samples
      samples.npz            arr_0 uint8 [N, H, W, 3] and arr_1 int64 labels: the ADM
                             evaluation layout (guided-diffusion's evaluator reads arr_0)

Sample i belongs to block b = i // batch_size. Block b's conditions, initial noise and SDE
noise come from a generator seeded by (seed, b), in this order, and are always drawn for a
whole block; conditions are the method's (train/methods/): labels uniform over the
classes, or GMem's rows of the CLS bank; REG's state is the latent and its CLS token. So sample i depends on
the checkpoint, the settings, the seed, the batch size and the device type, and not on
the number of processes, on interruptions, or on --num. Process r of W takes blocks
r, r + W, ...; a block whose PNGs all exist is skipped, which is how a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cache.format import atomic_file, atomic_write_json

from .checkpoint import load_backbone
from .methods import Sampling
from .sampling import Guidance, sample_ode, sample_sde
from .settings import FREE_SETTINGS, SampleError, SampleSettings
from .vae import Decoder

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def default_out(ckpt: Path, s: SampleSettings) -> Path:
    """RUN_DIR/samples/step_N-sde250-cfg1.65-seed0 (for a file: beside it, by its stem)."""
    name = f"{s.mode}{s.steps}-cfg{s.cfg:g}-seed{s.seed}"
    if ckpt.is_file():
        return ckpt.parent / "samples" / f"{ckpt.stem}-{name}"
    return ckpt.parent.parent / "samples" / f"{ckpt.name}-{name}"


# ------------------------------------------------------------------------ sampling
def block_generator(seed: int, block: int, device: torch.device | str) -> torch.Generator:
    """Block b's generator, seeded by SeedSequence([seed, b])."""
    return torch.Generator(device).manual_seed(
        int(np.random.SeedSequence([seed, block]).generate_state(1)[0]))


@torch.no_grad()
def sample_block(sampling: Sampling, s: SampleSettings, generator: torch.Generator,
                 shape: tuple[int, int, int, int], tick: Callable[[], None] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of `shape` [n, C, h, w] (scaled, as trained) and their labels; every random
    draw (the conditions, then the initial state, then the SDE's) comes from `generator`.
    `tick` is called after each of the model's evaluations (evaluations(s) per block)."""
    velocity = sampling.velocity if tick is None else _ticking(sampling.velocity, tick)
    cond = sampling.condition(generator, shape[0])
    x = sampling.initial(generator, shape)
    g = Guidance(scale=sampling.scale(x), null_label=sampling.null, interval=sampling.interval)
    if s.mode == "sde":
        x = sample_sde(velocity, x, cond, steps=s.steps, guidance=g,
                       generator=generator, last_step=s.sde_last_step)
    else:
        x = sample_ode(velocity, x, cond, steps=s.steps, method=s.ode_method,
                       guidance=g)
    return sampling.latent(x), sampling.labels(cond)


def _ticking(velocity: Callable, tick: Callable[[], None]) -> Callable:
    def call(*args):
        out = velocity(*args)
        tick()
        return out
    return call


def evaluations(s: SampleSettings) -> int:
    """The model evaluations of one block: one per SDE or Euler step; Heun adds a
    corrector to every step but the last (a guided evaluation is one call on [x; x])."""
    return 2 * s.steps - 1 if s.mode == "ode" and s.ode_method == "heun" else s.steps


def save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image
    with atomic_file(path) as f:
        Image.fromarray(image).save(f, format="PNG")


def save_grid(path: Path, images: torch.Tensor) -> np.ndarray:
    """uint8 [N, H, W, 3] -> one PNG, ceil(sqrt(N)) per row (torchvision's make_grid);
    returns the grid [H', W', 3]."""
    from torchvision.utils import make_grid
    grid = make_grid(images.permute(0, 3, 1, 2), nrow=math.ceil(math.sqrt(len(images))),
                     padding=2, pad_value=255).permute(1, 2, 0).numpy()
    save_png(path, grid)
    return grid


class Preview:
    """The sample grids of `preview.every` during training: the EMA model on one fixed
    batch of noise and labels (the same every time, so grids compare across steps)."""

    def __init__(self, p, *, method, cache: dict, latent_scale: float,
                 shape: tuple[int, int, int], num_classes: int, seed: int,
                 device: torch.device, precision: str, training_cache: str | None = None):
        self.settings = SampleSettings(num=p.num, cfg=p.cfg, mode=p.mode, steps=p.steps,
                                       batch_size=p.num, seed=seed, vae=p.vae,
                                       precision=precision)
        self.training_cache = training_cache
        self.decoder = Decoder(p.vae, cache, scale=latent_scale, device=device,
                               where=f"cache {cache.get('root')} (its manifest's provenance)")
        self.method, self.num_classes, self.device = method, num_classes, device
        self.shape = (p.num, *shape)

    def __call__(self, net: torch.nn.Module, path: Path) -> np.ndarray:
        """Sample the fixed batch, save its grid at `path` and return it [H, W, 3]."""
        gen = block_generator(self.settings.seed, 0, self.device)
        sampling = self.method.sampling(net, self.settings, num_classes=self.num_classes,
                                        dtype=PRECISIONS[self.settings.precision],
                                        cache=self.training_cache)
        z, _ = sample_block(sampling, self.settings, gen, self.shape)
        return save_grid(path, self.decoder(z))


def _image_path(out: Path, i: int) -> Path:
    return out / "images" / f"{i:06d}.png"


def _load_png(path: Path) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def write_npz(path: Path, out: Path, num: int, labels: np.ndarray) -> None:
    """arr_0 uint8 [N, H, W, 3] streamed from the PNGs into the zip (50K 256 px samples
    are 9.8 GB: never held in memory), arr_1 the labels."""
    first = _load_png(_image_path(out, 0))
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
              "fortran_order": False, "shape": (num, *first.shape)}
    with atomic_file(path) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as g:
            np.lib.format.write_array_header_2_0(g, header)
            for i in range(num):
                img = first if i == 0 else _load_png(_image_path(out, i))
                if img.shape != first.shape:
                    raise SampleError(f"{_image_path(out, i)} is {img.shape}, not "
                                      f"{first.shape}")
                g.write(np.ascontiguousarray(img).tobytes())
        with zf.open("arr_1.npy", "w") as g:
            np.lib.format.write_array(g, np.asarray(labels, np.int64))


def _check_settings(out: Path, record: dict[str, Any]) -> None:
    saved_path = out / "sample.json"
    if not saved_path.exists():
        if (out / "images").is_dir() and any((out / "images").iterdir()):
            raise SampleError(f"{out}/images holds samples without a sample.json; use a new "
                              "--out")
        return
    saved = json.loads(saved_path.read_text())
    diff = sorted(k for k in set(saved) | set(record)
                  if k not in FREE_SETTINGS and saved.get(k) != record.get(k))
    if diff:
        raise SampleError(
            f"{out} holds samples made with other settings; resuming would mix them:\n  "
            + "\n  ".join(f"{k}: saved {saved.get(k)!r} vs now {record.get(k)!r}"
                          for k in diff) + "\nUse a new --out, or restore these values.")


# the SampleSettings of one method or another (Method.sample_options), as flags
METHOD_OPTIONS = {"cls_cfg": "--cls-cfg", "bank": "--bank"}


def check_options(s: SampleSettings, method) -> None:
    """A method's own sampling option given for a checkpoint of a method without it would
    be recorded and do nothing: refused."""
    from .methods import METHODS
    for name, flag in METHOD_OPTIONS.items():
        value = getattr(s, name)
        if value is not None and name not in method.sample_options:
            users = sorted(m.name for m in METHODS.values() if name in m.sample_options)
            raise SampleError(f"{flag} {value}: the checkpoint was trained with "
                              f"align.method={method.name}, whose sampling has no use for it "
                              f"({flag} is for {', '.join(users)}); drop it")


def generate(source: str | Path, out: str | Path, s: SampleSettings, *,
             checkpoint_format: str = "auto", arch: str | None = None,
             log=print) -> dict[str, Any]:
    """Sample s.num images from a run, one of our checkpoints or a REPA-family file (see
    train/checkpoint.py) into `out` (resuming what is there). Returns a summary (paths,
    counts, speed) on the main process."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = PartialState(cpu=not torch.cuda.is_available())
    out = Path(out)
    net, ck = load_backbone(source, weights=s.weights, fmt=checkpoint_format, arch=arch)
    method = ck.method()
    check_options(s, method)
    cfg, meta, geo = ck.meta["config"], ck.meta, ck.model_kwargs()
    num_classes, size = geo["num_classes"], geo["latent_size"]
    shape = (s.batch_size, geo["in_channels"], size, size)
    warnings = []
    if s.cfg > 1 and float(cfg.get("model.label_dropout", 0.1)) == 0:
        warnings.append("cfg > 1 with a model trained without label dropout: its null class "
                        "was never trained, guidance is meaningless")
    sampling = method.sampling(net, s, num_classes=num_classes, dtype=PRECISIONS[s.precision],
                               cache=meta.get("cache", {}).get("root"))
    record = {"checkpoint": str(ck.path.absolute()), "checkpoint_format": ck.format,
              "arch": ck.arch, "step": ck.step, "method": method.name,
              **dataclasses.asdict(s), "interval": list(sampling.interval),
              **sampling.record()}
    _check_settings(out, record)        # every process, before the main one rewrites it
    state.wait_for_everyone()
    if state.is_main_process:
        (out / "images").mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "sample.json", record)
    state.wait_for_everyone()

    dev = state.device
    decoder = Decoder(s.vae, meta.get("cache", {}), scale=float(meta["latent_scale"]),
                      device=dev, dtype=PRECISIONS[s.precision],
                      where=f"{ck.path}{'/checkpoint.json' if ck.format == 'ours' else ''} cache")
    if state.is_main_process:
        for w in warnings + decoder.warnings:
            log(f"WARNING: {w}")
        kind = "" if ck.format == "ours" else f"{ck.format.upper()}-format checkpoint, "
        log(f"sampling {s.num:,} images from {ck.path} ({kind}step {ck.step}, {s.weights} "
            f"weights, {ck.arch}, {method.name}): {s.mode} {s.steps} steps, cfg {s.cfg} on "
            f"t in [{sampling.interval[0]}, {sampling.interval[1]}], "
            f"{state.num_processes} process(es) x "
            f"batch {s.batch_size}; decoder: {decoder.source}")
    net.to(dev)

    blocks = math.ceil(s.num / s.batch_size)
    mine = [b for b in range(state.process_index, blocks, state.num_processes)
            if not all(_image_path(out, i).exists()
                       for i in range(b * s.batch_size, min((b + 1) * s.batch_size, s.num)))]
    t0, made = time.perf_counter(), 0
    sizes = [min(s.batch_size, s.num - b * s.batch_size) for b in mine]  # a last block
    # the bar counts this process's images, moved on by each model evaluation of a block
    # (a block of 250 SDE steps on a CPU takes minutes: a bar per block stood still)
    # (in integer image-evaluations, shown scaled to images)
    per_eval = evaluations(s)
    bar = tqdm(total=sum(sizes) * per_eval, disable=not state.is_main_process,
               dynamic_ncols=True, unit_scale=1 / per_eval,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} images [{elapsed}<{remaining}]")
    for b, n in zip(mine, sizes):
        z, _ = sample_block(sampling, s, block_generator(s.seed, b, dev), shape,
                            tick=lambda n=n: bar.update(n))
        for k, img in enumerate(decoder(z[:n]).numpy()):  # draws in full, keeps n
            save_png(_image_path(out, b * s.batch_size + k), img)
        made += n
    bar.close()
    seconds = time.perf_counter() - t0
    state.wait_for_everyone()
    summary = {"out": str(out), "num": s.num, "made_here": made, "seconds": round(seconds, 2)}
    if not state.is_main_process:
        return summary
    if s.grid:
        g = min(s.grid, s.num)
        save_grid(out / "grid.png", torch.from_numpy(
            np.stack([_load_png(_image_path(out, i)) for i in range(g)])))
        summary["grid"] = str(out / "grid.png")
    if s.npz:
        write_npz(out / "samples.npz", out, s.num, all_labels(s, sampling))
        summary["npz"] = str(out / "samples.npz")
    return summary


def all_labels(s: SampleSettings, sampling: Sampling) -> np.ndarray:
    """The labels of samples 0..num-1, their conditions drawn again as sample_block drew
    them (on the device the samples were made on: the draws depend on it)."""
    device = sampling.device
    out = [sampling.labels(sampling.condition(block_generator(s.seed, b, device),
                                              s.batch_size)).cpu()
           for b in range(math.ceil(s.num / s.batch_size))]
    return torch.cat(out)[: s.num].numpy()
