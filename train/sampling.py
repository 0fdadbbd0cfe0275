"""Samplers for the linear path x_t = (1 - t) x0 + t eps (methods.md section 5).

Every FID in the REPA, U-REPA, HASTE and REG papers comes from REPA's `samplers.py`; these
follow it step for step (docs/sampling.md, "Parity with the reference"):

    state     float64 throughout; the model sees x and t cast to the noise's dtype
    SDE       Euler-Maruyama over `steps` points linearly from 1.0 to 0.04, then one last
              deterministic step from 0.04 to 0 along the drift, without noise:
                score s = (-(1 - t) v - x) / t,  drift d = v - w(t)/2 * s,  w(t) = 2t
                x <- x + d dt + sqrt(w(t)) sqrt(|dt|) xi         (dt < 0), last: x + d dt
              `steps` model evaluations (x2 inside the guidance interval).
    ODE       Euler or Heun on a uniform grid of steps + 1 points from 1 to 0; Heun adds a
              corrector at t_next, except on the last step.
    CFG       on the drift (SDE) or the velocity (ODE), all channels:
                d = d_u + s (d_c - d_u),  one batched call on [x; x] with [y; null]
              A step is guided when s > 1 and lo <= t_cur <= hi, t_cur the float64 time at
              the start of the step; Heun's corrector, evaluated at t_next, follows the
              decision of its step's t_cur.

The samplers take any velocity function v(x, t, y) -> [B, ...], so tests can check them
against data whose exact velocity field is known. Time runs from t = 1 (noise) to 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch

from .settings import ODE_METHODS, SDE_LAST_STEPS

Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


Null = Union[int, Callable[[torch.Tensor], torch.Tensor]]


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: `scale` (1: none; a tensor broadcast over the state when
    its streams have their own scales, as REG's latent and CLS), the null condition of
    the unconditional branch (a label, or a function of the conditions, e.g. GMem's zero
    vector), and the interval of t in which it acts ([0, 0.7] in the papers)."""
    scale: float | torch.Tensor = 1.0
    null_label: Null = 1000
    interval: tuple[float, float] = (0.0, 1.0)

    def active(self, t_cur: float) -> bool:
        """Whether the step that starts at `t_cur` (a float64 grid value) is guided."""
        lo, hi = self.interval
        top = float(self.scale.max()) if torch.is_tensor(self.scale) else self.scale
        return top > 1.0 and lo <= t_cur <= hi

    def null(self, t_cur: float) -> Null | None:
        """The null condition for the calls of the step that starts at `t_cur`, if guided."""
        return self.null_label if self.active(t_cur) else None


NO_GUIDANCE = Guidance()


def _evaluate(velocity: Velocity, x: torch.Tensor, t: float, y: torch.Tensor,
              null: Null | None, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The model's velocity at (x, t) in float64: (conditional,), or with a `null`
    condition (conditional, unconditional) from one call on [x; x] with [y; null]."""
    if null is not None:
        y_null = null(y) if callable(null) else torch.full_like(y, null)
        x, y = torch.cat([x, x]), torch.cat([y, y_null])
    t_in = torch.full((len(x),), t, dtype=dtype, device=x.device)
    v = velocity(x.to(dtype), t_in, y).to(torch.float64)
    return (v,) if null is None else v.chunk(2)


def _combine(parts: Sequence[torch.Tensor], scale: float | torch.Tensor) -> torch.Tensor:
    """u + s (c - u) of (c, u), or c alone."""
    if len(parts) == 1:
        return parts[0]
    cond, uncond = parts
    return uncond + scale * (cond - uncond)


def _drift(v: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    """d = v - w(t)/2 * s with w(t) = 2t and the score of the linear path from v."""
    score = (-(1 - t) * v - x) / t
    return v - 0.5 * (2 * t) * score


@torch.no_grad()
def sample_sde(velocity: Velocity, noise: torch.Tensor, y: torch.Tensor, *, steps: int = 250,
               t_last: float = 0.04, guidance: Guidance = NO_GUIDANCE,
               generator: torch.Generator | None = None, last_step: str = "drift"
               ) -> torch.Tensor:
    """Euler-Maruyama from t = 1 to t_last over `steps` points, then one deterministic
    step to 0 (`last_step`: "drift" as the reference, or "denoise": x - t v). The
    per-step noise is float64, drawn from `generator`. Returns noise's dtype."""
    if last_step not in SDE_LAST_STEPS:
        raise ValueError(f"last_step={last_step!r}: choose one of {SDE_LAST_STEPS}")
    ts = torch.linspace(1.0, t_last, steps, dtype=torch.float64).tolist() + [0.0]
    x = noise.to(torch.float64)
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        dt = t_next - t                                                    # < 0
        parts = _evaluate(velocity, x, t, y, guidance.null(t), noise.dtype)
        if i == steps - 1 and last_step == "denoise":
            return (x + _combine(parts, guidance.scale) * dt).to(noise.dtype)
        d = _combine([_drift(v, x, t) for v in parts], guidance.scale)
        if i == steps - 1:                                                 # to 0: no noise
            return (x + d * dt).to(noise.dtype)
        xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float64)
        x = x + d * dt + math.sqrt(2 * t) * (xi * math.sqrt(abs(dt)))
    raise ValueError(f"steps={steps}: the SDE needs at least 1 step")


@torch.no_grad()
def sample_ode(velocity: Velocity, noise: torch.Tensor, y: torch.Tensor, *, steps: int = 50,
               method: str = "heun", guidance: Guidance = NO_GUIDANCE) -> torch.Tensor:
    """Euler or Heun on a uniform grid from 1 to 0 (Heun: no corrector on the last step).
    Returns noise's dtype."""
    if method not in ODE_METHODS:
        raise ValueError(f"method={method!r}: choose one of {ODE_METHODS}")
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    x = noise.to(torch.float64)
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        dt = t_next - t
        null = guidance.null(t)                 # the corrector follows its step's t_cur
        d = _combine(_evaluate(velocity, x, t, y, null, noise.dtype), guidance.scale)
        x_next = x + dt * d
        if method == "heun" and i < steps - 1:
            d2 = _combine(_evaluate(velocity, x_next, t_next, y, null, noise.dtype),
                          guidance.scale)
            x_next = x + dt * (0.5 * d + 0.5 * d2)
        x = x_next
    return x.to(noise.dtype)
