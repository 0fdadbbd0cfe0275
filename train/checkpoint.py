"""Our checkpoints: finding, writing, reading and checking them, a run's checkpoint
(save, choose, resume), model.init_from; read_checkpoint reads ours or a REPA-family
file (train/repa_format.py).

Ours (written by `train run`, or by `train convert` from a REPA-family file):

    step_00400000/
      checkpoint.json        arch, flat config, latent scale, the cache's VAE, step, and
                             "files": which file holds the EMA and which the trained model;
                             train run adds the layout version, the process count, the
                             step and loader position ("train"), AdamW's param groups, the
                             fp16 scaler and "contents": every other file's bytes and sha256
      model.safetensors      the trained student: "net.*" (backbone), "projector.*"
      ema.safetensors        the EMA backbone
      optimizer.safetensors  train run only: AdamW's tensors, "state.<i>.<name>"
      rng_<process>.json     train run only: each process's Python, numpy, torch (CPU and
                             CUDA) generator states

checkpoint.json is written last, and a run's checkpoint is built under .tmp_step_N and
renamed into place, so a step_N directory is complete when written; `incomplete` checks
that it still is (files present, sizes and hashes as listed) before a run resumes from it.
Nothing in a run directory is ever unpickled: the files above are read with safetensors
and json only, and a checkpoint of the earlier pickled layout (accelerate's
custom_checkpoint_N.pkl, random_states_N.pkl, optimizer.bin) is refused unread.

A REPA-family file (the .pt of REPA's or HASTE's train.py) is read and written by
train/repa_format.py, its names mapped to ours there; read_checkpoint and
convert_checkpoint dispatch to it. Every name, number and tensor read from a checkpoint
is checked before use.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from cache.format import atomic_write_json, json_bytes
from cache.store import NotRegularFileError, file_kind, open_regular

from .config import ConfigError
from .models import ARCHS, build_model
from .settings import CHECKPOINT_FORMATS

CKPT_RE = re.compile(r"^step_(\d{8})$")
# the weights `train sample` reads, as train run names them (a converted checkpoint
# lists its own in checkpoint.json "files")
CHECKPOINT_FILES = {"model": "model.safetensors", "ema": "ema.safetensors"}
OPTIMIZER_FILE = "optimizer.safetensors"
# a run's checkpoint directory: 2 = the files above + rng_N.json + checkpoint.json
# "contents"; 1 (no "layout" key) was accelerate's save_state, pickles included
RUN_LAYOUT = 2
PICKLED = ("custom_checkpoint_*.pkl", "random_states_*.pkl", "optimizer*.bin", "scaler.pt")
FORMATS = CHECKPOINT_FORMATS
WEIGHTS = ("ema", "model")
# what a model's shape may be, whatever a file says (a 4096 px image has a 512 latent)
GEOMETRY_LIMITS = {"latent_size": (1, 512), "in_channels": (1, 64), "num_classes": (1, 100_000)}
# checkpoint.json's "processes": more than any run has (a node count x GPUs), few enough
# that listing the rng_N.json names costs nothing
MAX_PROCESSES = 65536
# checkpoint.json and rng_N.json are read whole: a 65536-process checkpoint.json is a few
# MiB, an rng file ~20 KiB; anything larger is not one of ours
JSON_CAP = 64 << 20
# the dtypes a checkpoint's tensors may have (what training and sampling compute in)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the keys."""


@dataclass
class Checkpoint:
    """What any checkpoint gives: the architecture, the metadata `train sample` needs (as
    checkpoint.json records it), the backbone's state dicts in our names ("ema" and/or
    "model", those it has) and the projector's, when present."""
    path: Path
    format: str
    arch: str
    meta: dict[str, Any]
    states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    projector: dict[str, torch.Tensor] | None = None
    available: tuple[str, ...] = WEIGHTS     # the backbone weights the file holds

    @property
    def step(self) -> int | None:
        step = self.meta.get("step")
        return step if type(step) is int else None

    def model_kwargs(self) -> dict[str, int]:
        c = self.meta["config"]
        return {k: c[f"model.{k}"] for k in GEOMETRY_LIMITS}

    def method(self):
        """The recipe the checkpoint was trained with (train/methods/; a REPA-family file's
        is REPA), which says what the backbone has besides the SiT."""
        from .methods import method_from_config
        try:
            return method_from_config(self.meta["config"])
        except (ValueError, TypeError) as e:   # ConfigError is a ValueError
            raise CheckpointError(f"{self.path}: its config's method does not load: "
                                  f"{str(e)[:300]}") from None

    def state(self, weights: str) -> dict[str, torch.Tensor]:
        if weights not in self.states:
            raise CheckpointError(f"{self.path} holds no {weights!r} weights (it has "
                                  f"{list(self.available)}); choose --weights "
                                  + " or ".join(self.available))
        return self.states[weights]


