"""What a resume needs besides the weights, as tensors and JSON: AdamW's state, every
random generator of a process, the fp16 loss scaler. Nothing here pickles or unpickles:
`*_state` gives what a checkpoint stores (train/checkpoint.py has the layout), `load_*`
checks what a file holds before any of it is used, and errors name the file and the key.
"""

from __future__ import annotations

import math
import random
import re
from typing import Any

import numpy as np
import torch

from .checkpoint import CheckpointError, _check_tensors

# a JSON value an optimizer's param group may hold (lr, betas, eps, flags, None)
_PLAIN = (type(None), bool, int, float, str)


# ------------------------------------------------------------------------ optimizer
def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, json) of opt.state_dict(): each parameter's tensors (AdamW: step,
    exp_avg, exp_avg_sq) named "state.<i>.<name>", its other values and the param groups
    (tuples become lists) in the JSON part."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for i, per_param in sd["state"].items():
        for name, v in per_param.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{i}.{name}"] = v.detach().contiguous()
            else:
                scalars.setdefault(str(i), {})[name] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _same_kind(saved: Any, live: Any) -> bool:
    """A JSON value stands for a live param-group value: the same type (a finite int or
    float for a float, a list of as many for a tuple or list), None for None."""
    if isinstance(live, (tuple, list)):
        return (isinstance(saved, list) and len(saved) == len(live)
                and all(_same_kind(s, v) for s, v in zip(saved, live)))
    if type(live) is float:
        return type(saved) in (int, float) and math.isfinite(saved)
    return type(saved) is type(live)


def _adamw_names(group: dict[str, Any]) -> set[str]:
    """The tensors AdamW keeps per parameter of a group."""
    names = {"step", "exp_avg", "exp_avg_sq"}
    return names | {"max_exp_avg_sq"} if group.get("amsgrad") else names


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                   info: Any, where: str) -> None:
    """Load optimizer_state()'s two parts into `opt` (accelerate's wrapper or a plain
    AdamW), after checking them against it: the same groups with the same parameter
    indices and every hyperparameter the live group has, of its type (nothing more); per
    parameter exactly AdamW's tensors (a 0-dim `step`, `exp_avg` and `exp_avg_sq` of the
    parameter's shape, `max_exp_avg_sq` too with amsgrad), all floating point, and no
    plain values (AdamW keeps none)."""
    live = opt.state_dict()["param_groups"]
    params = [p for g in opt.param_groups for p in g["params"]]
    groups = info.get("param_groups") if isinstance(info, dict) else None
    scalars = info.get("scalars", {}) if isinstance(info, dict) else None
    if not isinstance(groups, list) or len(groups) != len(live) or not isinstance(scalars, dict):
        raise CheckpointError(f"{where}: the optimizer's param_groups/scalars are not "
                              f"{len(live)} group(s) as this run has; the file is damaged")
    restored, names = [], {}
    for k, (saved, mine) in enumerate(zip(groups, live)):
        if not isinstance(saved, dict) or saved.get("params") != mine["params"]:
            raise CheckpointError(f"{where}: param group {k} holds other parameters than "
                                  "this run's optimizer (a different model or projector?)")
        bad = [n for n, v in saved.items() if n != "params" and not (
            isinstance(v, _PLAIN) or isinstance(v, list) and all(isinstance(x, _PLAIN) for x in v))]
        if bad:
            raise CheckpointError(f"{where}: param group {k}: {bad[:5]} are not plain values")
        missing = sorted(n for n in mine if n not in saved)
        extra = sorted(str(n)[:30] for n in saved if n not in mine)
        wrong = sorted(f"{n}={repr(saved[n])[:20]}" for n in mine if n in saved
                       and n != "params" and not _same_kind(saved[n], mine[n]))
        if missing or extra or wrong:
            raise CheckpointError(
                f"{where}: param group {k} does not match this run's AdamW: "
                + "; ".join(f"{label} {keys[:5]}" for label, keys in (
                    ("missing", missing), ("unknown", extra), ("of another type", wrong))
                    if keys) + ": the file is damaged")
        # JSON has no tuples; AdamW takes betas either way, but keep the live types
        restored.append({n: tuple(v) if isinstance(mine.get(n), tuple) else v
                         for n, v in saved.items()})
        names.update({i: _adamw_names(mine) for i in mine["params"]})
    if scalars:
        i, values = next(iter(scalars.items()))
        raise CheckpointError(f"{where}: scalars[{str(i)[:20]!r}] = {str(values)[:40]}: AdamW "
                              "keeps no plain per-parameter values (its state is tensors): "
                              "the file is damaged")
    per_param: dict[int, dict[str, Any]] = {}
    _check_tensors(tensors, where)
    for key, v in tensors.items():
        m = re.fullmatch(r"state\.(\d{1,9})\.(\w{1,64})", key)
        i = int(m.group(1)) if m else -1
        if not 0 <= i < len(params):
            raise CheckpointError(f"{where}: {key!r} names no parameter of this run's "
                                  f"optimizer (it has {len(params)})")
        if m.group(2) not in names.get(i, ()):
            raise CheckpointError(f"{where}: {key!r} is none of AdamW's state "
                                  f"({sorted(names.get(i, ()))})")
        if m.group(2) == "step" and v.dim():
            raise CheckpointError(f"{where}: {key} is {list(v.shape)}, not a 0-dim step count")
        if m.group(2) != "step" and v.shape != params[i].shape:
            raise CheckpointError(f"{where}: {key} is {list(v.shape)}, its parameter "
                                  f"{list(params[i].shape)}")
        if m.group(2) == "step" and not (v >= 0 and v == v.round()):
            raise CheckpointError(f"{where}: {key}={v.item()} is not a step count")
        per_param.setdefault(i, {})[m.group(2)] = v
    for i, values in per_param.items():   # a parameter has all of its state or none
        absent = sorted(names[i] - set(values))
        if absent:
            raise CheckpointError(f"{where}: parameter {i} has {sorted(values)} but not "
                                  f"{absent} of AdamW's state: the file is damaged")
    opt.load_state_dict({"state": per_param, "param_groups": restored})


