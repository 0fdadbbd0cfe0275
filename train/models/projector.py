"""Projectors from a student hidden state onto the teacher's token grid (methods.md 3-4).

REPA: a token-wise MLP D -> 2048 -> 2048 -> 768 with SiLU on the output of block k.
U-REPA: the same MLP applied first on the 8x8 middle-stage tokens, then the projected
grid [B, 768, 8, 8] upsampled x2 to the teacher's 16x16 grid (the paper's best ordering:
MLP then upsample 5.72 FID; upsample then MLP 5.84). One module does both: it resizes
only when the hidden grid differs from the teacher's.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..archs import UPSAMPLE_MODES  # noqa: F401  (torch-free there, for the config)


class Projector(nn.Module):
    def __init__(self, dim: int, out_dim: int = 768, hidden: int = 2048,
                 upsample: str = "bilinear"):
        super().__init__()
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample={upsample!r}: choose one of {UPSAMPLE_MODES}")
        self.upsample = upsample
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, out_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, h: torch.Tensor, out_tokens: int, prefix: int = 0) -> torch.Tensor:
        """h [B, N, D] student tokens -> [B, out_tokens, out_dim] on the teacher's grid.
        The first `prefix` tokens (a method's extra tokens, e.g. REG's CLS) are on no grid:
        projected, never resized."""
        z = self.mlp(h)                                                    # [B, N, out_dim]
        b, n, d = z.shape
        if n == out_tokens:
            return z
        g, g_out = math.isqrt(n - prefix), math.isqrt(out_tokens - prefix)
        grid = z[:, prefix:].transpose(1, 2).reshape(b, d, g, g)           # [B, out_dim, g, g]
        kw = {} if self.upsample == "nearest" else {"align_corners": False}
        grid = F.interpolate(grid, size=(g_out, g_out), mode=self.upsample, **kw)
        return torch.cat([z[:, :prefix], grid.flatten(2).transpose(1, 2)], dim=1)