# ------------------------------------------------------------------------ finding them
def checkpoints(run_dir: Path) -> list[Path]:
    """A run's checkpoint directories (step_N), oldest first. Each was complete when
    written; `newest_complete` checks that it still is."""
    d = Path(run_dir) / "checkpoints"
    return sorted(p for p in d.iterdir() if CKPT_RE.match(p.name)) if d.is_dir() else []


def rng_file(process: int) -> str:
    return f"rng_{process}.json"


def write_file(path: Path, data: bytes) -> dict[str, Any]:
    """`data` as the new file `path`, flushed to disk; returns its checkpoint.json
    "contents" entry {"bytes", "sha256"}. All of a run checkpoint's bytes pass through
    the os.write here (ENOSPC and the like surface as OSError naming the file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:  # os.write may write less than asked; 64 MiB per call
            view = view[os.write(fd, view[: 1 << 26]):]
        os.fsync(fd)
    except OSError as e:
        if e.filename is None:  # os.write does not name the file
            e.filename = str(path)
        raise
    finally:
        os.close(fd)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _regular(path: Path) -> os.stat_result:
    """os.lstat of a file of one of our checkpoints, which must be a regular file: a
    symlink (to /dev/zero, say), a FIFO or a device would be read forever or block.
    Raises FileNotFoundError when absent, CheckpointError when not regular."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path} is {file_kind(st.st_mode)}, not a regular file: a "
                              "checkpoint holds only regular files; copy the real file there")
    return st


def _open_regular(path: Path):
    """`path` opened for reading, not following a symlink (checked by _regular first;
    open_regular judges again what it opened)."""
    _regular(path)
    try:
        return open_regular(path)
    except NotRegularFileError as e:
        raise CheckpointError(f"{path} is {e.strerror}: a checkpoint holds only regular "
                              "files; copy the real file there") from None


def read_json(path: Path, cap: int = JSON_CAP) -> Any:
    """A JSON file of a checkpoint (checkpoint.json, rng_N.json): a regular file of at
    most `cap` bytes. Raises FileNotFoundError, CheckpointError (not regular, too large,
    unreadable, not JSON)."""
    try:
        with _open_regular(path) as f:
            data = f.read(cap + 1)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CheckpointError(f"{path} is unreadable ({e.strerror or e})") from None
    if len(data) > cap:
        raise CheckpointError(f"{path} is over {cap >> 20} MiB, more than a checkpoint's "
                              "JSON ever holds: not one of ours, or damaged")
    try:
        return json.loads(data)
    except ValueError as e:  # JSON or UTF-8 decoding
        raise CheckpointError(f"{path} is not valid JSON ({type(e).__name__}: "
                              f"{str(e)[:100]}): damaged") from None


def _sha256(path: Path, *, regular: bool = True) -> str:
    """SHA-256 of a file; `regular`: refuse links, FIFOs and devices (a run directory's
    files), else follow links (a REPA-family file in a hub cache is one)."""
    digest = hashlib.sha256()
    with _open_regular(path) if regular else path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _plain_name(name: Any) -> bool:
    """A file name inside the checkpoint directory (no path, no leading dot)."""
    return isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name) is not None


def _old_layout(ckpt: Path, meta: Any) -> str | None:
    """Why `ckpt` is of the earlier pickled layout (its checkpoint.json `meta` has no
    layout version, and pickles lie beside it or its "files" names one), or None."""
    if isinstance(meta, dict) and "layout" in meta:
        return None   # ours; a stray pickle beside it is never read
    files = meta.get("files") if isinstance(meta, dict) else None
    listed = [v for v in files.values() if isinstance(v, str)] if isinstance(files, dict) else []
    unsafe = (sorted(p.name for pattern in PICKLED for p in ckpt.glob(pattern))
              or [v for v in listed if not v.endswith(".safetensors")])
    if unsafe:
        return ("written by an earlier version of train run, which kept the EMA, optimizer "
                f"and random states as pickles ({', '.join(unsafe[:3])}); this "
                "version never unpickles a run's files, so it cannot resume or sample from "
                "it. Finish or sample that run with the version that wrote it, or start a "
                "new run_dir")
    return None


