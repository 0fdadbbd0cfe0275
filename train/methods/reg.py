"""REG (Wu et al., NeurIPS 2025, arXiv 2507.01467): the teacher's CLS token is denoised with
the latent, as one extra token of the backbone (methods.md sections 6 and 6b).

    c   = DINOv2 CLS token, raw (the final LayerNorm output, as cached)       [B, D_t]
    x_t = (1 - t) z + t n,      c_t = (1 - t) c + t n_c      (the same t; n_c its own noise)
    token 0 = LayerNorm(Linear(c_t))  (D_t -> D, learnable affine), zero position
    v_c_pred = Head(final-norm features of token 0)  (Linear D -> D_t, zero-initialised)
    L = L_v + beta * L_v(cls) + lambda * L_REPA,   L_v(cls) = mean (v_c_pred - (n_c - c))^2
    L_REPA on the P + N = 257 tokens of block k: proj(h_k) vs [c; patch tokens]
    beta 0.03 (method_args.cls_weight), lambda 0.5 (align.weight), k 4 (B), 8 (L, XL)

The embedder (`net.cls_embedder`) and the head (`net.cls_head`) are parts of the generator
(EMA'd, saved with the backbone, used by `train sample`); the projector is training-only.

Sampling integrates the CLS token with the latent. The state is one flat tensor per
sample, [n, C*h*w + D_t] (latent then CLS), so the element-wise samplers of
train/sampling.py apply unchanged: the same drift and score formulas on both streams,
and the SDE's noise drawn for the whole state (the CLS part has its own noise, as REG's
sampler). CFG: scale `cfg` on the latent part, `cls_cfg` (default: cfg) on the CLS part,
for t in [0, 0.85] (REG's eval script: guidance high 0.85); the null is the null class.
REG's eval: cfg 2.3, cls cfg 2.3, SDE 250 steps.

Decisions where REG's paper and code are silent or differ from us (docs):
  - Draw order: the CLS noise n_c [B, D_t] is drawn after the common draws (eps, t, noise,
    drop) from the same generator, so the latent's draws are REPA's.
  - The CLS width is align.teacher_dim; the cache's CLS width is checked against it
    (besides the token width REPA checks).
  - Initialisation: the embedder's Linear xavier-uniform with zero bias (REG's SiT
    applies its basic init to every Linear), its LayerNorm eps 1e-6 with weight 1, bias
    0; the head all zeros. They are created after the backbone's init, from the same
    seeded global generator, so two runs with one seed start identical.
  - A guided step: max(cfg, cls_cfg) > 1 and t in the interval. REG's script guides
    only when cfg > 1; here `--cfg 1 --cls-cfg 2` guides the CLS alone (the latent part
    then takes the conditional velocity, scale 1). REG's `cls_cfg_scale <= 0`
    (conditional CLS) is `--cls-cfg 1` here.
  - align.weight defaults to U-REPA's 0.25 in the config: the reg presets set 0.5.

`urepa-reg`, a composition no paper has tried: U-REPA's SiT-down backbone and
manifold loss with REG's CLS token.

    L = L_v + beta * L_v(cls) + lambda * (L_REPA + w * L_ML),  lambda 0.25, w 3 (U-REPA's
        defaults in AlignConfig), beta 0.03 (REG's)

The CLS token enters as SiT-down's prefix token: RoPE leaves it unrotated, the
down/up/out convolutions pass it unchanged, and the long skip fuses it with its own
stage-1 state like every grid token. REPA aligns the middle-stage centre (U-REPA's
depth), whose P + 64 tokens are projected by the MLP and then only the 64 grid tokens
are upsampled x2 (Projector with prefix=1), against [c; 256 patch tokens]. L_ML compares
the 257-token sets: every token pair of the micro-batch, CLS tokens included (pooled:
means over the 257 tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from cache.format import CLS, MOMENTS, TOKENS

from ..losses import flow_loss, interpolate
from .base import Method, Sampling, posterior_sample, register
from .urepa import URepa


@dataclass
class RegArgs:
    cls_weight: float = 0.03    # beta, the weight of L_v(cls) (REG's ablation on SiT-B at
    #                             400K: 0.01 15.76, 0.02 15.64, 0.03 15.22, 0.05 16.28)

    def __post_init__(self) -> None:
        v = self.cls_weight
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"method_args.cls_weight={v!r}: beta, the weight of the CLS "
                             "token's velocity loss, must be a finite number >= 0 (REG: 0.03)")


def cls_modules(dim: int, teacher_dim: int) -> tuple[nn.Module, nn.Module]:
    """REG's CLS embedder Linear(D_t -> D) + LayerNorm (affine) and its zero head
    Linear(D -> D_t)."""
    embedder = nn.Sequential(nn.Linear(teacher_dim, dim), nn.LayerNorm(dim, eps=1e-6))
    nn.init.xavier_uniform_(embedder[0].weight)
    nn.init.zeros_(embedder[0].bias)
    head = nn.Linear(dim, teacher_dim)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return embedder, head


def cls_velocity(net: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                 c: torch.Tensor, **kw) -> tuple[torch.Tensor, ...]:
    """The backbone on latent x [B, C, h, w] with CLS state c [B, D_t] as token 0: (the
    latent's velocity [B, C, h, w], the hidden state of kw's align_depth or None, the CLS
    token's velocity [B, D_t])."""
    prefix = net.cls_embedder(c)[:, None]                                  # [B, 1, D]
    v, hidden, pre = net(x, t, y, prefix=prefix, **kw)
    return v, hidden, net.cls_head(pre[:, 0])                             # [B, D_t]


@register
class REG(Method):
    """REPA plus REG's entangled CLS token (module docstring)."""
    name = "reg"
    Args = RegArgs
    fields = (TOKENS, CLS)
    guidance_interval = (0.0, 0.85)
    sample_options = ("cls_cfg",)

    # ------------------------------------------------------------------ the cache
    def check_cache(self, spec, arch: str, latent_size: int) -> list[str]:
        errors = super().check_cache(spec, arch, latent_size)
        width = spec.fields[CLS].shape[-1]
        if width != self.align.teacher_dim:
            errors.append(f"CLS width: cache CLS tokens are {width}-d vs align.teacher_dim="
                          f"{self.align.teacher_dim} ({self.name}'s CLS embedder input and "
                          "head output); set align.teacher_dim to the cache's width")
        return errors

    # ------------------------------------------------------------------ the model
    def extend(self, net: nn.Module) -> None:
        net.cls_embedder, net.cls_head = cls_modules(net.dim, self.align.teacher_dim)

    # ------------------------------------------------------------------ training
    def draws(self, n: int, moments_shape: tuple[int, ...], *,
              generator: torch.Generator | None = None, device=None) -> dict[str, torch.Tensor]:
        d = super().draws(n, moments_shape, generator=generator, device=device)
        d["cls_noise"] = torch.randn((n, self.align.teacher_dim), generator=generator,
                                     device=device)                        # [n, D_t]
        return d

    def loss(self, student: nn.Module, batch: dict[str, torch.Tensor],
             d: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        x0 = posterior_sample(batch[MOMENTS], d["eps"], student.latent_scale)
        xt, v = interpolate(x0, d["noise"], d["t"])                        # [B, C, h, w]
        c = batch[CLS].float()                                             # [B, D_t]
        ct, vc = interpolate(c, d["cls_noise"], d["t"])                    # [B, D_t]
        y, drop = self.condition(batch, d)
        v_pred, hidden, vc_pred = cls_velocity(
            student.net, xt, d["t"], y, ct, align_depth=student.depth, label_drop=drop)
        out = {"loss_v": flow_loss(v_pred, v), "loss_cls": flow_loss(vc_pred, vc)}
        total = out["loss_v"] + self.args.cls_weight * out["loss_cls"]
        y = torch.cat([c[:, None], batch[TOKENS].float()], dim=1)          # [B, 1 + N, D_t]
        out.update(self.aligned(student, hidden, y, step, total, prefix=1))
        return out

    # ------------------------------------------------------------------ sampling
    def sampling(self, net: nn.Module, settings, *, num_classes: int,
                 dtype: torch.dtype, cache: str | None = None) -> Sampling:
        return RegSampling(net, settings, num_classes=num_classes, dtype=dtype,
                           interval=self.guidance_interval, cls_dim=self.align.teacher_dim)

    # ------------------------------------------------------------------ description
    def describe(self, net: nn.Module) -> str:
        return (f"{super().describe(net)} with the entangled CLS token (beta "
                f"{self.args.cls_weight})")


@register
class URepaReg(REG):
    """U-REPA's SiT-down and manifold loss with REG's CLS token (module docstring)."""
    name = "urepa-reg"
    align_terms = URepa.align_terms     # L_REPA + w * L_ML on the 257-token sets


class RegSampling(Sampling):
    """The latent and its CLS token integrated jointly as one flat state [n, F],
    F = C*h*w + D_t (latent first); CFG scale cfg on the latent, cls_cfg on the CLS."""

    def __init__(self, net: nn.Module, settings, *, num_classes: int, dtype: torch.dtype,
                 interval: tuple[float, float], cls_dim: int):
        super().__init__(net, settings, num_classes=num_classes, dtype=dtype,
                         interval=interval)
        size = net.grid * net.patch
        self.latent_shape = (net.in_channels, size, size)
        self.cls_dim = cls_dim
        self.cls_cfg = float(settings.cfg if settings.cls_cfg is None else settings.cls_cfg)

    @property
    def latent_numel(self) -> int:
        return math.prod(self.latent_shape)

    def record(self) -> dict:
        return {"cls_cfg": self.cls_cfg}

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A state [n, F] -> (latent [n, C, h, w], CLS [n, D_t])."""
        k = self.latent_numel
        if x.shape[1] != k + self.cls_dim:
            raise ValueError(f"REG state of width {x.shape[1]}: expected {k} latent + "
                             f"{self.cls_dim} CLS values")
        return x[:, :k].reshape(len(x), *self.latent_shape), x[:, k:]

    def initial(self, generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
        """Latent noise of `shape`, then the CLS noise [n, D_t], packed [n, F]."""
        if tuple(shape[1:]) != self.latent_shape:
            raise ValueError(f"latent shape {tuple(shape[1:])} vs the model's "
                             f"{self.latent_shape}")
        z = torch.randn(shape, generator=generator, device=generator.device)
        c = torch.randn((shape[0], self.cls_dim), generator=generator,
                        device=generator.device)                           # [n, D_t]
        return torch.cat([z.flatten(1), c], dim=1)                         # [n, F]

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.full((1, x.shape[1]), float(self.s.cfg), dtype=torch.float64,
                       device=x.device)                                    # [1, F]
        s[:, self.latent_numel:] = self.cls_cfg
        return s

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        z, c = self.split(x)
        v, _, vc = cls_velocity(self.net, z, t, cond, c)
        return torch.cat([v.float().flatten(1), vc.float()], dim=1)        # [n, F]

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.split(x)[0]
