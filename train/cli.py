"""`train`: train from a cache, sample, evaluate, plot.

    train run CONFIG.yaml [key=value ...] [--dry-run]
    train sample RUN_DIR_OR_CHECKPOINT [--num 50000 --cfg 1.65 --mode sde ...] [--out DIR]
    train convert SOURCE OUT        a REPA-family .pt <-> our checkpoint layout
    train eval SAMPLES.npz --ref REFERENCE.npz [--inception PATH]
    train plot RUN_DIR [--out PNG]

Exit codes: 0 done, 2 bad input (one-line message), 3 non-finite loss (run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train from a cache; rerun on the same run_dir to resume")
    run.add_argument("config", help="a YAML preset, e.g. configs/urepa.yaml")
    run.add_argument("overrides", nargs="*", help="key=value, e.g. optim.lr=2e-4 run_dir=runs/x")
    run.add_argument("--dry-run", action="store_true",
                     help="check the config against the cache, print the plan, train nothing")
    _sample_parser(sub)
    cv = sub.add_parser("convert", help="a REPA-family .pt file <-> our checkpoint layout",
                        description="A REPA / HASTE checkpoint file becomes one of our "
                        "checkpoint directories (for model.init_from=, train sample); one of "
                        "our SiT checkpoints becomes a .pt file that REPA's generate.py loads")
    cv.add_argument("source", help="a REPA-family .pt file, or a run / checkpoint directory")
    cv.add_argument("out", help="the new checkpoint directory, or the new .pt file")
    cv.add_argument("--arch", default=None,
                    help="the SiT size of a REPA-family file (default: from its shapes)")
    ev = sub.add_parser("eval", help="FID, IS, precision and recall of a samples .npz")
    ev.add_argument("samples", help="an .npz with arr_0 uint8 [N, H, W, 3] (train sample)")
    ev.add_argument("--ref", required=True,
                    help="reference: an ADM reference batch (mu, sigma[, arr_0]) or an .npz "
                         "of images, e.g. VIRTUAL_imagenet256_labeled.npz")
    ev.add_argument("--inception", default=None,
                    help="FID Inception weights (pt_inception-2015-12-05-6726825d.pth); "
                         "default $UREPA_INCEPTION_WEIGHTS, then the torch hub cache")
    ev.add_argument("--random-weights", action="store_true",
                    help="random-init Inception (smoke tests only: the numbers mean nothing)")
    ev.add_argument("--batch-size", type=int, default=100)
    ev.add_argument("--out", default=None, help="also write the results here as JSON")
    pl = sub.add_parser("plot", help="draw a run's loss, throughput and data-wait curves")
    pl.add_argument("run_dir")
    pl.add_argument("--out", default=None, help="PNG path (default RUN_DIR/metrics.png)")
    return p


def _interval(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO,HI, e.g. 0,0.7") from None
    return lo, hi


def _sample_parser(sub) -> None:
    from .settings import CHECKPOINT_FORMATS as FORMATS
    from .settings import ODE_METHODS, SDE_LAST_STEPS, SampleSettings
    d = SampleSettings()
    s = sub.add_parser("sample", help="sample images from a run or checkpoint (EMA weights)",
                       description="Resumable: rerun the same command to finish an "
                       "interrupted job. Multi-GPU: accelerate launch \"$(command -v train)\" "
                       "sample ...")
    s.add_argument("source", help="a run directory (its newest checkpoint), a checkpoint, or "
                   "a REPA-family .pt file (REPA's, HASTE's SiT; their 'ema' weights)")
    s.add_argument("--checkpoint-format", choices=FORMATS, default="auto",
                   help="auto: a directory is ours, a file the REPA family's")
    s.add_argument("--arch", default=None,
                   help="the SiT size of a REPA-family file (default: from its shapes)")
    s.add_argument("--out", default=None,
                   help="output directory (default RUN_DIR/samples/<step>-<mode>-cfg<cfg>-"
                        "seed<seed>)")
    s.add_argument("--num", "--num-samples", dest="num", type=int, default=d.num,
                   help=f"samples (default {d.num}; under torchrun write --num-samples N or "
                        "--num=N: torchrun takes --num for its own --numa-binding)")
    s.add_argument("--cfg", type=float, default=d.cfg,
                   help="guidance scale; 1 = none (U-REPA: 1.65, REPA: 1.8 with the interval)")
    s.add_argument("--interval", type=_interval, default=d.interval,
                   help="guidance only for t in LO,HI (default: the method's, 0,0.7; REG "
                        "0,0.85)")
    s.add_argument("--cls-cfg", type=float, default=d.cls_cfg,
                   help="REG: the guidance scale of the CLS stream (default: --cfg)")
    s.add_argument("--bank", default=d.bank,
                   help="GMem: the CLS bank to draw conditions from, a file of `pipeline "
                        "bank` or a cache (default: the training cache, if still there)")
    s.add_argument("--mode", choices=("sde", "ode"), default=d.mode)
    s.add_argument("--steps", type=int, default=None, help="default 250 (sde), 50 (ode)")
    s.add_argument("--ode-method", choices=ODE_METHODS, default=d.ode_method)
    s.add_argument("--sde-last-step", choices=SDE_LAST_STEPS, default=d.sde_last_step,
                   help="the SDE's step from t=0.04 to 0: along the drift, as REPA's sampler "
                        "(every paper number), or 'denoise' (x - t v)")
    s.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    s.add_argument("--seed", type=int, default=d.seed)
    s.add_argument("--weights", choices=("ema", "model"), default=d.weights)
    s.add_argument("--vae", default=None,
                   help="decoder: a hub id or local dir, or 'random'; default: the cache's "
                        "own VAE if it was random-init, else stabilityai/sd-vae-ft-ema")
    s.add_argument("--precision", choices=("fp32", "bf16"), default=d.precision)
    s.add_argument("--grid", type=int, default=d.grid, help="samples in grid.png (0: none)")
    s.add_argument("--no-npz", dest="npz", action="store_false",
                   help="PNGs only (no samples.npz)")


def _error(e: object) -> None:
    """A refusal as one line on stderr; the exit code says which kind (see the top)."""
    print(f"error: {e}", file=sys.stderr)


def dry_run(cfg) -> None:
    """What `train run` checks before its first step, for the processes this launch
    starts (WORLD_SIZE under torchrun / accelerate launch, else 1); prints the plan."""
    from .checkpoint import check_init, checkpoints
    from .config import check_start, model_geometry, process_count
    from .data import check_cache, open_training_cache
    from .methods import build_method

    world = process_count()
    micro, accum = check_start(cfg, world)
    check = check_cache(open_training_cache(cfg), cfg)
    for w in check.warnings:
        print(f"WARNING: {w}")
    print(check.summary)
    if cfg.model.init_from and checkpoints(cfg.run_dir):
        print(f"would resume {cfg.run_dir}: model.init_from is not used")
    elif cfg.model.init_from:
        method = build_method(cfg.align, cfg.method_args, cfg.model)
        ck = check_init(cfg.model.init_from, cfg.model.arch, method, **model_geometry(cfg))
        print(f"would start from {ck.path} ({ck.format} checkpoint, step {ck.step}; "
              f"weights: {', '.join(sorted(ck.states))})")
    print(f"would train {cfg.model.arch} (method {cfg.align.method}) for "
          f"{cfg.max_steps:,} steps of {cfg.batch_size} = {world} process(es) x {micro} x "
          f"{accum} accumulation, {cfg.data.streams} data streams, into {cfg.run_dir}")


def run(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config

    try:   # a config's typos are reported before torch is imported (about a second)
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        _error(e)
        return 2
    from cache import CacheError

    from .checkpoint import CheckpointError
    from .loop import NonFiniteLoss, train
    from .vae import DecoderError

    try:
        if args.dry_run:
            dry_run(cfg)
            return 0
        last = train(cfg)
    except (ConfigError, CacheError, DecoderError, CheckpointError) as e:
        _error(e)
        return 2
    except NonFiniteLoss as e:
        _error(e)
        return 3
    if last:
        print("done: step {step}, loss {loss:.4f} (last log window); {session_steps} steps "
              "here at {session_img_per_s:.1f} img/s, start-up included".format(**last))
    return 0


def sample(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError, resolve_checkpoint
    from .generate import SampleError, SampleSettings, default_out, generate
    from .vae import DecoderError
    try:
        s = SampleSettings(num=args.num, cfg=args.cfg, interval=args.interval, mode=args.mode,
                           steps=args.steps, ode_method=args.ode_method,
                           cls_cfg=args.cls_cfg, bank=args.bank,
                           sde_last_step=args.sde_last_step, batch_size=args.batch_size,
                           seed=args.seed, weights=args.weights, vae=args.vae,
                           precision=args.precision, grid=args.grid, npz=args.npz)
        out = args.out or default_out(resolve_checkpoint(args.source,
                                                         args.checkpoint_format)[0], s)
        summary = generate(args.source, out, s, checkpoint_format=args.checkpoint_format,
                           arch=args.arch)
    except (SampleError, DecoderError, CheckpointError) as e:
        _error(e)
        return 2
    if "grid" in summary or "npz" in summary:  # the main process
        print(f"done: {summary['num']:,} samples in {summary['out']} ({summary['made_here']:,} "
              f"made by this process in {summary['seconds']:.1f} s)")
        for key in ("grid", "npz"):
            if key in summary:
                print(f"  {key}: {summary[key]}")
    return 0


def convert(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError, convert_checkpoint
    try:
        out, ck = convert_checkpoint(args.source, args.out, arch=args.arch)
    except CheckpointError as e:
        _error(e)
        return 2
    print(f"{ck.path} ({ck.format}, {ck.arch}, step {ck.step}, weights: "
          f"{', '.join(sorted(ck.states))}{', projector' if ck.projector else ''}) -> {out}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from .evaluate import EvalError, evaluate_npz
    out = Path(args.out) if args.out else None
    try:
        if out:   # found now, not after an hour of Inception (missing folders are made)
            if out.is_dir():
                raise EvalError(f"--out {out} is a directory; give a file, e.g. "
                                f"{out / 'fid.json'}")
            above = next((d for d in out.parents if d.exists()), None)
            if above is not None and not above.is_dir():
                raise EvalError(f"--out {out}: {above} is a file, not a folder")
        res = evaluate_npz(args.samples, args.ref, inception=args.inception,
                           random_weights=args.random_weights, batch_size=args.batch_size)
    except EvalError as e:
        _error(e)
        return 2
    for k, v in res.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    if out:
        from cache.format import atomic_write_json
        try:
            atomic_write_json(out, res)
        except OSError as e:
            _error(f"--out {out}: cannot write it ({e.strerror or e}); the results are above")
            return 2
    return 0


def plot(args: argparse.Namespace) -> int:
    from .plot import PlotError, plot_run
    try:
        path = plot_run(args.run_dir, args.out)
    except PlotError as e:
        _error(e)
        return 2
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {"run": run, "sample": sample, "convert": convert, "eval": evaluate,
            "plot": plot}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