def incomplete(ckpt: Path, hashes: bool = True) -> str | None:
    """Why a run's checkpoint `ckpt` cannot be resumed from (e.g. "optimizer.safetensors
    missing"), or None when its checkpoint.json parses and lists the files of the layout
    and each is there with the recorded size (and sha256, when `hashes`)."""
    try:
        meta = read_json(ckpt / "checkpoint.json")
    except FileNotFoundError:
        return _old_layout(ckpt, None) or "checkpoint.json missing"
    except CheckpointError as e:
        return str(e).replace(f"{ckpt / 'checkpoint.json'}", "checkpoint.json", 1)
    if not isinstance(meta, dict):
        return f"checkpoint.json holds a {type(meta).__name__}, not an object"
    old = _old_layout(ckpt, meta)
    if old:
        return old
    if meta.get("layout") != RUN_LAYOUT:
        return (f"checkpoint.json: layout {str(meta.get('layout'))[:20]!r}; this version "
                f"reads layout {RUN_LAYOUT}")
    contents, processes = meta.get("contents"), meta.get("processes")
    if type(processes) is not int or not 1 <= processes <= MAX_PROCESSES:
        return (f"checkpoint.json: processes={str(processes)[:20]} is not an integer in "
                f"[1, {MAX_PROCESSES}]: damaged")
    if not (isinstance(contents, dict)
            and all(_plain_name(n) and isinstance(r, dict) and type(r.get("bytes")) is int
                    and isinstance(r.get("sha256"), str) for n, r in contents.items())):
        return "checkpoint.json: no valid contents list or process count"
    need = [*CHECKPOINT_FILES.values(), OPTIMIZER_FILE, *map(rng_file, range(processes))]
    unlisted = [n for n in need if n not in contents]
    if unlisted:
        return f"checkpoint.json does not list {', '.join(unlisted)}"
    for name, rec in contents.items():
        try:
            size = _regular(ckpt / name).st_size
        except FileNotFoundError:
            return f"{name} missing"
        except CheckpointError:
            return f"{name} is not a regular file (a symlink, FIFO or device)"
        except OSError as e:
            return f"{name} unreadable ({e.strerror})"
        if size != rec["bytes"]:
            return f"{name} has {size} bytes, checkpoint.json records {rec['bytes']}"
    for name, rec in contents.items() if hashes else ():
        try:
            if _sha256(ckpt / name) != rec["sha256"]:
                return f"{name} differs from its recorded sha256 (damaged)"
        except CheckpointError:   # replaced since the size check
            return f"{name} is not a regular file (a symlink, FIFO or device)"
        except OSError as e:
            return f"{name} unreadable ({e.strerror})"
    return None


