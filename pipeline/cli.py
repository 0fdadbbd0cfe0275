"""`pipeline`: build and check caches. Thin: parse, validate, print, call a library function."""

from __future__ import annotations

import argparse
import json
import sys

from cache import CacheError, open_cache


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
    spec = m["spec"]
    prov = m.get("provenance", {})
    print(f"cache      {args.cache}  ({m['format']} v{m['format_version']}, {m['status']})")
    print(f"samples    {spec['num_samples']} in {-(-spec['num_samples'] // spec['shard_size'])} "
          f"shards of {spec['shard_size']}; valid {m.get('num_valid', '?')}, "
          f"failed {len(m.get('failures', []))}")
    print(f"backends   {', '.join(spec['backends'])}"
          f"{'  (zstd)' if spec.get('compression') else ''}")
    print("fields")
    for name, f in m["fields"].items():
        print(f"  {name:13s} {f['dtype']:8s} {f['shape']}")
    lat = m["latent"]
    print(f"latent     scale {lat['scale']}, {lat['stored']}")
    if "channel_stats" in lat:
        print(f"           channel mean {lat['channel_stats']['mean']}")
        print(f"           channel std  {lat['channel_stats']['std']}")
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
    print("pipeline encode: not yet implemented (issue 3)", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipeline", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="encode an image set into a cache (Ray job)")
    enc.set_defaults(func=cmd_encode)
    for name, func, help_ in (("verify", cmd_verify, "check every shard of a cache"),
                              ("inspect", cmd_inspect, "print a readable manifest summary"),
                              ("stats", cmd_stats, "counts, sizes, latent and label stats")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("cache", help="cache directory")
        s.add_argument("--allow-partial", action="store_true",
                       help="open an unfinished cache (only its done shards)")
        s.set_defaults(func=func)
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
