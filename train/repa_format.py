"""The REPA family's checkpoint files: reading one into a Checkpoint (names mapped to
ours, every key and shape checked), and writing our SiT checkpoint as one. Our own
layout, the shared checks and the Checkpoint class are train/checkpoint.py's.

The files (REPA's train.py, HASTE's; the released SiT-XL/2 file): one torch.save'd
dict {"model": state dict, "ema": state dict, "opt", "args": argparse.Namespace, "steps"},
or a bare state dict (taken as the EMA weights). Their SiT is ours parameter for parameter;
the names that differ are written once, in KEY_MAP. `pos_embed`, a frozen parameter there
and a buffer computed from the grid here, is checked against ours and not loaded.
`decoder_blocks.J` (their --legacy files) are blocks.(J + the number of blocks.N).

Only REPA-family files, which a user names explicitly, go through torch.load, and
never as code: weights_only=True, and the only class allowed besides tensors and
containers is argparse.Namespace (their "args"). Every name, number and tensor read
from a checkpoint is checked before use.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any

import torch

from cache.format import LATENT_SCALE, atomic_file
from cache.tensors import RefusedFileError, load_torch_file

from .checkpoint import (GEOMETRY_LIMITS, WEIGHTS, Checkpoint, CheckpointError, _check_geometry,
                         _check_tensors, _expected, _key_problems, _load_tensors, _shapes)
from .models import ARCHS
from .models.sit import SIT_SIZES, SiT, sincos_pos_embed

# REPA / HASTE SiT names <-> ours; {n} is a block index. Everything else has one name.
KEY_MAP: tuple[tuple[str, str], ...] = (
    ("x_embedder.proj.", "x_embedder."),                     # timm PatchEmbed vs a Conv2d
    ("y_embedder.embedding_table.", "y_embedder.table."),    # [num_classes + 1, D]
    ("blocks.{n}.mlp.fc1.", "blocks.{n}.mlp.0."),            # timm Mlp vs nn.Sequential
    ("blocks.{n}.mlp.fc2.", "blocks.{n}.mlp.2."),
    ("projectors.0.", "projector.mlp."),                     # the student's projector
)
PROJECTOR_KEYS = {f"mlp.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}


def _rules(src: int) -> list[tuple[re.Pattern, str]]:
    return [(re.compile("^" + re.escape(pair[src]).replace(r"\{n\}", r"(?P<n>\d{1,4})")),
             pair[1 - src]) for pair in KEY_MAP]


_TO_OURS, _TO_REPA = _rules(0), _rules(1)


def rename(key: str, to: str) -> str:
    """A parameter name in the other layout: to="ours" from REPA's, to="repa" from ours."""
    for pattern, template in _TO_OURS if to == "ours" else _TO_REPA:
        m = pattern.match(key)
        if m:
            return template.format(**m.groupdict()) + key[m.end():]
    return key


def _torch_load(path: Path) -> Any:
    """A REPA-family .pt file, read without running pickled code (REPA's own scripts load
    with pickle); argparse.Namespace is allowed for its `args`."""
    try:
        return load_torch_file(path, allow=[argparse.Namespace], mmap=True)
    except RefusedFileError as e:
        hint = (". If you trust the file, extract its 'ema' and 'model' state dicts yourself "
                "(torch.load(..., weights_only=False)) and torch.save them alone"
                if "Python object" in str(e) else "")
        raise CheckpointError(f"{path}: {e}{hint}") from None


def _blocks(state: dict[str, torch.Tensor]) -> set[int]:
    """The indices N of the keys blocks.N.*"""
    return {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d{1,4})\.", k))}