def newest_complete(run_dir: Path, hashes: bool = True
                    ) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest checkpoint of the run that `incomplete` passes, or None; the newer
    ones it skipped, each with the reason)."""
    skipped = []
    for ckpt in reversed(checkpoints(run_dir)):
        why = incomplete(ckpt, hashes)
        if why is None:
            return ckpt, skipped
        skipped.append((ckpt, why))
    return None, skipped


def resolve_checkpoint(path: str | Path, fmt: str = "auto") -> tuple[Path, str]:
    """(checkpoint, format) of a run directory (its newest complete checkpoint, by the
    sizes checkpoint.json lists), one of our checkpoint directories, or a REPA-family
    file."""
    if fmt not in FORMATS:
        raise CheckpointError(f"checkpoint format {fmt!r}: choose one of {FORMATS}")
    p = Path(path)
    if p.is_file():
        if fmt == "ours":
            raise CheckpointError(f"{p} is a file; our checkpoints are directories (with "
                                  "checkpoint.json). For a REPA-family file use "
                                  "--checkpoint-format repa (or auto)")
        return p, "repa"
    if fmt == "repa":
        raise CheckpointError(f"{p} is not a file: a REPA-family checkpoint is one .pt file")
    if os.path.lexists(p / "checkpoint.json"):   # _read_meta refuses a link or a FIFO
        return p, "ours"
    found, skipped = newest_complete(p, hashes=False)   # the weights are checked on reading
    if found:
        return found, "ours"
    if skipped:
        raise CheckpointError(f"{p} has no complete checkpoint: "
                              + "; ".join(f"{c.name}: {why}" for c, why in skipped[:3]))
    if p.is_dir() and (p / "checkpoints").is_dir():
        raise CheckpointError(f"{p} has no complete checkpoint yet (train longer, or lower "
                              "checkpoint_every)")
    raise CheckpointError(f"{p} is neither a run directory nor a checkpoint (one with "
                          "checkpoint.json, e.g. RUN_DIR/checkpoints/step_00400000, or a "
                          "REPA-family .pt file)")


def read_checkpoint(path: str | Path, *, fmt: str = "auto", arch: str | None = None,
                    weights: tuple[str, ...] = WEIGHTS) -> Checkpoint:
    """Any checkpoint, with those of the backbone states in `weights` that it has (ours
    reads only their files). `arch` forces the architecture of a REPA-family file
    (default: from its shapes); for ours it must equal the recorded one."""
    from .repa_format import _read_repa   # it imports this module
    p, fmt = resolve_checkpoint(path, fmt)
    ck = _read_ours(p, weights) if fmt == "ours" else _read_repa(p, arch, weights)
    if arch is not None and arch != ck.arch:
        raise CheckpointError(f"{p} holds a {ck.arch} model, not {arch}")
    return ck


def load_backbone(path: str | Path, *, weights: str = "ema", fmt: str = "auto",
                  arch: str | None = None) -> tuple[torch.nn.Module, Checkpoint]:
    """The backbone, with what its method adds (ck.method()), and its EMA (or trained)
    weights, in eval mode on the CPU."""
    ck = read_checkpoint(path, fmt=fmt, arch=arch, weights=(weights,))
    method, state = ck.method(), ck.state(weights)
    # the recorded config sizes the method's parts (REG's CLS embedder: align.teacher_dim):
    # the weights' shapes are checked against them on the meta device, before any memory
    problems = _key_problems(_expected(ck.arch, ck.model_kwargs(), method), _shapes(state))
    if problems:
        raise CheckpointError(f"{ck.path} ({weights} weights) does not fit the model its "
                              f"config records ({ck.arch} with the parts of "
                              f"align.method={method.name}):\n  " + "\n  ".join(problems))
    net = build_model(ck.arch, **ck.model_kwargs())
    method.extend(net)
    load_strict(net, state, f"{ck.path} ({weights} weights)")
    return net.eval().requires_grad_(False), ck


# ------------------------------------------------------------------------ checks
def _check_geometry(geo: dict[str, Any], where: str) -> None:
    for k, (lo, hi) in GEOMETRY_LIMITS.items():
        v = geo.get(k)
        if type(v) is not int or not lo <= v <= hi:
            raise CheckpointError(f"{where}: model.{k}={v!r} is not an integer in "
                                  f"[{lo}, {hi}]")


def _check_tensors(state: Any, where: str) -> dict[str, torch.Tensor]:
    """A state dict of finite, dense tensors with string names, each of FLOAT_DTYPES
    (float8 and other dtypes cannot even be checked for NaN)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} is a {type(state).__name__}, not a state dict")
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{where}: entry {str(k)[:80]!r} is not a named tensor")
        if v.layout != torch.strided or v.is_meta or v.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{where}: {k} is a {v.layout} {v.dtype} tensor on "
                                  f"{v.device}, not dense float16, bfloat16, float32 or "
                                  "float64 weights: not a checkpoint of ours, or damaged")
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{where}: {len(bad)} tensor(s) hold NaN or Inf, e.g. "
                              f"{', '.join(bad[:5])}: the run diverged or the file is damaged")
    return state


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _expected(arch: str, geo: dict[str, int], method=None) -> dict[str, tuple]:
    """The state dict shapes of `arch` at that geometry, with what `method` adds to it,
    built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        net = build_model(arch, **geo)
        if method is not None:
            method.extend(net)
        return _shapes(net.state_dict())


def _key_problems(expected: dict[str, tuple], found: dict[str, tuple], name=lambda k: k,
                  limit: int = 8) -> list[str]:
    """Lines naming (via `name`) the missing, unexpected and misshapen keys."""
    missing = [name(k) for k in expected if k not in found]
    unexpected = [name(k) for k in found if k not in expected]
    shapes = [f"{name(k)}: checkpoint {list(found[k])} vs model {list(s)}"
              for k, s in expected.items() if k in found and found[k] != s]
    out = []
    for label, keys in (("missing", missing), ("unexpected", unexpected),
                        ("wrong shape", shapes)):
        if keys:
            more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
            out.append(f"{label} ({len(keys)}): " + ", ".join(keys[:limit]) + more)
    return out


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict that names every missing, unexpected and misshapen key."""
    problems = _key_problems(_shapes(module.state_dict()), _shapes(state))
    if problems:
        raise CheckpointError(f"{what} does not fit the model:\n  " + "\n  ".join(problems))
    module.load_state_dict(state)


