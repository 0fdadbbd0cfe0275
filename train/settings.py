"""What `train sample` is asked for, checked, without importing torch: the command line's
parser reads its defaults and choices from here, so `train --help` and a bad option answer
at once (train/generate.py does the sampling)."""

from __future__ import annotations

import math
from dataclasses import dataclass

MODES = ("sde", "ode")
PRECISION_NAMES = ("fp32", "bf16")
DEFAULT_STEPS = {"sde": 250, "ode": 50}
# settings a rerun into the same directory may change (the rest fix what sample i is)
FREE_SETTINGS = {"num", "grid", "npz"}
ODE_METHODS = ("heun", "euler")
# the SDE's last step from t_last to 0: "drift" as REPA's sampler (every paper number);
# "denoise" x - t v, the model's estimate of E[x0 | x_t] (this project's earlier default)
SDE_LAST_STEPS = ("drift", "denoise")
CHECKPOINT_FORMATS = ("auto", "ours", "repa")


class SampleError(ValueError):
    """Bad sampling input (no checkpoint, bad settings, a directory of other samples)."""


@dataclass
class SampleSettings:
    num: int = 50_000
    cfg: float = 1.0                    # 1: no guidance; U-REPA 1.65, REPA 1.8 (interval)
    interval: tuple[float, float] | None = None  # CFG only while lo <= t <= hi; None: the
    #                                     method's ([0, 0.7]; REG [0, 0.85])
    cls_cfg: float | None = None        # REG: the CLS stream's scale (None: cfg)
    bank: str | None = None             # GMem: the CLS bank (pipeline bank) or a cache;
    #                                     None: the training cache, if still there
    mode: str = "sde"                   # sde (every paper number) or ode
    steps: int | None = None            # None: 250 for sde, 50 for ode
    ode_method: str = "heun"
    sde_last_step: str = "drift"        # drift (REPA's sampler, the papers) or denoise
    batch_size: int = 64                # per process
    seed: int = 0
    weights: str = "ema"                # ema or model (the raw trained weights)
    vae: str | None = None              # see train/vae.py: auto, random, hub id or dir
    precision: str = "fp32"             # the model's autocast: fp32 or bf16
    grid: int = 64                      # samples in grid.png (0: none)
    npz: bool = True

    def __post_init__(self) -> None:
        if self.interval is not None:
            self.interval = tuple(float(v) for v in self.interval)
        self.steps = self.steps or DEFAULT_STEPS.get(self.mode)
        checks = [
            (self.num >= 1, "num", "must be >= 1"),
            (math.isfinite(self.cfg) and self.cfg >= 1, "cfg", "must be >= 1"),
            (self.interval is None or (len(self.interval) == 2
                                       and 0 <= self.interval[0] <= self.interval[1] <= 1),
             "interval", "must be LO,HI with 0 <= LO <= HI <= 1"),
            (self.cls_cfg is None or (math.isfinite(self.cls_cfg) and self.cls_cfg >= 1),
             "cls_cfg", "must be >= 1"),
            (self.mode in MODES, "mode", f"choose one of {MODES}"),
            (self.ode_method in ODE_METHODS, "ode_method", f"choose one of {ODE_METHODS}"),
            (self.sde_last_step in SDE_LAST_STEPS, "sde_last_step",
             f"choose one of {SDE_LAST_STEPS}"),
            (self.steps is not None and self.steps >= 2, "steps", "must be >= 2"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (self.seed >= 0, "seed", "must be >= 0"),
            (self.weights in ("ema", "model"), "weights", "choose ema or model"),
            (self.precision in PRECISION_NAMES, "precision",
             f"choose one of {list(PRECISION_NAMES)}"),
            (self.grid >= 0, "grid", "must be >= 0"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise SampleError(f"{name}={getattr(self, name)!r}: {why}")