# ------------------------------------------------------------------------ random generators
def rng_state() -> dict[str, Any]:
    """This process's generators as JSON: Python's random (a version, 625 ints and the
    cached gauss), numpy's legacy global MT19937 (name, 624 uint32 keys, position, cached
    gaussian), torch's CPU generator and, when CUDA is present, each device's (their
    byte strings in hex)."""
    version, mt, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    out = {"python": {"version": version, "state": list(mt), "gauss_next": gauss_next},
           "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos),
                     "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
           "torch": torch.get_rng_state().numpy().tobytes().hex()}
    if torch.cuda.is_available():
        out["cuda"] = [s.numpy().tobytes().hex() for s in torch.cuda.get_rng_state_all()]
    return out


def _words(v: Any, n: int) -> bool:
    """v is a list of n ints in [0, 2^32)"""
    return (isinstance(v, list) and len(v) == n
            and all(type(x) is int and 0 <= x < 2 ** 32 for x in v))


def _bytes(v: Any, n: int) -> torch.Tensor | None:
    """A hex string of n bytes as a uint8 tensor, else None."""
    if not isinstance(v, str) or len(v) != 2 * n:
        return None
    try:
        return torch.frombuffer(bytearray.fromhex(v), dtype=torch.uint8)
    except ValueError:
        return None


def _settable(state: torch.Tensor, device: str) -> bool:
    """torch accepts `state` for a generator of `device` (tried on a new generator, so
    the real ones are set only once every part is known good)."""
    try:
        torch.Generator(device).set_state(state)
    except RuntimeError:   # "Invalid mt19937 state", a wrong size
        return False
    return True


def load_rng(state: Any, where: str) -> None:
    """Set this process's generators from rng_state()'s JSON, after checking all of it
    (nothing is set when any part is wrong). CUDA generators: those of the devices
    present, when the checkpoint has them."""
    s = state if isinstance(state, dict) else {}
    py, npy = s.get("python"), s.get("numpy")
    problems = []
    if not (isinstance(py, dict) and py.get("version") == 3 and _words(py.get("state"), 625)
            and py["state"][-1] <= 624 and type(py.get("gauss_next")) in (float, type(None))):
        problems.append("python: not version 3 with 625 32-bit words and a float or null "
                        "gauss_next")
    if not (isinstance(npy, dict) and npy.get("kind") == "MT19937" and _words(npy.get("keys"), 624)
            and type(npy.get("pos")) is int and 0 <= npy["pos"] <= 624
            and npy.get("has_gauss") in (0, 1) and type(npy.get("cached_gaussian")) is float):
        problems.append("numpy: not an MT19937 state (624 keys, pos, has_gauss, cached_gaussian)")
    cpu = _bytes(s.get("torch"), torch.get_rng_state().numel())
    if cpu is None:
        problems.append(f"torch: not {torch.get_rng_state().numel()} bytes in hex")
    elif not _settable(cpu, "cpu"):
        problems.append("torch: not a valid mt19937 generator state")
    cuda = s.get("cuda", [])
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cuda_states = [_bytes(c, torch.cuda.get_rng_state(i).numel())
                   for i, c in enumerate(cuda[:n_cuda] if isinstance(cuda, list) else [])]
    if not isinstance(cuda, list) or any(c is None for c in cuda_states):
        problems.append("cuda: not a list of generator states in hex")
    elif not all(_settable(c, f"cuda:{i}") for i, c in enumerate(cuda_states)):
        problems.append("cuda: a generator state torch refuses")
    if problems:
        raise CheckpointError(f"{where}: damaged random state: " + "; ".join(problems))
    random.setstate((3, tuple(py["state"]), py["gauss_next"]))
    np.random.set_state((npy["kind"], np.array(npy["keys"], dtype=np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(cpu)
    for i, c in enumerate(cuda_states):
        torch.cuda.set_rng_state(c, i)


# ------------------------------------------------------------------------ fp16 loss scaler
def scaler_state(scaler: Any) -> dict[str, Any] | None:
    """A GradScaler's state (scale, growth and backoff factors, interval, tracker: plain
    numbers), or None without one (it is empty when the scaler is disabled)."""
    return (scaler.state_dict() or None) if scaler is not None else None


def load_scaler(scaler: Any, state: Any, where: str) -> None:
    """Set an enabled scaler from scaler_state()'s JSON (mixed_precision, which decides
    whether there is one, cannot change on resume; without one there is nothing to set)."""
    if scaler is None or state is None:
        return
    if not (isinstance(state, dict) and state and all(
            isinstance(k, str) and type(v) in (int, float) for k, v in state.items())):
        raise CheckpointError(f"{where}: scaler is not a mapping of names to numbers")
    scaler.load_state_dict(state)