# ------------------------------------------------------------------------ ours
def _file_name(meta: dict, files: dict, key: str, ckpt: Path) -> Path:
    """The file files[key] of the checkpoint: a plain .safetensors name (our directories
    hold no other weights), of the size checkpoint.json records when it lists it."""
    name = files.get(key)
    if not _plain_name(name) or not name.endswith(".safetensors"):
        raise CheckpointError(f"{ckpt}/checkpoint.json: files.{key}={name!r} is not a plain "
                              ".safetensors file name in the checkpoint")
    path = ckpt / name
    contents = meta.get("contents")                   # train run's checkpoints list sizes
    listed = contents.get(name) if isinstance(contents, dict) else None
    try:
        size = _regular(path).st_size
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete") from None
    if isinstance(listed, dict) and size is not None and size != listed.get("bytes"):
        raise CheckpointError(f"{path} has {size} bytes, checkpoint.json records "
                              f"{listed.get('bytes')}: the checkpoint is damaged (truncated?)")
    return path


def _load_tensors(path: Path, ours: bool = True) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, checked (dense, floating point, finite). A file of
    our checkpoints (`ours`) must be a regular file, not a link; a file the user names
    may be a link (a hub cache's blobs are) to a regular file."""
    from safetensors.torch import load_file
    if path.suffix != ".safetensors":   # never torch.load: that would unpickle
        raise CheckpointError(f"{path}: only .safetensors files are read here")
    try:
        if ours:
            _regular(path)   # a link, FIFO or device is refused before it is opened
    except FileNotFoundError:
        pass                 # named below
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    try:
        state = load_file(path)
    except Exception as e:  # SafetensorError: truncated, not a safetensors file
        raise CheckpointError(f"{path}: not a readable safetensors file "
                              f"({str(e)[:200]}); copy it again") from None
    return _check_tensors(state, str(path))


def _read_meta(ckpt: Path) -> dict[str, Any]:
    """checkpoint.json of one of our checkpoints; the earlier pickled layout is refused."""
    try:
        meta = read_json(ckpt / "checkpoint.json")
    except (OSError, CheckpointError) as e:
        meta = e
    old = _old_layout(ckpt, meta if isinstance(meta, dict) else None)
    if old:
        raise CheckpointError(f"{ckpt}: {old}")
    if isinstance(meta, CheckpointError):
        raise meta
    if isinstance(meta, Exception):
        raise CheckpointError(f"{ckpt}/checkpoint.json is damaged ({type(meta).__name__}: "
                              f"{str(meta)[:200]})")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{ckpt}/checkpoint.json holds a {type(meta).__name__}, not an "
                              "object: the checkpoint is damaged")
    return meta


def _number(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _check_sampling_meta(meta: dict[str, Any], where: str) -> None:
    """The fields of checkpoint.json that `train sample` uses besides the geometry: a
    finite positive latent_scale, a label_dropout in [0, 1] when recorded, a cache record
    that is a mapping (its VAE config is checked where it is used: train/vae.py)."""
    scale, config, cache = meta.get("latent_scale"), meta["config"], meta.get("cache", {})
    if not (_number(scale) and scale > 0):
        raise CheckpointError(f"{where}: latent_scale={repr(scale)[:40]} is not a finite "
                              "positive number (the VAE latents' scale, e.g. 0.18215): "
                              "damaged")
    dropout = config.get("model.label_dropout", 0.1)
    if not (_number(dropout) and 0 <= dropout <= 1):
        raise CheckpointError(f"{where}: config model.label_dropout={repr(dropout)[:40]} is "
                              "not a number in [0, 1]: damaged")
    vae = cache.get("vae", {}) if isinstance(cache, dict) else None
    if not isinstance(cache, dict) or not isinstance(vae, dict):
        raise CheckpointError(f"{where}: cache={str(cache)[:60]} is not a mapping with a "
                              "mapping \"vae\" (the training cache's record): damaged")


def _read_ours(ckpt: Path, weights: tuple[str, ...]) -> Checkpoint:
    meta = _read_meta(ckpt)
    try:
        arch, files = meta["arch"], meta.get("files", CHECKPOINT_FILES)
        _check_geometry({k: meta["config"][f"model.{k}"] for k in GEOMETRY_LIMITS}, str(ckpt))
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt}/checkpoint.json is damaged ({type(e).__name__}: "
                              f"{e})") from None
    if not isinstance(arch, str) or arch not in ARCHS:
        raise CheckpointError(f"{ckpt}: unknown architecture {arch!r} (known: "
                              f"{sorted(ARCHS)})")
    if not isinstance(files, dict):
        raise CheckpointError(f"{ckpt}/checkpoint.json: files is not a mapping")
    _check_sampling_meta(meta, f"{ckpt}/checkpoint.json")
    ck = Checkpoint(ckpt, "ours", arch, meta,
                    available=tuple(w for w in WEIGHTS if w in files))
    if "ema" in weights and "ema" in files:
        ck.states["ema"] = _load_tensors(_file_name(meta, files, "ema", ckpt))
    if "model" in weights:  # the trained student ("module.": files of the earlier layout)
        student = {}
        for key in ("model", "projector"):
            if key in files:
                student.update({k.removeprefix("module."): v for k, v in
                                _load_tensors(_file_name(meta, files, key, ckpt)).items()})
        if "model" in files:
            ck.states["model"] = {k[4:]: v for k, v in student.items() if k.startswith("net.")}
        ck.projector = {k[10:]: v for k, v in student.items()
                        if k.startswith("projector.")} or None
    return ck


