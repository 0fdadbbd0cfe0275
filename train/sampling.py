"""Samplers for the linear path x_t = (1 - t) x0 + t eps (methods.md section 5).

They take any velocity function v(x, t, y) -> [B, ...], so tests can check them against
data whose exact velocity field is known. Time runs from t = 1 (noise) to 0 (data).

    SDE (Euler-Maruyama, every number in the papers): 250 points linearly from 1.0 to
        0.04, stochastic steps, then one deterministic step to 0.
        score s = (-(1 - t) v - x) / t,  drift d = v - w(t)/2 * s,  w(t) = 2t (REPA's code)
        x <- x + d dt + sqrt(w(t) |dt|) xi       (dt < 0)
    ODE: Euler or Heun on a uniform grid 1 -> 0 (50 steps); Heun adds a corrector except
        on the last step.
    CFG: on the drift (SDE) or the velocity (ODE), all channels: d = d_u + s (d_c - d_u),
        only while t_low <= t <= t_high (the guidance interval, [0, 0.7] in the papers).
"""

from __future__ import annotations

from typing import Callable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def guided(velocity: Velocity, null_label: int, scale: float,
           interval: tuple[float, float] = (0.0, 1.0)) -> Velocity:
    """Classifier-free guidance around a conditional velocity function: one batched call
    on [x; x] with [y; null] while t is inside `interval`, the conditional branch alone
    outside it (and when scale == 1)."""
    lo, hi = interval

    def v(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t0 = float(t.flatten()[0])
        if scale == 1.0 or not lo <= t0 <= hi:
            return velocity(x, t, y)
        both = velocity(torch.cat([x, x]), torch.cat([t, t]),
                        torch.cat([y, torch.full_like(y, null_label)]))
        cond, uncond = both.chunk(2)
        return uncond + scale * (cond - uncond)
    return v


def _score(v: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    return (-(1 - t) * v - x) / t


@torch.no_grad()
def sample_sde(velocity: Velocity, noise: torch.Tensor, y: torch.Tensor, *, steps: int = 250,
               t_last: float = 0.04, generator: torch.Generator | None = None) -> torch.Tensor:
    """Euler-Maruyama from t = 1 to t_last over `steps` points, then a deterministic step
    to 0. With guidance, pass `guided(...)`: guiding v guides the drift, since the drift
    is linear in v."""
    ts = torch.linspace(1.0, t_last, steps, dtype=torch.float64).tolist()
    x = noise
    for t, t_next in zip(ts[:-1], ts[1:]):
        dt = t_next - t                                                    # < 0
        v = velocity(x, torch.full((len(x),), t, device=x.device), y)
        w = 2 * t
        drift = v - 0.5 * w * _score(v, x, t)
        xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + drift * dt + (w * abs(dt)) ** 0.5 * xi
    t = ts[-1]                                                             # last: to 0
    v = velocity(x, torch.full((len(x),), t, device=x.device), y)
    return x + v * (0.0 - t)


@torch.no_grad()
def sample_ode(velocity: Velocity, noise: torch.Tensor, y: torch.Tensor, *, steps: int = 50,
               method: str = "heun") -> torch.Tensor:
    """Euler or Heun on a uniform grid from 1 to 0 (Heun: no corrector on the last step)."""
    if method not in ("euler", "heun"):
        raise ValueError(f"method={method!r}: choose 'euler' or 'heun'")
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    x = noise
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        dt = t_next - t
        v = velocity(x, torch.full((len(x),), t, device=x.device), y)
        x_euler = x + v * dt
        if method == "euler" or i == steps - 1:
            x = x_euler
        else:
            v2 = velocity(x_euler, torch.full((len(x),), t_next, device=x.device), y)
            x = x + 0.5 * (v + v2) * dt
    return x
