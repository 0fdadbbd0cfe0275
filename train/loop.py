"""The training loop: one function for CPU, one GPU, many GPUs and many nodes (accelerate).

    run_dir/
      config.yaml              the resolved config (a rerun must agree with it; see
                               config.RESUMABLE_CHANGES for what may change)
      metrics.jsonl            one line per log_every steps (+ the last step, and the
                               last of a method's phase: ERW's warm-up)
      checkpoints/step_00010000/  model, EMA and optimizer (safetensors), every rank's RNG
                               states, step and loader position (JSON): no pickle (layout:
                               train/checkpoint.py); built as .tmp_step_N and renamed into
                               place once complete; the newest keep_checkpoints are kept
      samples.jsonl            with log_samples=true: each step's sample indices per rank
      nonfinite-step_N.json    written instead of a checkpoint when a loss turns NaN/Inf
      samples/step_N.png       EMA sample grids every preview.every steps (when set)

Rerunning `train run` on the same run directory resumes from the newest complete
checkpoint (newer damaged ones are named in the log and moved aside) and continues the
same trajectory (bit-exactly on CPU; GPU kernels are not deterministic).

What a step computes does not depend on the number of processes, only on `data.streams`
(default: the process count of the first start): the global batch of step s is the
concatenation of every stream's batch s (cache/loader.py), and the random draws of a
stream's samples (posterior noise, t, path noise, label drop) come from a generator
seeded by (seed, s, stream). A process owns streams / processes consecutive streams and
cuts its share into micro-batches. So one process with data.streams=8 follows an 8-GPU
run to floating-point tolerance (with the same micro_batch_size: U-REPA's manifold loss
couples the samples of a micro-batch). The run directory must be on a filesystem that
every node sees.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from cache.format import INDEX, LABEL, MOMENTS, atomic_write_bytes, state_sha256

from .checkpoint import (CHECKPOINT_FILES, CheckpointError, checkpoints, choose_checkpoint,
                         init_from_checkpoint, resume_run, save_run_checkpoint)
from .config import ConfigError, TrainConfig, check_start, flatten, model_geometry, to_yaml
from .data import cache_info, check_cache, make_loader, open_training_cache
from .methods import METHODS, Method
from .step import Student, build_generator, stream_seed


class NonFiniteLoss(RuntimeError):
    """A loss or gradient norm turned NaN/Inf; the run stopped before the bad update."""


class TrainState:
    """Step counter and loader position, checkpointed with the model (all ranks agree)."""

    def __init__(self, loader):
        self.step, self.loader = 0, loader

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: Any, where: str, step: int) -> None:
        """Restore from checkpoint.json's "train" of the checkpoint of step `step` (its
        directory's name): the step it records must be that one."""
        if not (isinstance(state, dict) and type(state.get("step")) is int
                and isinstance(state.get("loader"), dict)):
            raise CheckpointError(f"{where}: \"train\" is not {{step, loader}}: damaged")
        if state["step"] != step:
            raise CheckpointError(f"{where}: train.step={str(state["step"])[:40]} is not the "
                                  f"step of its directory ({step}): damaged; move it out of "
                                  "checkpoints/ to resume from the previous one")
        # the main process saved its own loader state; epoch and position are the same
        # on every rank, the rank is ours
        try:
            self.loader.load_state_dict({**state["loader"], "rank": self.loader.rank})
        except (ValueError, TypeError, KeyError) as e:   # another plan, or damaged values
            raise ConfigError(f"{where}: {e}") from None
        self.step = state["step"]


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    e, p = list(ema.parameters()), [q.detach() for q in net.parameters()]
    torch._foreach_lerp_(e, p, 1.0 - decay)


def _batches(loader) -> Iterator[dict[str, torch.Tensor]]:
    while True:  # epochs follow each other; the loader advances its own epoch counter
        yield from loader