@dataclass
class RunCheckpoint:
    """What `train run` resumes from, read with safetensors and json only."""
    path: Path
    meta: dict[str, Any]                 # checkpoint.json
    student: dict[str, torch.Tensor]     # "net.*", "projector.*"
    ema: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]   # "state.<i>.<name>" (train/state.py)
    rng: Any                             # this process's rng_N.json


def read_run_checkpoint(ckpt: Path, process: int, processes: int) -> RunCheckpoint:
    """The files of a run checkpoint that `incomplete` passed, for process `process` of
    `processes` (which must be as many as wrote it)."""
    meta = _read_meta(ckpt)
    if meta.get("processes") != processes:
        raise CheckpointError(f"{ckpt} was written by {meta.get('processes')} process(es) and "
                              f"this run has {processes}: resume with "
                              f"{meta.get('processes')} (each process has its own random and "
                              "data-loader state)")
    path = ckpt / rng_file(process)
    try:
        rng = read_json(path)
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {str(e)[:200]})") from None
    return RunCheckpoint(ckpt, meta, _load_tensors(ckpt / CHECKPOINT_FILES["model"]),
                         _load_tensors(ckpt / CHECKPOINT_FILES["ema"]),
                         _load_tensors(ckpt / OPTIMIZER_FILE), rng)


