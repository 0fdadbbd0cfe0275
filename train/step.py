"""One training step's computation, on plain tensors (no accelerate, no loader).

    moments [B, 2C, h, w] (cache) -> z = (mean + std * eps) * scale       (sampled anew each step)
    t ~ U(0, 1), x_t = (1 - t) z + t n, target v = n - z
    v_pred, hidden_k = model(x_t, t, y)
    L_v = mean (v_pred - v)^2
    REPA:   L = L_v + lambda * L_REPA(proj(hidden_k), teacher tokens)
    U-REPA: L = L_v + lambda * (L_REPA + w * L_ML)          (proj = MLP on 8x8, then x2)

`Student` holds the trained modules (backbone + projector) and returns the loss terms
from its forward, so DDP sees one module and one forward per micro-batch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from cache.format import LABEL, MOMENTS, TOKENS

from .config import AlignConfig
from .losses import flow_loss, interpolate, manifold_loss, repa_loss
from .models import Projector


def step_draws(n: int, moments_shape: tuple[int, ...], label_dropout: float, *,
               generator: torch.Generator | None = None, device=None) -> dict[str, torch.Tensor]:
    """Every random draw of a training step for n samples: posterior noise `eps`, time `t`,
    path noise `noise` and the label-drop mask `drop`, in this order from `generator`
    (the device's global generator when None)."""
    c2, h, w = moments_shape
    shape = (n, c2 // 2, h, w)
    kw = dict(generator=generator, device=device)
    return {"eps": torch.randn(shape, **kw), "t": torch.rand(n, **kw),
            "noise": torch.randn(shape, **kw), "drop": torch.rand(n, **kw) < label_dropout}


def stream_seed(seed: int, step: int, stream: int) -> int:
    """The generator seed of one stream's draws at one step (see Student)."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1, np.uint64)[0]
               >> np.uint64(1))


class Student(nn.Module):
    """The backbone plus, for REPA/U-REPA, the projector onto the teacher's tokens."""

    def __init__(self, net: nn.Module, align: AlignConfig, *, latent_scale: float):
        super().__init__()
        self.net, self.align, self.latent_scale = net, align, latent_scale
        self.depth = None
        self.projector = None
        if align.method != "none":
            self.depth = align.depth or net.default_align_depth
            self.projector = Projector(net.dim, align.teacher_dim, align.projector_dim,
                                       upsample=align.upsample)

    def forward(self, batch: dict[str, torch.Tensor],
                draws: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Loss terms of one micro-batch: loss (the total), loss_v, and with alignment
        loss_repa and (U-REPA) loss_ml. `draws` (step_draws) holds the random draws; the
        trainer makes them per stream and step, so that they belong to the sample's place
        in the global batch whatever the number of processes. Without them they come from
        the device's global generator."""
        moments = batch[MOMENTS]
        if draws is None:
            draws = step_draws(len(moments), tuple(moments.shape[1:]),
                               self.net.y_embedder.dropout,
                               device=moments.device)
        mean, std = moments.float().chunk(2, dim=1)
        x0 = (mean + std * draws["eps"]) * self.latent_scale               # [B, C, h, w]
        t = draws["t"]                                                     # [B]
        xt, v = interpolate(x0, draws["noise"], t)
        v_pred, hidden = self.net(xt, t, batch[LABEL], align_depth=self.depth,
                                  label_drop=draws["drop"])
        out = {"loss_v": flow_loss(v_pred, v)}
        total = out["loss_v"]
        if self.projector is not None:
            y = batch[TOKENS]                                              # [B, N, 768]
            h = self.projector(hidden, out_tokens=y.shape[1])              # [B, N, 768]
            out["loss_repa"] = repa_loss(h, y)
            align = out["loss_repa"]
            if self.align.method == "urepa":
                out["loss_ml"] = manifold_loss(h, y, pooled=self.align.manifold_pooled)
                align = align + self.align.manifold_weight * out["loss_ml"]
            total = total + self.align.weight * align
        out["loss"] = total
        return out
