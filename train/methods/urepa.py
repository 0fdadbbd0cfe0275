"""U-REPA (Tian et al., NeurIPS 2025): REPA at the centre of SiT-down's 8x8 middle stage,
the projector's MLP before a x2 upsampling, plus the manifold loss (methods.md section 4).

    L = L_v + lambda * (L_REPA + w * L_ML),  lambda 0.25, w 3
    L_ML = mean_{i, j} (cos(y_i, y_j) - cos(h_i, h_j))^2 over every token pair of the
           micro-batch (or per-sample mean tokens: align.manifold_pooled)
"""

from __future__ import annotations

import torch

from ..losses import manifold_loss, repa_loss
from .base import Method, register


@register
class URepa(Method):
    name = "urepa"

    def align_terms(self, h: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        repa = repa_loss(h, y)
        ml = manifold_loss(h, y, pooled=self.align.manifold_pooled)
        return {"loss_repa": repa, "loss_ml": ml,
                "align": repa + self.align.manifold_weight * ml}
