"""`pipeline`: build and check caches. Thin: parse, validate, print, call a library function."""

from __future__ import annotations

import argparse
import json
import sys

from cache import CacheError, CacheSpec, open_cache


def _open(args: argparse.Namespace):
    return open_cache(args.cache, allow_partial=args.allow_partial)


def cmd_verify(args: argparse.Namespace) -> int:
    ds = _open(args)
    report = ds.verify(num_threads=args.threads)
    print(report)
    return 0 if report.ok else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    from cache.format import read_manifest
    m = read_manifest(args.cache)
    if args.json:
        print(json.dumps(m, indent=1))
        return 0
    spec = CacheSpec.from_json(m["spec"])   # read_manifest checked what is printed here
    prov = m.get("provenance", {})
    print(f"cache      {args.cache}  ({m['format']} v{m['format_version']}, {m['status']})")
    print(f"samples    {spec.num_samples} in {spec.num_shards} shards of {spec.shard_size}; "
          f"valid {m.get('num_valid', '?')}, failed {len(m.get('failures', []))}")
    print(f"backends   {', '.join(spec.backends)}{'  (zstd)' if spec.compression else ''}")
    print("fields")
    for name, f in spec.fields.items():
        print(f"  {name:13s} {f.dtype:8s} {list(f.shape)}")
    lat = m["latent"]
    print(f"latent     scale {lat['scale']}, {lat.get('stored', '?')}")
    if "channel_stats" in lat:
        print(f"           channel mean {lat['channel_stats'].get('mean')}")
        print(f"           channel std  {lat['channel_stats'].get('std')}")
    if spec.attn_blocks:
        print(f"attention  teacher blocks {list(spec.attn_blocks)}, {spec.attn_heads} heads x "
              f"{spec.attn_head_dim}, {spec.attn_dtype}; q stored x head_dim^-0.5, logits = "
              "q k^T over the patch tokens")
    print("provenance")
    for k, v in prov.items():
        text = json.dumps(v) if not isinstance(v, str) else v
        print(f"  {k:13s} {text if len(text) < 100 else text[:97] + '...'}")
    for f in m.get("failures", [])[:args.max_failures]:
        print(f"  failed     {f['index']} {f['key']}: {f['reason']}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    print(json.dumps(_open(args).stats(), indent=1))
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from cache.lock import CacheLockedError, LockLostError

    from .encoders import WeightsError
    from .job import DiskFullError, EncodeConfig, TooManyFailures, make_plan, run_encode
    from .sources import SourceError
    opts = {k: v for k, v in vars(args).items() if k not in ("command", "func", "dry_run")}
    opts["progress"] = not opts.pop("no_progress")
    try:
        cfg = EncodeConfig(**opts)
        if args.dry_run:   # the plan even without the weights, then why they are missing
            plan = make_plan(cfg, without_weights=True)
            print(plan.describe())
            if plan.missing_weights:
                print("(the plan assumes the models' architectures: their weights are not "
                      "here)")
                raise WeightsError(plan.missing_weights)
            return 0
        run_encode(cfg)
    except (ValueError, SourceError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TooManyFailures as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (CacheLockedError, LockLostError) as e:   # another job writes this cache
        print(f"error: {e}", file=sys.stderr)
        return 4
    except DiskFullError as e:
        print(f"error: {e}", file=sys.stderr)
        return 5
    return 0


def cmd_bank(args: argparse.Namespace) -> int:
    """GMem's memory bank: the cache's CLS column as one safetensors file (cache/bank.py)."""
    from cache.bank import write_bank
    summary = write_bank(args.cache, args.out, chunk=args.chunk,
                         log=(lambda m: print(m, file=sys.stderr)) if args.progress
                         else (lambda _m: None))
    print(f"bank {summary['out']}: {summary['rows']:,} rows x {summary['dim']} (float16, "
          f"{summary['bytes']:,} bytes) from cache {summary['cache']} (manifest sha256 "
          f"{summary['cache_manifest_sha256'][:12]})")
    return 0


def _add_encode_args(enc: argparse.ArgumentParser) -> None:
    from .encoders import DEFAULT_TEACHER, DEFAULT_VAE, TEACHERS
    from .sources import SOURCES
    a = enc.add_argument
    # names are checked by EncodeConfig (one-line errors), not by argparse's usage dump
    a("--dataset", default="imagenet", help=f"one of {', '.join(sorted(SOURCES))}")
    a("--data-dir", help="image root (imagenet: the folder holding train/ and val/); "
                         "demo: where to generate the demo images")
    a("--out", required=True, help="cache directory or fsspec URL, e.g. s3://bucket/in1k-256 "
      "(created, or resumed if it exists)")
    a("--split", default="train", choices=("train", "val"))
    a("--format", default="zarr", choices=("zarr", "wds", "both"))
    a("--resolution", type=int, default=256, help="256 or 512 (any multiple of 32)")
    a("--views", type=int, default=1, choices=(1, 2),
      help="2 also encodes the horizontally flipped image")
    a("--vae", default=DEFAULT_VAE, help="diffusers hub id or local dir ('tiny': test VAE)")
    a("--teacher", default=DEFAULT_TEACHER, help=f"one of {', '.join(sorted(TEACHERS))}")
    a("--teacher-weights", help="official dinov2_*_pretrain.pth or timm weights file "
                                "(default: timm's hub weights)")
    a("--random-weights", action="store_true",
      help="random-init models (smoke tests and benchmarks only; recorded in the manifest)")
    a("--random-teacher", action="store_true",
      help="random-init teacher only, the VAE loads from --vae (the demo; recorded)")
    a("--token-dtype", default="fp16", choices=("fp16", "int8"))
    a("--teacher-attn", type=_blocks, default=(), metavar="B,B,...",
      help="also store the per-head q, k of these teacher blocks (0-indexed) for HASTE's "
           "attention term, from the same forward: 8,9,10,11 for HASTE on SiT-L/XL, 7,9,11 "
           "on SiT-B (3 MiB per image for 4 blocks of DINOv2-B at 256 px in fp16)")
    a("--attn-dtype", default="fp16", choices=("fp16", "int8"),
      help="storage of --teacher-attn: fp16, or int8 with an fp16 scale per (token, head) "
           "(half the bytes; docs/cache-format.md has the error of each)")
    a("--moments-dtype", default="fp16", choices=("fp16", "fp32"))
    a("--shard-size", type=int, default=1024, help="images per shard (unit of work)")
    a("--batch-size", type=int, help="images per encoder pass (default 256 on GPU, 8 on CPU)")
    a("--num-gpus", type=int, help="GPU encoders (default: every GPU Ray sees; 0: CPU)")
    a("--cpu-encoders", type=int, default=1, help="encoder actors when there is no GPU")
    a("--encoder-threads", type=int, default=1, help="torch threads per CPU encoder")
    a("--precision", choices=("bf16", "fp16", "fp32"),
      help="encoder precision (default: bf16 on GPU, fp32 on CPU)")
    a("--compile", action="store_true", help="torch.compile the encoders")
    a("--address", help="existing Ray cluster (e.g. auto or ray://head:10001); "
                        "default: embedded local Ray")
    a("--num-cpus", type=int, help="CPUs of the embedded Ray (default: all)")
    a("--limit", type=int, help="encode N images spread evenly over the sorted list")
    a("--max-failures", default="0.1%",
      help="undecodable images allowed, a count or a percentage (default 0.1%%)")
    a("--seed", type=int, default=0, help="seed of --random-weights / --random-teacher")
    a("--no-progress", action="store_true", help="no live progress bar")
    a("--break-lock", action="store_true",
      help="take the cache's lock even from a job that looks alive, saying whose: for a "
           "job known to be gone whose lock has not expired (another machine's lock expires "
           "10 min after its last heartbeat; a dead job on this machine needs no flag)")
    a("--dry-run", action="store_true", help="list, load the models, print the plan, stop")


def _blocks(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of block "
                                         "numbers (0-indexed), e.g. 8,9,10,11")
    return tuple(int(p) for p in parts)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipeline", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="encode an image set into a cache (Ray job)")
    enc.set_defaults(func=cmd_encode)
    _add_encode_args(enc)
    for name, func, help_ in (("verify", cmd_verify, "check every shard of a cache"),
                              ("inspect", cmd_inspect, "print a readable manifest summary"),
                              ("stats", cmd_stats, "counts, sizes, latent and label stats")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("cache", help="cache directory or fsspec URL")
        s.add_argument("--allow-partial", action="store_true",
                       help="open an unfinished cache (only its done shards)")
        s.set_defaults(func=func)
    bank = sub.add_parser("bank", help="GMem: write the cache's CLS tokens as a bank file",
                          description="Every valid sample's CLS token (view 0) in index "
                          "order, with its label and cache index: the memory bank `train "
                          "sample --bank FILE` draws GMem's conditions from.")
    bank.add_argument("cache", help="cache directory or fsspec URL")
    bank.add_argument("out", help="the bank file to write (safetensors), e.g. bank.safetensors")
    bank.add_argument("--chunk", type=_positive, default=65536, help="rows read at a time")
    bank.add_argument("--progress", action="store_true", help="a line per chunk on stderr")
    bank.set_defaults(func=cmd_bank)
    sub.choices["verify"].add_argument("--threads", type=int, default=None)
    sub.choices["inspect"].add_argument("--json", action="store_true",
                                        help="print the whole manifest as JSON")
    sub.choices["inspect"].add_argument("--max-failures", type=int, default=20)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