def _unwrap(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP's "module." and torch.compile's "_orig_mod." when every key has it, and
    renumber --legacy "decoder_blocks.J" after the "blocks.N"."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    first = len(_blocks(state))
    out = {}
    for k, v in state.items():
        m = re.match(r"decoder_blocks\.(\d{1,4})\.", k)
        out[f"blocks.{int(m.group(1)) + first}.{k[m.end():]}" if m else k] = v
    return out


def _geometry(state: dict[str, torch.Tensor], where: str) -> dict[str, int]:
    """dim, depth, patch, in_channels, num_classes and latent_size from a REPA-layout
    SiT's shapes (num_classes: the label table minus its null row)."""
    need = ("x_embedder.proj.weight", "y_embedder.embedding_table.weight", "pos_embed")
    absent = [k for k in need if k not in state]
    if absent:
        raise CheckpointError(f"{where} is not a REPA-layout SiT state dict: no "
                              f"{', '.join(absent)} (its keys begin {sorted(state)[:6]})")
    w, table, pos = (state[k] for k in need)
    grid = math.isqrt(pos.shape[1]) if pos.dim() == 3 else 0
    if (w.dim() != 4 or w.shape[2] != w.shape[3] or min(w.shape) < 1 or table.dim() != 2
            or grid < 1 or grid * grid != pos.shape[1]):
        raise CheckpointError(f"{where}: x_embedder.proj.weight {list(w.shape)}, "
                              f"y_embedder.embedding_table.weight {list(table.shape)} and "
                              f"pos_embed {list(pos.shape)} are not a SiT's shapes")
    blocks = _blocks(state)
    geo = {"dim": w.shape[0], "in_channels": w.shape[1], "patch": w.shape[2],
           "num_classes": table.shape[0] - 1, "latent_size": grid * w.shape[2],
           "depth": max(blocks) + 1 if blocks else 0}
    _check_geometry(geo, where)
    return geo


def _sit_arch(geo: dict[str, int], arch: str | None, where: str) -> str:
    """The SiT size that fits `geo` (its depth, width and patch 2), or `arch` if given."""
    if arch is not None:
        if ARCHS.get(arch, (None,))[0] is not SiT:
            raise CheckpointError(f"--arch {arch}: REPA-family checkpoints are SiT models; "
                                  f"choose one of {sorted(SIT_SIZES)}")
        return arch
    for name, kw in SIT_SIZES.items():
        if kw["depth"] == geo["depth"] and kw["dim"] == geo["dim"] and geo["patch"] == 2:
            return name
    sizes = ", ".join(f"{n} ({kw['depth']} x {kw['dim']})" for n, kw in SIT_SIZES.items())
    raise CheckpointError(f"{where}: a SiT of depth {geo['depth']}, width {geo['dim']} and "
                          f"patch {geo['patch']} is none of ours ({sizes}); pass --arch to "
                          "choose one, or the checkpoint is of another model")


def _read_repa(path: Path, arch: str | None, weights: tuple[str, ...]) -> Checkpoint:
    obj = _load_tensors(path, ours=False) if path.suffix == ".safetensors" else _torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = {"ema": obj}  # a bare state dict: the weights to sample from
    else:
        found = {k: obj[k] for k in WEIGHTS if k in obj}
    if not found:
        raise CheckpointError(f"{path} has no 'ema' or 'model' state dict (top-level keys: "
                              f"{sorted(map(str, obj))[:10]})")
    if not any(w in found for w in weights):
        raise CheckpointError(f"{path} holds no {' or '.join(weights)} weights (it has "
                              f"{sorted(found)}); choose --weights {' or '.join(found)}")
    args = vars(obj["args"]) if isinstance(obj.get("args"), argparse.Namespace) else {}
    args = {k: v for k, v in args.items()
            if isinstance(k, str) and isinstance(v, (str, int, float, bool))}
    if args.get("path_type", "linear") != "linear":
        raise CheckpointError(f"{path} was trained on the {args['path_type']!r} path (its "
                              "args.path_type); our samplers and trainer use the linear path "
                              "x_t = (1 - t) x0 + t eps")
    states, projectors, geo = {}, {}, None
    for which in (w for w in WEIGHTS if w in weights and w in found):
        where = f"{path} ({which})"
        raw = _unwrap(_check_tensors(found[which], where))
        g = _geometry(raw, where)
        if geo is not None and g != geo:
            raise CheckpointError(f"{path}: its ema and model weights differ in shape "
                                  f"({geo} vs {g})")
        geo, arch = g, _sit_arch(g, arch, where)
        states[which], projectors[which] = _import_repa(raw, arch, g, where)
    dropout = args.get("cfg_prob", 0.1)
    step = obj.get("steps")
    meta = {"arch": arch, "step": step if type(step) is int else None,
            "config": {"model.arch": arch, "model.latent_size": geo["latent_size"],
                       "model.in_channels": geo["in_channels"],
                       "model.num_classes": geo["num_classes"],
                       "model.label_dropout": dropout if type(dropout) is float else 0.1,
                       "align.method": "repa", "align.depth": args.get("encoder_depth")},
            "latent_scale": LATENT_SCALE,   # REPA's fixed SD-VAE scale, bias 0
            "cache": {}, "source_args": args}
    projector = projectors.get("model") or projectors.get("ema")   # the trained one first
    return Checkpoint(path, "repa", arch, meta, states, projector, tuple(found))


def _import_repa(state: dict[str, torch.Tensor], arch: str, geo: dict[str, int], where: str
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(backbone, projector) in our names, after checking every key and shape against
    `arch` (errors name the keys as the checkpoint does)."""
    # projectors.1.* and up align to further teachers (REPA's multi-encoder runs): unused
    ours = {rename(k, "ours"): v for k, v in state.items()
            if k != "pos_embed" and not re.match(r"projectors\.[1-9]", k)}
    backbone = {k: v for k, v in ours.items() if not k.startswith("projector.")}
    problems = _key_problems(_expected(arch, {k: geo[k] for k in GEOMETRY_LIMITS}),
                             _shapes(backbone), lambda k: rename(k, "repa"))
    pos = state["pos_embed"]
    want = sincos_pos_embed(geo["dim"], geo["latent_size"] // geo["patch"])[None]
    if not problems and (pos.shape != want.shape
                         or not torch.allclose(pos.float(), want, atol=1e-5)):
        problems.append(f"pos_embed {list(pos.shape)} is not the fixed 2-D sin-cos table of "
                        f"a {geo['latent_size'] // geo['patch']}^2 grid")
    if problems:
        raise CheckpointError(f"{where} does not fit {arch}:\n  " + "\n  ".join(problems))
    projector = {k[len("projector."):]: v for k, v in ours.items() if k.startswith("projector.")}
    return backbone, projector or None


def to_repa_layout(state: dict[str, torch.Tensor], grid: int,
                   projector: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A SiT state dict in our names (and its projector's) as REPA's SiT names them,
    with their pos_embed of a grid x grid token map."""
    out = {rename(k, "repa"): v for k, v in state.items()}
    out["pos_embed"] = sincos_pos_embed(state["x_embedder.weight"].shape[0], grid)[None]
    out.update({rename(f"projector.{k}", "repa"): v for k, v in (projector or {}).items()})
    return out


def write_repa_file(out: Path, ck: Checkpoint) -> Path:
    """Our SiT checkpoint as a REPA-family file {"ema", "model", "steps"} that their
    generate.py loads (it reads "ema" strictly, projectors.0 included), e.g. to check
    parity with their sampler. A run without a projector gets an all-zero 768-wide one,
    their default shape; it plays no part in sampling."""
    if out.exists():
        raise CheckpointError(f"{out} exists; choose a new output file")
    if ARCHS[ck.arch][0] is not SiT:
        raise CheckpointError(f"{ck.path} is a {ck.arch}: only SiT models have a REPA layout")
    method = ck.method()   # refused when the recorded method does not load
    plain = _expected(ck.arch, ck.model_kwargs())
    for which, state in ck.states.items():
        odd = sorted(set(state) ^ set(plain))
        if odd:   # REG's CLS embedder and head, GMem's condition: no REPA name for them
            raise CheckpointError(
                f"{ck.path}: its {which} weights are a SiT with the parts of "
                f"align.method={method.name} ({', '.join(odd[:4])}"
                f"{', ...' if len(odd) > 4 else ''}), which REPA's layout and generate.py "
                "have no place for; sample this checkpoint with `train sample` instead")
    projector = ck.projector
    if projector is not None and set(projector) != PROJECTOR_KEYS:
        raise CheckpointError(f"{ck.path}: the projector's keys {sorted(projector)[:8]} are "
                              "not REPA's 3-layer MLP")
    if not ck.states:
        raise CheckpointError(f"{ck.path} holds no backbone weights")
    dim = next(iter(ck.states.values()))["x_embedder.weight"].shape[0]
    if projector is None:
        shapes = {"mlp.0": (2048, dim), "mlp.2": (2048, 2048), "mlp.4": (768, 2048)}
        projector = {f"{n}.{p}": torch.zeros(s if p == "weight" else s[:1])
                     for n, s in shapes.items() for p in ("weight", "bias")}
    grid = ck.model_kwargs()["latent_size"] // 2
    payload: dict[str, Any] = {"steps": ck.step, "projector_placeholder": ck.projector is None}
    for which, state in ck.states.items():
        payload[which] = to_repa_layout(state, grid, projector)
    try:
        with atomic_file(out) as f:
            torch.save(payload, f)
    except OSError as e:
        raise CheckpointError(f"cannot write {out}: {e}") from None
    return out