def write_checkpoint(out: Path, ck: Checkpoint, source: dict[str, Any]) -> Path:
    """`ck` in our layout at `out` (which must not exist yet): checkpoint.json,
    ema.safetensors (its EMA), model.safetensors (its trained weights and projector) or
    projector.safetensors (a projector without trained weights), each only if it has
    them. Written beside `out`, renamed into place."""
    from safetensors.torch import save_file
    if out.exists():
        raise CheckpointError(f"{out} exists; choose a new output directory")
    if CKPT_RE.match(out.name):  # a run would resume from it, and it cannot
        raise CheckpointError(f"{out}: a converted checkpoint has no optimizer or RNG state, "
                              "so it must not be named like a run's step_N; name it "
                              "otherwise and start a run from it with model.init_from")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    files = {}
    try:
        tmp.mkdir(parents=True)
        if "ema" in ck.states:
            files["ema"] = "ema.safetensors"
            save_file({k: v.contiguous() for k, v in ck.states["ema"].items()},
                      tmp / files["ema"])
        student = {f"net.{k}": v for k, v in ck.states.get("model", {}).items()}
        student.update({f"projector.{k}": v for k, v in (ck.projector or {}).items()})
        if student:
            key = "model" if "model" in ck.states else "projector"
            files[key] = f"{key}.safetensors"
            save_file({k: v.contiguous() for k, v in student.items()}, tmp / files[key])
        atomic_write_json(tmp / "checkpoint.json",
                          {**ck.meta, "arch": ck.arch, "files": files, "converted_from": source})
        os.replace(tmp, out)
    except OSError as e:
        raise CheckpointError(f"cannot write {out}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # gone after a failure or an interrupt
    return out


def convert_checkpoint(source: str | Path, out: str | Path, *, arch: str | None = None
                       ) -> tuple[Path, Checkpoint]:
    """A REPA-family file -> our layout (a directory), or our SiT checkpoint -> a
    REPA-family file. Returns the output and what was read."""
    from .repa_format import write_repa_file   # it imports this module
    ck = read_checkpoint(source, arch=arch)
    if ck.format == "ours":
        return write_repa_file(Path(out), ck), ck
    origin = {"path": str(ck.path.absolute()), "format": ck.format,
              "sha256": _sha256(ck.path, regular=False), "step": ck.step}
    return write_checkpoint(Path(out), ck, origin), ck


# ------------------------------------------------------------------------ model.init_from
def check_init(source: str | Path, arch: str, method=None, **geometry: int) -> Checkpoint:
    """The checkpoint of `model.init_from`, after checking that its backbone fits the
    run's model (`arch` at `geometry`, with what the run's `method` adds); errors name
    the keys."""
    ck = read_checkpoint(source)
    if ck.arch != arch:
        raise CheckpointError(f"model.init_from={source} holds a {ck.arch} model; this run's "
                              f"model.arch is {arch}")
    expected = _expected(arch, geometry, method)
    for which, state in ck.states.items():
        problems = _key_problems(expected, _shapes(state))
        if problems:
            try:
                theirs = ck.method().name
            except CheckpointError:
                theirs = None
            mine = method.name if method is not None else None
            why = ("model.latent_size, in_channels and num_classes must match"
                   if theirs == mine else
                   f"it was trained with align.method={theirs or 'unknown'}, this run's "
                   f"align.method={mine}: the generators' parts must match, as must "
                   "model.latent_size, in_channels and num_classes")
            raise CheckpointError(f"model.init_from={source} ({which} weights) does not fit "
                                  f"this run's {arch} ({why}):\n  " + "\n  ".join(problems))
    return ck


def init_from_checkpoint(source: str | Path, net: torch.nn.Module, ema: torch.nn.Module,
                         projector: torch.nn.Module | None, arch: str, method=None,
                         **geometry: int) -> str:
    """Load `source` into a new run's modules: the trained weights (else the EMA) into
    `net`, the EMA (else the trained weights) into `ema`, its projector into `projector`
    when the shapes fit. Returns the line that says what was taken."""
    ck = check_init(source, arch, method, **geometry)
    trained = "model" if "model" in ck.states else "ema"
    averaged = "ema" if "ema" in ck.states else "model"
    load_strict(net, ck.states[trained], f"model.init_from={ck.path}")
    load_strict(ema, ck.states[averaged], f"model.init_from={ck.path}")
    note = ""
    if projector is not None:
        fits = ck.projector is not None and not _key_problems(
            _shapes(projector.state_dict()), _shapes(ck.projector))
        if fits:
            projector.load_state_dict(ck.projector)
        note = ("; projector from it" if fits else
                "; projector: new (the checkpoint has " + ("none" if ck.projector is None
                                                         else "one of other shapes") + ")")
    return (f"initialised from {ck.path} ({ck.format} checkpoint, step {ck.step}): weights "
            f"from its {trained} weights, EMA from its {averaged}{note}; the optimizer "
            "starts fresh")


# ------------------------------------------------------------------------ train run's side
def save_run_checkpoint(acc, run_dir: Path, step: int, keep: int, meta: dict, student,
                     ema: torch.nn.Module, opt, state) -> Path:
    """checkpoints/step_N (layout: train/checkpoint.py): each process writes its
    rng_N.json, the main process the weights, the optimizer and, last, checkpoint.json
    listing every file with its size and sha256; built as .tmp_step_N, renamed once
    complete. If a write fails on any process (a full disk), the partial directory is
    removed, nothing older is touched, and every process raises the same CheckpointError."""
    from accelerate.utils import broadcast_object_list, gather_object
    from safetensors.torch import save as safetensors_bytes

    from .state import optimizer_state, rng_state, scaler_state   # state.py reads ours

    root = run_dir / "checkpoints"
    final, tmp = root / f"step_{step:08d}", root / f".tmp_step_{step:08d}"
    if final.exists():
        return final
    main = acc.is_main_process
    contents: dict[str, dict] = {}
    failed: tuple[str, int | None] | None = None

    def put(name: str, data: Callable[[], bytes]) -> None:
        nonlocal failed
        if failed is None:
            try:
                contents[name] = write_file(tmp / name, data())
            except OSError as e:
                failed = (f"{e.strerror or e} ({e.filename or tmp / name})", e.errno)

    def tensors(module) -> bytes:
        sd = module.state_dict()
        return safetensors_bytes({k: v.detach().contiguous() for k, v in sd.items()})

    if main:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            failed = (f"{e.strerror or e} ({e.filename or tmp})", e.errno)
    acc.wait_for_everyone()
    put(rng_file(acc.process_index), lambda: json.dumps(rng_state()).encode())
    if main:
        opt_tensors, opt_info = optimizer_state(opt)
        put(CHECKPOINT_FILES["model"], lambda: tensors(acc.unwrap_model(student)))
        put(CHECKPOINT_FILES["ema"], lambda: tensors(ema))
        put(OPTIMIZER_FILE, lambda: safetensors_bytes(opt_tensors))
    reports = gather_object([(contents, failed)])
    if main:
        for theirs, error in reports:
            contents.update(theirs)
            failed = failed or error
        record = {**meta, "layout": RUN_LAYOUT, "processes": acc.num_processes,
                  "train": state.state_dict(), "optimizer": opt_info,
                  "scaler": scaler_state(acc.scaler), "contents": dict(contents)}
        put("checkpoint.json", lambda: json_bytes(record))   # last: the sign it is whole
        if failed is None:
            try:
                os.replace(tmp, final)
            except OSError as e:
                failed = (f"{e.strerror or e} (renaming {tmp})", e.errno)
        if failed is None:
            for old in checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    failed = broadcast_object_list([failed])[0]
    if failed:
        kept = checkpoints(run_dir)
        prev = (f"the newest checkpoint, {kept[-1]}, is intact and a rerun resumes from it"
                if kept else "there is no earlier checkpoint: a rerun starts from step 0")
        fix = ("Free disk space" if failed[1] in (errno.ENOSPC, errno.EDQUOT)
               else "Fix this")
        raise CheckpointError(f"cannot write checkpoint {final}: {failed[0]}. Nothing was "
                              f"lost: the partial checkpoint was removed and {prev}. {fix} "
                              "and rerun the same command")
    return final


def choose_checkpoint(acc, run_dir: Path, say: Callable[[str], None]) -> Path | None:
    """The checkpoint every process resumes from: the newest complete one as the main
    process finds it (it checks sizes and hashes once for all). Newer incomplete ones are
    named with the reason and renamed step_N.incomplete, so that the run writes step_N
    anew and never prunes a good checkpoint to keep a damaged one."""
    from accelerate.utils import broadcast_object_list
    root = run_dir / "checkpoints"
    choice = error = None
    if acc.is_main_process:
        for stale in root.glob(".tmp_step_*"):   # an interrupted save: never a checkpoint
            shutil.rmtree(stale, ignore_errors=True)
        found, skipped = newest_complete(run_dir)
        for ckpt, why in skipped:
            say(f"skipping {ckpt.relative_to(run_dir)}: {why}")
        if found is None and skipped:
            error = (f"{root} holds no checkpoint to resume from: "
                     + "; ".join(f"{c.name}: {why}" for c, why in skipped[:3])
                     + ". Restore the files, or move the step_N directories out of "
                     f"{root} to start this run over, or use a new run_dir")
        for ckpt, _ in skipped if found else ():
            aside = ckpt.with_name(f"{ckpt.name}.incomplete")
            n = 1
            while aside.exists():
                n += 1
                aside = ckpt.with_name(f"{ckpt.name}.incomplete{n}")
            try:
                os.replace(ckpt, aside)
                say(f"moved {ckpt.name} to {aside.name}; resuming from {found.name}")
            except OSError as e:   # resuming with it in place would save over it later
                error = (f"cannot rename the incomplete {ckpt} to {aside.name} "
                         f"({e.strerror}); move it out of {root} and rerun")
                break
        choice = found.name if found else None
    choice, error = broadcast_object_list([choice, error])
    if error:
        raise CheckpointError(error)
    found = checkpoints(run_dir)
    mine = found[-1].name if found else None
    if mine != choice:
        raise ConfigError(f"process {acc.process_index} sees checkpoint {mine} in {run_dir}, "
                          f"the main process {choice}: run_dir must be on a filesystem "
                          "shared by every node")
    return root / choice if choice else None


def resume_run(acc, ckpt: Path, student, ema: torch.nn.Module, opt, state) -> None:
    """Load a checkpoint `choose_checkpoint` chose into the modules, the optimizer, the
    scaler, the loader (`state`: the loop's TrainState) and this process's generators
    (safetensors and json only)."""
    from .state import load_optimizer, load_rng, load_scaler
    saved = read_run_checkpoint(ckpt, acc.process_index, acc.num_processes)
    load_strict(acc.unwrap_model(student), saved.student,
                f"{ckpt / CHECKPOINT_FILES['model']}")
    load_strict(ema, saved.ema, f"{ckpt / CHECKPOINT_FILES['ema']}")
    load_optimizer(opt, saved.optimizer, saved.meta.get("optimizer"), f"{ckpt / OPTIMIZER_FILE}")
    load_scaler(acc.scaler, saved.meta.get("scaler"), f"{ckpt}/checkpoint.json")
    where, step = f"{ckpt}/checkpoint.json", int(CKPT_RE.match(ckpt.name).group(1))
    if saved.meta.get("step") != step:
        raise CheckpointError(f"{where}: step={str(saved.meta.get('step'))[:30]} is not the "
                              f"step of its directory ({step}): damaged; move it out of "
                              "checkpoints/ to resume from the previous one")
    state.load_state_dict(saved.meta.get("train"), where, step)
    load_rng(saved.rng, f"{ckpt / rng_file(acc.process_index)}")