def _check_replicas(acc, net: torch.nn.Module, step: int) -> list[str]:
    """SHA-256 of every process's weights; raises if they differ (replicas that drifted
    apart would each train their own model while the checkpoint keeps only one)."""
    from accelerate.utils import gather_object
    hashes = gather_object([state_sha256(net.state_dict())])
    if len(set(hashes)) > 1:
        raise RuntimeError(f"step {step}: the processes' weights differ ({hashes}); "
                           "no checkpoint written. This is a bug: please report it")
    return hashes


def _trim_metrics(path: Path, step: int) -> None:
    """After a resume from `step`, drop lines logged past it (they will be logged again)."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            if json.loads(ln).get("step", 0) <= step:
                keep.append(ln)
        except (json.JSONDecodeError, AttributeError):
            pass  # a line cut short by a crash
    atomic_write_bytes(path, "".join(ln + "\n" for ln in keep).encode())


@dataclass
class Run:
    """Everything a training run holds between steps (built by `setup`)."""
    cfg: TrainConfig
    run_dir: Path
    acc: Any                          # accelerate.Accelerator
    method: Method
    student: torch.nn.Module          # prepared (DDP on many processes)
    ema: torch.nn.Module
    opt: Any                          # prepared AdamW
    loader: Any                       # cache.CacheLoader
    state: TrainState
    micro: int                        # micro-batch per process
    accum: int                        # micro-batches per step
    meta: dict[str, Any]              # checkpoint.json's description of the run
    say: Callable[[str], None]        # log on the main process only
    preview: Any = None               # generate.Preview on the main process, when asked
    metrics: Any = None               # Metrics
    trained: list = field(init=False)  # the parameters AdamW updates (clipped together)
    draw_gen: Any = field(init=False)  # the steps' draws' generator (reseeded per stream)

    def __post_init__(self) -> None:
        self.trained = [p for p in self.student.parameters() if p.requires_grad]
        self.draw_gen = torch.Generator(device=self.acc.device)

    @property
    def teacher_fields(self) -> tuple[str, ...]:
        """The teacher fields the loader reads now."""
        return tuple(f for f in self.loader.cfg.fields if f not in (MOMENTS, LABEL, INDEX))

    @property
    def net(self) -> torch.nn.Module:
        """The generator being trained (unwrapped), the module the EMA follows."""
        return self.acc.unwrap_model(self.student).net


def train(cfg: TrainConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train to cfg.max_steps (resuming from the newest checkpoint in cfg.run_dir).
    Returns the last logged metrics with this invocation's throughput (Metrics.summary;
    {} when no step ran). Raises ConfigError, NonFiniteLoss, CacheError."""
    run = setup(cfg, log)
    resume(run)
    batches = None
    run.student.train()
    while run.state.step < cfg.max_steps:
        change = run.method.phase_change(run.state.step)
        if change:   # the same step on every rank, and again after a resume from it
            _enter_phase(change, run.opt, run.ema, run.net, run.state.step, run.say)
        fields = run.method.fields_at(run.state.step)
        if batches is None or fields != run.teacher_fields:
            batches = _read_fields(run, fields, batches)
        terms, timing = train_step(run, batches)
        after_step(run, terms, timing)
    run.metrics.close()
    run.acc.end_training()
    return run.metrics.summary() if run.acc.is_main_process and run.metrics.last else {}


