"""`train`: run (issue 4); sample, eval and plot arrive with issue 5.

    train run CONFIG.yaml [key=value ...] [--dry-run]

Exit codes: 0 done, 2 bad config or cache (one-line message), 3 non-finite loss.
"""

from __future__ import annotations

import argparse
import sys

_PLANNED = {
    "sample": "sample images from a run or checkpoint (issue 5)",
    "eval": "FID / IS / precision / recall of a samples .npz (issue 5)",
    "plot": "draw a run's loss and throughput curves (issue 5)",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train from a cache; rerun on the same run_dir to resume")
    run.add_argument("config", help="a YAML preset, e.g. configs/urepa.yaml")
    run.add_argument("overrides", nargs="*", help="key=value, e.g. optim.lr=2e-4 run_dir=runs/x")
    run.add_argument("--dry-run", action="store_true",
                     help="check the config against the cache, print the plan, train nothing")
    for name, help_ in _PLANNED.items():
        s = sub.add_parser(name, help=help_)
        s.add_argument("args", nargs=argparse.REMAINDER)
    return p


def run(args: argparse.Namespace) -> int:
    from cache import CacheError, open_cache

    from .config import ConfigError, load_config
    from .data import check_cache
    from .loop import NonFiniteLoss, train

    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            check = check_cache(open_cache(cfg.data.cache, backend=cfg.data.backend), cfg)
            for w in check.warnings:
                print(f"WARNING: {w}")
            print(check.summary)
            print(f"would train {cfg.model.arch} (align {cfg.align.method}) for "
                  f"{cfg.max_steps:,} steps of {cfg.batch_size} into {cfg.run_dir}")
            return 0
        last = train(cfg)
    except (ConfigError, CacheError) as e:
        print(f"train run: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"train run: {e}", file=sys.stderr)
        return 3
    if last:
        print("done: step {step}, loss {loss:.4f}, {img_per_s:.1f} img/s".format(**last))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return run(args)
    print(f"train {args.command}: not yet implemented ({_PLANNED[args.command]})",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
