"""Model registry: plain dicts of sizes, one architecture per file."""

from __future__ import annotations

import torch.nn as nn

from .projector import Projector
from .sit import SIT_SIZES, SiT
from .sit_down import SIT_DOWN_SIZES, SiTDown

ARCHS: dict[str, tuple[type[nn.Module], dict]] = {
    **{name: (SiT, kw) for name, kw in SIT_SIZES.items()},
    **{name: (SiTDown, kw) for name, kw in SIT_DOWN_SIZES.items()},
}


def build_model(arch: str, **kwargs) -> nn.Module:
    """`arch` from ARCHS; kwargs: latent_size, in_channels, num_classes, label_dropout,
    checkpointing."""
    if arch not in ARCHS:
        raise ValueError(f"unknown model {arch!r}; choose one of {sorted(ARCHS)}")
    cls, size = ARCHS[arch]
    return cls(**size, **kwargs)


def num_blocks(arch: str) -> int:
    size = ARCHS[arch][1]
    return sum(size["stages"]) if "stages" in size else size["depth"]


__all__ = ["ARCHS", "Projector", "SiT", "SiTDown", "build_model", "num_blocks"]
