"""Plain SiT (Ma et al. 2024): flow matching only, no teacher (`align.method: none`).

    L = L_v;  reads moments and labels only (teacher columns are never read)
"""

from __future__ import annotations

from .base import Method, register


@register
class Plain(Method):
    """No alignment: the baseline REPA speeds up ~17x."""
    name = "none"
    aligns = False
    fields = ()

    def describe(self, net) -> str:
        return "none (plain flow matching)"
