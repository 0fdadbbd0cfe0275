"""The shape of a method: what a recipe of the REPA family reads, adds, optimises and samples.

A method is one class in one file of this package (registered with `@register`), plus a
preset in configs/. The loop, the checkpoints, the metrics, `train sample` and `train
eval` only talk to this interface:

    the cache     fields            teacher fields read besides moments, label, index
                  fields_at(step)   the fields a step reads (fewer after a termination)
                  check_cache       errors of a cache whose shapes do not fit
                  use_cache(spec)   the training cache's layout, before the first step
    the model     extend(net)       parts the generator keeps (EMA'd, sampled with, saved
                                    with the backbone): REG's CLS embedder and head,
                                    GMem's condition
                  heads(net)        parts only training uses (the projector)
    training      draws             every random draw of a stream's samples at a step
                  loss              the terms of one micro-batch, "loss" their total
                  phase_change      a step where the optimizer and EMA start over (ERW)
                  partial_graph     some steps leave parameters without a gradient (DDP)
    sampling      sampling(...)     a Sampling: the block's condition and initial state,
                                    the velocity of the state, the null condition, the
                                    latent of a state

`Method` itself is the REPA objective (L = L_v + lambda * L_REPA on block k's output); a
recipe overrides what differs. Options a method has beyond `align` live in its `Args`
dataclass, set as `method_args.<name>` in a config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from cache.format import LABEL, MOMENTS, TOKENS

from ..losses import flow_loss, interpolate, repa_loss
from ..models import ARCHS, Projector, num_blocks


@dataclass
class NoArgs:
    """A method without options of its own."""


@dataclass(frozen=True)
class PhaseChange:
    """At the start of step `step` + 1: what the loop resets (ERW's phase boundary)."""
    name: str
    reset_optimizer: bool = True      # fresh AdamW moments
    reset_ema: bool = True            # EMA := the current weights


def step_draws(n: int, moments_shape: tuple[int, ...], label_dropout: float, *,
               generator: torch.Generator | None = None, device=None) -> dict[str, torch.Tensor]:
    """The draws every method makes for n samples: posterior noise `eps`, time `t`, path
    noise `noise` and the label-drop mask `drop`, in this order from `generator` (the
    device's global generator when None)."""
    c2, h, w = moments_shape
    shape = (n, c2 // 2, h, w)
    kw = dict(generator=generator, device=device)
    return {"eps": torch.randn(shape, **kw), "t": torch.rand(n, **kw),
            "noise": torch.randn(shape, **kw), "drop": torch.rand(n, **kw) < label_dropout}


def posterior_sample(moments: torch.Tensor, eps: torch.Tensor, scale: float) -> torch.Tensor:
    """z = (mean + std * eps) * scale from cached moments [B, 2C, h, w]."""
    mean, std = moments.float().chunk(2, dim=1)
    return (mean + std * eps) * scale                                      # [B, C, h, w]


class Method:
    """REPA (Yu et al. 2025): L = L_v + lambda * L_REPA(proj(h_k), teacher tokens)."""
    name: ClassVar[str] = ""
    Args: ClassVar[type] = NoArgs
    aligns: ClassVar[bool] = True            # reads teacher tokens, has a projector
    fields: ClassVar[tuple[str, ...]] = (TOKENS,)
    partial_graph: ClassVar[bool] = False
    guidance_interval: ClassVar[tuple[float, float]] = (0.0, 0.7)
    sample_options: ClassVar[tuple[str, ...]] = ()   # SampleSettings fields only this
    #                                  method's sampling reads (REG's cls_cfg, GMem's bank)

    def __init__(self, align, args, model):
        """`align`: AlignConfig, `args`: an instance of Args, `model`: ModelConfig."""
        self.align, self.args, self.model = align, args, model

    # ------------------------------------------------------------------ the cache
    def fields_at(self, step: int) -> tuple[str, ...]:
        """The teacher fields step `step` (0-based) reads: `fields`, or fewer once an
        alignment stops (HASTE's termination), so that the loader reads no more bytes
        than the step uses. The loop switches the loader when this changes."""
        return self.fields

    def check_cache(self, spec, arch: str, latent_size: int) -> list[str]:
        """What does not fit between the cache's shapes and this method (one line each)."""
        if not self.aligns:
            return []
        errors = []
        grid = latent_size // ARCHS[arch][1].get("patch", 2)   # every size here patches 2x2
        tgrid = math.isqrt(spec.tokens)
        if tgrid * tgrid != spec.tokens or tgrid != grid:
            errors.append(f"teacher tokens: cache {spec.tokens} per image vs the model's "
                          f"{grid}x{grid} token grid ({arch} on {latent_size}x{latent_size} "
                          "latents); REPA aligns token n with token n")
        if spec.token_dim != self.align.teacher_dim:
            errors.append(f"teacher width: cache tokens are {spec.token_dim}-d vs "
                          f"align.teacher_dim={self.align.teacher_dim} (the projector's "
                          "output)")
        blocks = num_blocks(arch)
        if self.align.depth is not None and self.align.depth > blocks:
            errors.append(f"align.depth={self.align.depth}: {arch} has {blocks} blocks")
        return errors

    def use_cache(self, spec) -> None:
        """Told the spec of the (checked) cache it trains from, once before the first
        step: a method that needs a field's layout keeps it (HASTE: which rows of
        attn_qk hold its teacher blocks). REPA: nothing to keep."""

    # ------------------------------------------------------------------ the model
    def extend(self, net: nn.Module) -> None:
        """Add the parts sampling needs to the backbone (REPA: none)."""

    def heads(self, net: nn.Module) -> dict[str, nn.Module]:
        """The modules only training uses, by attribute name of the Student."""
        if not self.aligns:
            return {}
        a = self.align
        return {"projector": Projector(net.dim, a.teacher_dim, a.projector_dim,
                                       upsample=a.upsample)}

    def depth(self, net: nn.Module) -> int | None:
        """The block (1-indexed) whose output is aligned."""
        return (self.align.depth or net.default_align_depth) if self.aligns else None

    # ------------------------------------------------------------------ training
    def draws(self, n: int, moments_shape: tuple[int, ...], *,
              generator: torch.Generator | None = None, device=None) -> dict[str, torch.Tensor]:
        """Every random draw of n samples at one step, in a fixed order from `generator`."""
        return step_draws(n, moments_shape, self.model.label_dropout, generator=generator,
                          device=device)

    def condition(self, batch: dict[str, torch.Tensor], d: dict[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the backbone is conditioned on and its training-time drop mask: the label
        and the per-sample label drop (GMem: the CLS token and its element-wise mask)."""
        return batch[LABEL], d["drop"]

    def align_weight(self, step: int) -> float:
        """lambda at step `step` (0-based: the step being computed)."""
        return self.align.weight

    def align_terms(self, h: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The alignment terms of projected student tokens h and teacher tokens y, and
        "align", their sum as lambda weighs it."""
        loss = repa_loss(h, y)
        return {"loss_repa": loss, "align": loss}

    def loss(self, student: nn.Module, batch: dict[str, torch.Tensor],
             d: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """The terms of one micro-batch ("loss" the total, the rest logged)."""
        x0 = posterior_sample(batch[MOMENTS], d["eps"], student.latent_scale)
        xt, v = interpolate(x0, d["noise"], d["t"])
        y, drop = self.condition(batch, d)
        v_pred, hidden = student.net(xt, d["t"], y, align_depth=student.depth,
                                     label_drop=drop)
        out = {"loss_v": flow_loss(v_pred, v)}
        out["loss"] = out["loss_v"]
        if self.aligns:
            out.update(self.aligned(student, hidden, batch[TOKENS], step, out["loss"]))
        return out

    def aligned(self, student: nn.Module, hidden: torch.Tensor, y: torch.Tensor, step: int,
                total: torch.Tensor, prefix: int = 0) -> dict[str, torch.Tensor]:
        """The alignment terms of `hidden` against target tokens y [B, N, D], and "loss":
        `total` + lambda(step) * their sum."""
        h = student.projector(hidden, out_tokens=y.shape[1], prefix=prefix)
        terms = self.align_terms(h, y)
        return {**{k: v for k, v in terms.items() if k != "align"},
                "loss": total + self.align_weight(step) * terms["align"]}

    def phase_change(self, step: int) -> PhaseChange | None:
        """Whether the step after `step` completed steps begins a new phase."""
        return None

    # ------------------------------------------------------------------ sampling
    def sampling(self, net: nn.Module, settings, *, num_classes: int,
                 dtype: torch.dtype, cache: str | None = None) -> Sampling:
        """How to sample `net` (this method's generator) with `settings` (SampleSettings:
        cfg, interval, and the method-specific cls_cfg, bank); `cache` is the training
        cache (as the checkpoint records it), for a method that draws from it."""
        return Sampling(net, settings, num_classes=num_classes, dtype=dtype,
                        interval=self.guidance_interval)

    # ------------------------------------------------------------------ description
    def describe(self, net: nn.Module) -> str:
        depth = self.depth(net)
        return self.name + (f" at block {depth}" if depth else "")


class Sampling:
    """Sampling a class-conditional latent model: a block's labels (the generator's first
    draw, uniform over the classes), then its noise; CFG's null condition is the null
    class. Methods with another condition or a joint state override the parts."""

    def __init__(self, net: nn.Module, settings, *, num_classes: int, dtype: torch.dtype,
                 interval: tuple[float, float]):
        self.net, self.s, self.num_classes, self.dtype = net, settings, num_classes, dtype
        self.interval = settings.interval or interval

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def record(self) -> dict[str, Any]:
        """What else fixes the samples (sample.json; a rerun must agree), e.g. the bank."""
        return {}

    def condition(self, generator: torch.Generator, n: int) -> torch.Tensor:
        """The block's conditions: the first draw from its generator."""
        return torch.randint(self.num_classes, (n,), generator=generator,
                             device=generator.device)

    def labels(self, cond: torch.Tensor) -> torch.Tensor:
        """The class labels of conditions (samples.npz arr_1)."""
        return cond

    def initial(self, generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
        """The state at t = 1: latent noise of `shape` [n, C, h, w]."""
        return torch.randn(shape, generator=generator, device=generator.device)

    def null(self, cond: torch.Tensor) -> torch.Tensor:
        return torch.full_like(cond, self.num_classes)

    def scale(self, x: torch.Tensor) -> float | torch.Tensor:
        """CFG's scale, per element of the state where streams differ."""
        return self.s.cfg

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The model's velocity of state x, autocast to the sampling dtype, in fp32."""
        with torch.autocast(x.device.type, dtype=self.dtype,
                            enabled=self.dtype != torch.float32):
            return self.forward(x, t, cond).float()

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The velocity of state x given the conditions (under velocity's autocast)."""
        return self.net(x, t, cond)[0]

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """The latent part of a final state."""
        return x


# ---------------------------------------------------------------------- the registry
METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a Method subclass available as align.method=<cls.name>."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method name {cls.name!r} is empty or taken")
    METHODS[cls.name] = cls
    return cls