def cpu_threads(env, cores: int, current: int) -> int:
    """Torch threads of a CPU training process: OMP_NUM_THREADS when set (torch already
    took it: `current`), else the machine's cores shared by the processes of this node
    (LOCAL_WORLD_SIZE, set by accelerate launch and torchrun). Every process taking all
    cores made 2-process CPU runs 4-6x slower under load (issue 17)."""
    if env.get("OMP_NUM_THREADS", "").strip():
        return current
    local = env.get("LOCAL_WORLD_SIZE", "1").strip()
    return max(1, cores // (int(local) if local.isdigit() and int(local) > 0 else 1))


def setup(cfg: TrainConfig, log: Callable[[str], None]) -> Run:
    """Check the config and the cache, start accelerate, build the method's student, its
    EMA, AdamW and the loader; write config.yaml. Nothing is resumed yet."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    run_dir = Path(cfg.run_dir).absolute()
    # without a GPU, accelerate starts torch.distributed (gloo) only when told cpu=True
    cpu = not torch.cuda.is_available()
    dist = PartialState(cpu=cpu)
    world = dist.num_processes
    if cpu:   # processes on one machine share its cores: not all of them each
        torch.set_num_threads(cpu_threads(os.environ, os.cpu_count() or 1,
                                          torch.get_num_threads()))
    # streams resolved (a resumed run keeps its own), the batch split, trackers, and a
    # resume that would mix two recipes: the checks `train run --dry-run` makes too
    micro, accum = check_start(cfg, world)
    ds = open_training_cache(cfg)
    check = check_cache(ds, cfg)
    dist.wait_for_everyone()  # every rank compares with the old config.yaml before it is rewritten

    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    torch.backends.cudnn.allow_tf32 = cfg.tf32
    # a method whose steps leave some parameters without a gradient (ERW's warm-up trains
    # the first blocks only) needs DDP to look for them
    ddp = DistributedDataParallelKwargs(
        find_unused_parameters=METHODS[cfg.align.method].partial_graph)
    acc = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision, project_dir=str(run_dir),
                      log_with=cfg.all_trackers() or None,
                      kwargs_handlers=[ddp])
    main = acc.is_main_process
    say = log if main else (lambda _msg: None)
    if main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / "config.yaml", to_yaml(cfg).encode())
    for w in check.warnings:
        say(f"WARNING: {w}")
    say(check.summary)

    set_seed(cfg.seed)  # identical initial weights on every rank
    m = cfg.model
    net, method = build_generator(cfg)
    method.use_cache(ds.spec)
    student = Student(net, method, latent_scale=check.latent_scale)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    if m.init_from and not checkpoints(run_dir):   # a resume has its own weights
        say(init_from_checkpoint(m.init_from, net, ema, getattr(student, "projector", None),
                                 m.arch, method, **model_geometry(cfg)))
    n_params = sum(p.numel() for p in net.parameters())
    say(f"model {m.arch}: {n_params / 1e6:.1f}M parameters; method {method.describe(net)}"
        + f"; global batch {cfg.batch_size} = {world} process(es) x {micro} x {accum} "
        f"accumulation, {cfg.data.streams} data streams; {cfg.mixed_precision} autocast")
    o = cfg.optim
    opt = torch.optim.AdamW(student.parameters(), lr=o.lr, betas=tuple(o.betas),
                            weight_decay=o.weight_decay, eps=o.eps)
    if m.compile:
        student.net.compile()
    student, opt = acc.prepare(student, opt)
    ema.to(acc.device)
    loader = make_loader(ds, cfg, rank=acc.process_index, world_size=world,
                         teacher_fields=method.fields_at(0))
    meta = {"arch": m.arch, "config": flatten(cfg), "latent_scale": check.latent_scale,
            "files": CHECKPOINT_FILES, "cache": cache_info(ds)}   # what `train sample` reads
    run = Run(cfg, run_dir, acc, method, student, ema, opt, loader, TrainState(loader),
              micro, accum, meta, say)
    if cfg.preview.every:  # every rank builds the decoder, so a bad one fails everywhere
        from .generate import Preview
        preview = Preview(cfg.preview, method=method, training_cache=cfg.data.cache,
                          cache=meta["cache"], latent_scale=check.latent_scale,
                          shape=(m.in_channels, m.latent_size, m.latent_size),
                          num_classes=m.num_classes, seed=cfg.seed, device=acc.device,
                          precision="bf16" if cfg.mixed_precision == "bf16" else "fp32")
        for w in preview.decoder.warnings:
            say(f"WARNING: {w}")
        say(f"preview grids every {cfg.preview.every} steps in {run_dir / 'samples'}, "
            f"decoder: {preview.decoder.source}")
        run.preview = preview if main else None
    set_seed(cfg.seed + acc.process_index)  # the steps' draws use their own generators
    return run


def resume(run: Run) -> None:
    """Continue from the newest complete checkpoint, if any (every rank the same), drop
    log lines past it, open the metrics."""
    cfg, main = run.cfg, run.acc.is_main_process
    ckpt = choose_checkpoint(run.acc, run.run_dir, run.say)
    if ckpt:
        resume_run(run.acc, ckpt, run.student, run.ema, run.opt, run.state)
        run.say(f"resumed from {ckpt} (step {run.state.step})")
    if main:
        _trim_metrics(run.run_dir / "metrics.jsonl", run.state.step)
        _trim_metrics(run.run_dir / "samples.jsonl", run.state.step)
    if cfg.all_trackers():  # hparams take scalars and strings only
        run.acc.init_trackers(cfg.tracker_project, config={
            k: v if isinstance(v, (int, float, str, bool)) else str(v)
            for k, v in flatten(cfg).items()}, init_kwargs=_run_names(cfg, run.run_dir))
    run.metrics = Metrics(run)


def _run_names(cfg: TrainConfig, run_dir: Path) -> dict[str, dict]:
    """The run named after the run directory (REPA names its wandb runs), for the trackers
    whose accelerate class takes a run name apart from the project."""
    name = run_dir.resolve().name
    keys = {"wandb": "name", "mlflow": "run_name", "trackio": "name"}
    return {t: {keys[t]: name} for t in cfg.all_trackers() if t in keys}


def log_image(acc: Any, name: str, grid: Any, step: int) -> None:
    """A uint8 [H, W, 3] image to every tracker that takes images (metrics.jsonl does not:
    the PNG next to it is the record)."""
    for tracker in acc.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: grid[None]}, step, dataformats="NHWC")
        elif tracker.name in ("aim", "clearml"):   # one image per name (aim.Image(value),
            tracker.log_images({name: grid}, step)  # clearml's report_image(image=value))
        elif hasattr(tracker, "log_images"):   # wandb, swanlab: a list of images per name
            tracker.log_images({name: [grid]}, step)


def _read_fields(run: Run, fields: tuple[str, ...], batches) -> Iterator:
    """The batches of a loader that reads the teacher `fields` (the method's at this
    step), from the current position: when they changed (HASTE stops reading its
    targets after termination), a new loader takes over the old one's position, which
    resumes exactly (the data order does not depend on the fields)."""
    if batches is not None:
        batches.close()   # the old loader's workers end with it
    if fields != run.teacher_fields:
        world = run.acc.num_processes
        loader = make_loader(run.loader.ds, run.cfg, rank=run.acc.process_index,
                             world_size=world, teacher_fields=fields)
        loader.load_state_dict(run.loader.state_dict())
        dropped = [f for f in run.teacher_fields if f not in fields]
        run.loader = run.state.loader = loader
        run.say(f"step {run.state.step + 1}: the loader reads "
                f"{', '.join(loader.cfg.fields)}"
                + (f" (no longer {', '.join(dropped)})" if dropped else ""))
    return _batches(run.loader)


def train_step(run: Run, batches: Iterator[dict[str, torch.Tensor]]
               ) -> tuple[dict[str, float], tuple[float, float]]:
    """One optimizer step: this process's share of the global batch, each stream's
    draws, the method's terms over the micro-batches, clipping, AdamW, EMA. Returns the
    terms averaged over the processes (and grad_norm), and the seconds spent waiting for
    data and in the whole step. Raises NonFiniteLoss before applying a non-finite update."""
    cfg, acc, state, o = run.cfg, run.acc, run.state, run.cfg.optim
    t_step = time.perf_counter()
    batch = next(batches)                          # this process's share of the global batch
    indices = batch.pop(INDEX)                     # diagnostics only: stays on the host
    batch = {name: v.to(acc.device, non_blocking=True) for name, v in batch.items()}
    wait = time.perf_counter() - t_step
    if cfg.log_samples:
        _log_samples(acc, run.run_dir / "samples.jsonl", state.step + 1, indices)
    draws = _draws(run, tuple(batch[MOMENTS].shape[1:]))
    sums: dict[str, torch.Tensor] = {}
    for k in range(run.accum):
        part = slice(k * run.micro, (k + 1) * run.micro)
        last = k == run.accum - 1
        with contextlib.nullcontext() if last else acc.no_sync(run.student):
            out = run.student({n: v[part] for n, v in batch.items()},
                              {n: v[part] for n, v in draws.items()}, state.step)
            acc.backward(out["loss"] / run.accum)
        for name, v in out.items():
            sums[name] = sums.get(name, 0.0) + v.detach().float() / run.accum
    grad_norm = acc.clip_grad_norm_(run.trained, o.grad_clip or math.inf)
    names = sorted(sums)
    terms = acc.reduce(torch.stack([sums[n] for n in names]), reduction="mean")
    bad_grad = cfg.mixed_precision != "fp16" and not torch.isfinite(grad_norm)
    if not torch.isfinite(terms).all() or bad_grad:
        _stop_nonfinite(acc, run.run_dir, state.step + 1, dict(zip(names, terms.tolist())),
                        float(grad_norm), o.lr, indices.tolist(), run.say)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    update_ema(run.ema, run.net, o.ema_decay)
    state.step += 1
    return ({**dict(zip(names, terms.tolist())), "grad_norm": float(grad_norm)},
            (wait, time.perf_counter() - t_step))


def _draws(run: Run, moments_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The step's random draws for this process's samples: each of its streams' from a
    generator seeded by (seed, step, stream), in batch order."""
    per_stream = run.cfg.batch_size // run.cfg.data.streams
    gen = run.draw_gen
    parts = []
    for stream in run.loader.own:
        gen.manual_seed(stream_seed(run.cfg.seed, run.state.step, stream))
        parts.append(run.method.draws(per_stream, moments_shape, generator=gen,
                                      device=run.acc.device))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def after_step(run: Run, terms: dict[str, float], timing: tuple[float, float]) -> None:
    """Metrics every log_every steps, preview grids, checkpoints (and all at the end)."""
    cfg, step = run.cfg, run.state.step
    done = step == cfg.max_steps
    run.metrics.add(terms, *timing)
    # a method's phase ends here (ERW's warm-up): its terms are other quantities than the
    # next phase's (the same names included), so no log window spans the boundary
    if step % cfg.log_every == 0 or done or run.method.phase_change(step):
        run.metrics.flush()
    if run.preview and (step % cfg.preview.every == 0 or done):
        grid = run.preview(run.ema, run.run_dir / "samples" / f"step_{step:08d}.png")
        log_image(run.acc, "preview", grid, step)
    if step % cfg.checkpoint_every == 0 or done:
        replicas = _check_replicas(run.acc, run.net, step)
        path = save_run_checkpoint(run.acc, run.run_dir, step, cfg.keep_checkpoints,
                                   {**run.meta, "step": step,
                                    "weights_sha256_per_process": replicas},
                                   run.student, run.ema, run.opt, run.state)
        run.metrics.say(f"checkpoint {path}")


class Metrics:
    """The progress bar and metrics.jsonl: each term averaged over the steps of a window
    that logged it (a method's phases may log different terms), throughput, data wait."""

    def __init__(self, run: Run):
        from tqdm.auto import tqdm
        self.run, self.main = run, run.acc.is_main_process
        self.path = run.run_dir / "metrics.jsonl"
        cfg = run.cfg
        self.bar = tqdm(total=cfg.max_steps, initial=run.state.step, unit="step",
                        disable=not (self.main and cfg.progress), dynamic_ncols=True,
                        mininterval=0.1 if sys.stderr.isatty() else 30)  # logs: a line / 30 s
        self.last: dict[str, Any] = {}
        self.session_steps, self.session_t0 = 0, time.perf_counter()  # this process's run
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.steps, self.wait, self.busy, self.t0 = 0, 0.0, 0.0, time.perf_counter()

    def add(self, terms: dict[str, float], wait: float, seconds: float) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.steps += 1
        self.session_steps += 1
        self.wait += wait
        self.busy += seconds
        self.bar.update(1)

    def flush(self) -> None:
        run, n = self.run, self.steps
        elapsed = time.perf_counter() - self.t0
        self.last = {"step": run.state.step, "epoch": run.loader.epoch,
                     **{k: _num(v / self.counts[k]) for k, v in self.sums.items()},
                     "lr": run.cfg.optim.lr, "steps_per_s": n / elapsed,
                     "img_per_s": n * run.cfg.batch_size / elapsed,
                     "data_wait": self.wait / max(self.busy, 1e-9),
                     "time": time.time()}
        if self.main:
            with self.path.open("a") as f:
                f.write(json.dumps(self.last) + "\n")
            self.bar.set_postfix(loss=f"{self.last['loss']:.4f}",
                                 img_s=f"{self.last['img_per_s']:.0f}",
                                 wait=f"{100 * self.last['data_wait']:.1f}%")
        if run.cfg.all_trackers():
            run.acc.log({k: v for k, v in self.last.items() if k not in ("step", "time")},
                        step=run.state.step)
        self._reset()

    def summary(self) -> dict[str, Any]:
        """The last logged metrics, and the throughput of this whole invocation (steps
        run here, start-up included), which the last window's img/s is not."""
        elapsed = time.perf_counter() - self.session_t0
        return {**self.last, "session_steps": self.session_steps,
                "session_img_per_s": self.session_steps * self.run.cfg.batch_size / elapsed}

    def say(self, msg: str) -> None:
        if self.main:
            (self.bar.write if self.run.cfg.progress else self.run.say)(msg)

    def close(self) -> None:
        self.bar.close()


def _enter_phase(change, opt, ema: torch.nn.Module, net: torch.nn.Module, step: int,
                 say: Callable[[str], None]) -> None:
    """A method's phase boundary (ERW's end of warm-up): fresh AdamW moments, the EMA set
    to the current weights, as the method asks."""
    if change.reset_optimizer:
        getattr(opt, "optimizer", opt).state.clear()   # accelerate wraps the optimizer
    if change.reset_ema:
        ema.load_state_dict(net.state_dict())
    say(f"step {step + 1}: phase {change.name}"
        + ("; optimizer state reset" if change.reset_optimizer else "")
        + ("; EMA reset to the weights" if change.reset_ema else ""))


def _log_samples(acc, path: Path, step: int, indices: torch.Tensor) -> None:
    """Append {"step", "indices": one list per process} to samples.jsonl (main process)."""
    from accelerate.utils import gather_object
    per_rank = gather_object([indices.tolist()])
    if acc.is_main_process:
        with path.open("a") as f:
            f.write(json.dumps({"step": step, "indices": per_rank}) + "\n")


def _num(v: float) -> float | str:
    """Strict JSON has no NaN/Infinity (an fp16 step the scaler skipped has an inf norm)."""
    return v if math.isfinite(v) else str(v)


def _stop_nonfinite(acc, run_dir: Path, step: int, terms: dict[str, float], grad_norm: float,
                    lr: float, indices: list[int], say) -> None:
    found = checkpoints(run_dir)
    info = {"step": step, "terms": {k: _num(v) for k, v in terms.items()},
            "grad_norm": _num(grad_norm), "lr": lr,
            "sample_indices_main_process": indices,
            "last_checkpoint": str(found[-1]) if found else None}
    if acc.is_main_process:
        atomic_write_bytes(run_dir / f"nonfinite-step_{step}.json",
                           json.dumps(info, indent=1).encode())
    acc.wait_for_everyone()
    raise NonFiniteLoss(
        f"non-finite value at step {step}: "
        + ", ".join(f"{k}={v:.4g}" for k, v in terms.items()) + f", grad_norm={grad_norm:.4g}"
        + f" (lr {lr}). The update was not applied and no checkpoint was written; the last "
        f"good one is {info['last_checkpoint'] or '(none yet)'}. Details and this batch's "
        f"sample indices: {run_dir}/nonfinite-step_{step}.json. Try a lower optim.lr, "
        "mixed_precision=bf16 instead of fp16, or inspect those samples.")
