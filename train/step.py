"""One training step's computation, on plain tensors (no accelerate, no loader).

    moments [B, 2C, h, w] (cache) -> z = (mean + std * eps) * scale       (sampled anew each step)
    t ~ U(0, 1), x_t = (1 - t) z + t n, target v = n - z
    the method's terms (train/methods/): L_v, and REPA's, U-REPA's, REG's ... on top

`Student` holds the trained modules (the backbone with the parts the method adds to it,
and the method's training-only heads, e.g. the projector) and returns the loss terms
from its forward, so DDP sees one module and one forward per micro-batch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from cache.format import MOMENTS

from .methods import Method, build_method
from .models import build_model

__all__ = ["Student", "build_generator", "stream_seed"]


def stream_seed(seed: int, step: int, stream: int) -> int:
    """The generator seed of one stream's draws at one step (see Student)."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1, np.uint64)[0]
               >> np.uint64(1))


def build_generator(cfg) -> tuple[nn.Module, Method]:
    """The backbone of cfg.model with what cfg's method adds to it (the module the EMA
    follows and `train sample` loads), and the method."""
    m = cfg.model
    net = build_model(m.arch, latent_size=m.latent_size, in_channels=m.in_channels,
                      num_classes=m.num_classes, label_dropout=m.label_dropout,
                      checkpointing=m.checkpointing)
    method = build_method(cfg.align, cfg.method_args, m)
    method.extend(net)
    return net, method


class Student(nn.Module):
    """The generator (backbone + the method's parts) and the method's training heads."""

    def __init__(self, net: nn.Module, method: Method, *, latent_scale: float):
        super().__init__()
        self.net, self.method, self.latent_scale = net, method, latent_scale
        self.depth = method.depth(net)
        for name, module in method.heads(net).items():
            self.add_module(name, module)

    def forward(self, batch: dict[str, torch.Tensor],
                draws: dict[str, torch.Tensor] | None = None, step: int = 0
                ) -> dict[str, torch.Tensor]:
        """Loss terms of one micro-batch at step `step` (0-based): loss (the total), loss_v
        and the method's. `draws` (Method.draws) holds the random draws; the trainer makes
        them per stream and step, so that they belong to the sample's place in the global
        batch whatever the number of processes. Without them they come from the device's
        global generator."""
        if draws is None:
            moments = batch[MOMENTS]
            draws = self.method.draws(len(moments), tuple(moments.shape[1:]),
                                      device=moments.device)
        return self.method.loss(self, batch, draws, step)
