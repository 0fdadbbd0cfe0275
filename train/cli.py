"""`train`: run, sample, evaluate and plot. Subcommands arrive with issues 4 and 5."""

from __future__ import annotations

import argparse
import sys

_PLANNED = {
    "run": "train a model from a cache: train run CONFIG.yaml [key=value ...] (issue 4)",
    "sample": "sample images from a run or checkpoint (issue 5)",
    "eval": "FID / IS / precision / recall of a samples .npz (issue 5)",
    "plot": "draw a run's loss and throughput curves (issue 5)",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in _PLANNED.items():
        s = sub.add_parser(name, help=help_)
        s.add_argument("args", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(f"train {args.command}: not yet implemented ({_PLANNED[args.command]})",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
