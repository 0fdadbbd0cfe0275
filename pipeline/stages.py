"""The three stages of the encode job as plain functions on one shard (no Ray in here).

    row = shard_row(source, spec, k)          # what a shard is made of (JSON-safe)
    decoded = decode_stage(row, ...)          # CPU: uint8 images [n, V, R, R, 3] + failures
    encoded = EncodeStage(...)(batch)         # GPU/CPU actor: moments, tokens, cls
    summary = write_stage(encoded, root=...)  # CPU: the whole shard, then its done marker

pipeline/job.py wires them into a Ray Data pipeline; tests call them directly too.
"""

from __future__ import annotations

import collections
import json
import socket
import time
from dataclasses import asdict
from typing import Any

import numpy as np

from cache import CacheSpec, CacheWriter
from cache.format import read_done_marker

from .encoders import Encoder, build_teacher, build_vae, weights_sha256
from .preprocess import decode_items
from .sources import Item, Source


def build_models(vae: str, teacher: str, *, resolution: int, teacher_weights: str | None,
                 random_weights: bool, seed: int, random_teacher: bool = False):
    """The VAE and the teacher; `random_teacher` makes only the teacher random-init."""
    return (build_vae(vae, random_weights=random_weights, seed=seed),
            build_teacher(teacher, resolution=resolution, weights=teacher_weights,
                          random_weights=random_weights or random_teacher, seed=seed))


def shard_row(source: Source, spec: CacheSpec, shard: int) -> dict[str, Any]:
    start, stop = spec.shard_range(shard)
    items = source.items[start:stop]
    return {"shard": shard, "items": json.dumps([list(asdict(it).values()) for it in items])}


def decode_stage(row: dict[str, Any], *, resolution: int, views: int) -> dict[str, Any]:
    items = [Item(*fields) for fields in json.loads(row["items"])]
    images, failures = decode_items(items, resolution, views)
    return {"shard": int(row["shard"]), "images": images,
            "keys": json.dumps([it.key for it in items]),
            "labels": np.array([it.label for it in items], dtype=np.int64),
            "failures": json.dumps(failures)}


class EncodeStage:
    """One per GPU (or CPU encoder): loads the models once, checks they are the weights the
    driver planned with, then encodes whole shards. `device` is decided by the driver
    (an actor that asked for no GPU may still see one: Ray no longer hides them)."""

    def __init__(self, models: dict[str, Any], hashes: dict[str, str], *, device: str,
                 precision: str, batch_size: int, threads: int, resolution: int,
                 compile: bool = False, attn_blocks: tuple[int, ...] = ()):
        import torch
        if device == "cpu":
            torch.set_num_threads(threads)  # fixed: CPU results depend on the thread count
        elif not torch.cuda.is_available():
            raise RuntimeError(f"encoder on {socket.gethostname()} was given a GPU but "
                               "torch sees none (CUDA_VISIBLE_DEVICES, drivers?)")
        vae, teacher = build_models(resolution=resolution, **models)
        got = {"vae": weights_sha256(vae), "teacher": weights_sha256(teacher)}
        if got != hashes:
            raise RuntimeError(
                f"encoder on {socket.gethostname()} loaded other weights than the driver "
                f"({got} vs {hashes}): give every node the same HF cache or local paths")
        self.encoder = Encoder(vae, teacher, resolution=resolution, device=device,
                               precision=precision, batch_size=batch_size, compile=compile,
                               attn_blocks=attn_blocks)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = collections.defaultdict(list)
        for i in range(len(batch["shard"])):
            failures = {int(k): v for k, v in json.loads(str(batch["failures"][i])).items()}
            t0 = time.perf_counter()
            enc = self.encoder.encode_shard(np.asarray(batch["images"][i]), set(failures))
            for name, a in enc.items():
                out[name].append(a)
            out["encode_seconds"].append(time.perf_counter() - t0)
            for name in ("shard", "keys", "labels", "failures"):
                out[name].append(batch[name][i])
        # one shard per call in practice: [None] adds the batch axis without a 400 MB copy
        return {k: (np.asarray(v[0])[None] if len(v) == 1 else np.stack(v))
                if k not in ("keys", "failures") else np.array(v) for k, v in out.items()}


def write_stage(row: dict[str, Any], *, root: str) -> dict[str, Any]:
    failures = {int(k): v for k, v in json.loads(str(row["failures"])).items()}
    writer = CacheWriter(root)
    shard = int(row["shard"])
    arrays = {"moments": row["moments"], "tokens": row["tokens"], "cls": row["cls"],
              "label": row["labels"], "key": np.array(json.loads(str(row["keys"])))}
    if "attn_qk" in row:
        arrays["attn_qk"] = row["attn_qk"]
    writer.write_shard(shard, arrays, failures)
    markers = [read_done_marker(root, b, shard) or {} for b in writer.spec.backends]
    return {"shard": shard, "images": len(row["labels"]), "failed": len(failures),
            "bytes": sum(f["bytes"] for mk in markers for f in mk.get("files", {}).values()),
            "encode_seconds": float(row["encode_seconds"]),
            "failures": json.dumps(markers[0].get("failures", []))}
