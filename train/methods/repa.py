"""REPA (Yu et al., ICLR 2025): the hidden state of block k, projected by an MLP, aligned
token by token with the teacher's patch tokens (methods.md section 3).

    L = L_v + lambda * L_REPA,  L_REPA = - mean_{b, n} cos(proj(h_k)_bn, y_bn)
    k = 8 (L, XL), 4 (B); lambda = 0.5; the objective is the base class's
"""

from __future__ import annotations

from .base import Method, register


@register
class REPA(Method):
    name = "repa"
