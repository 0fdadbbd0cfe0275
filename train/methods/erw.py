"""ERW, Embedded Representation Warmup (Liu et al., arXiv 2504.10188): a warm-up phase
that teaches the first blocks the teacher's representation on clean latents, then REPA
with a decaying alignment weight (methods.md sections 6 and 6b).

    phase 1, steps s < W (W = warmup_steps):
        h = blocks 1..l(x = z, t = 0, label)      l = l2r_depth; later blocks and the
                                                  final layer are not run (no gradient)
        L = w_1 * L_REPA(proj(h), y)              w_1 = warmup_weight (0.5)
    phase 2, steps s >= W:
        L = L_v + lambda(s) * L_REPA(proj(h_k), y)          k = align.depth (14 for XL)
        lambda(s) = c0 * 2^(-(s - W) / T)                   c0 = align.weight (XL 6, L 3,
                                                            B 1), T = half_life (50K)
    at the boundary (before step W, 0-based): fresh AdamW moments, EMA := the weights

`s` is the 0-based index of the step being computed. Both phases are one `train run`:
the model is the full SiT from the start; phase 1 stops its forward after block l
(`stop_after`), so the later blocks and the final layer keep their initial weights until
phase 2. ERW's code instead builds a truncated SiT for phase 1 and a fresh full SiT for
phase 2, loaded non-strictly from the phase-1 weights; the result is the same kind of
model: trained embedders, blocks 1..l and projector, freshly initialised later blocks and
(zero) final layer. The projector trained on block l's output in phase 1 goes on, as in
ERW's code, at block k in phase 2. The EMA is reset to the trained weights at the
boundary, as ERW initialises its phase-2 EMA from the phase-1 model (not its EMA).

Differences from ERW's code: ERW's cache stores one fixed posterior sample per image,
ours keeps the VAE moments and draws z = mean + std * eps anew each step (also in phase
1); phase 1 uses label dropout as phase 2 does; ERW's phase 2 uses RoPE (its README runs
`--use_rope`, its warm-up model has none), our SiT has absolute sin-cos positions in
both. Sampling: guidance on t in [0, 0.95], ERW's README's CFG command (scale 2.2).

Logged terms: phase 1 loss_repa (block l) and loss; phase 2 loss_v, loss_repa (block k)
and loss (the loop averages each term over the steps of its log window that have it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from cache.format import MOMENTS, TOKENS

from ..models import num_blocks
from .base import Method, PhaseChange, posterior_sample, register


@dataclass
class ErwArgs:
    """ERW's options (`method_args.<name>`); c0 is align.weight, k is align.depth."""
    warmup_steps: int = 100_000     # W: phase 1's steps (ERW's README: 100K); 0: none
    l2r_depth: int = 4              # l: phase 1 trains blocks 1..l (1-indexed), aligns block l
    warmup_weight: float = 0.5      # w_1: phase 1's L = w_1 * L_REPA (ERW's --proj-coeff)
    half_life: float = 50_000.0     # T: lambda halves every T steps of phase 2

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps}: must be >= 0 (the steps of "
                             "the warm-up phase; 0 skips it)")
        if self.l2r_depth < 1:
            raise ValueError(f"l2r_depth={self.l2r_depth}: must be >= 1 (blocks are "
                             "counted from 1; ERW uses 4)")
        if not (math.isfinite(self.warmup_weight) and self.warmup_weight > 0):
            raise ValueError(f"warmup_weight={self.warmup_weight}: must be a finite number "
                             "> 0 (phase 1 has no other loss; ERW uses 0.5)")
        if not (math.isfinite(self.half_life) and self.half_life > 0):
            raise ValueError(f"half_life={self.half_life}: must be a finite number > 0 "
                             "(steps; ERW uses 50000)")


@register
class ERW(Method):
    """Phase 1: blocks 1..l on clean latents at t = 0, projection loss only; phase 2:
    REPA at block k with lambda = c0 * 2^(-(s - W) / T)."""
    name = "erw"
    Args = ErwArgs
    partial_graph = True                  # phase 1 leaves later blocks without gradient
    guidance_interval = (0.0, 0.95)       # ERW's README: --cfg-scale 2.2 --guidance-high 0.95

    def check_cache(self, spec, arch: str, latent_size: int) -> list[str]:
        errors = super().check_cache(spec, arch, latent_size)
        blocks = num_blocks(arch)
        if self.args.l2r_depth > blocks:
            errors.append(f"method_args.l2r_depth={self.args.l2r_depth}: {arch} has "
                          f"{blocks} blocks; the warm-up trains blocks 1..l2r_depth")
        return errors

    def warming_up(self, step: int) -> bool:
        """Whether step `step` (0-based) belongs to phase 1."""
        return step < self.args.warmup_steps

    def align_weight(self, step: int) -> float:
        """w_1 in phase 1, then c0 * 2^(-(step - W) / T)."""
        a = self.args
        if self.warming_up(step):
            return a.warmup_weight
        return self.align.weight * 2.0 ** (-(step - a.warmup_steps) / a.half_life)

    def loss(self, student: nn.Module, batch: dict[str, torch.Tensor],
             d: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        if not self.warming_up(step):
            return super().loss(student, batch, d, step)
        # phase 1: the clean latent at t = 0 (d["t"] and d["noise"] are drawn, unused, so
        # that a step's draws are the same in both phases)
        x0 = posterior_sample(batch[MOMENTS], d["eps"], student.latent_scale)  # [B, C, h, w]
        t = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)     # [B]
        depth = self.args.l2r_depth
        y, drop = self.condition(batch, d)
        _, hidden = student.net(x0, t, y, align_depth=depth, stop_after=depth,
                                label_drop=drop)                           # [B, N, D]
        return self.aligned(student, hidden, batch[TOKENS], step, hidden.new_zeros(()))

    def phase_change(self, step: int) -> PhaseChange | None:
        if step == self.args.warmup_steps > 0:
            return PhaseChange("full training", reset_optimizer=True, reset_ema=True)
        return None

    def describe(self, net: nn.Module) -> str:
        a, k = self.args, self.depth(net)
        full = (f"REPA at block {k}, lambda = {self.align.weight:g} * "
                f"2^(-(step - {a.warmup_steps}) / {a.half_life:g})")
        if not a.warmup_steps:
            return f"{self.name}: no warm-up; {full}"
        return (f"{self.name}: warm-up for {a.warmup_steps} steps (blocks 1-{a.l2r_depth} "
                f"on clean latents at t = 0, {a.warmup_weight:g} * L_REPA at block "
                f"{a.l2r_depth}), then {full}; the optimizer and EMA restart at the boundary")
