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


def size_and_gmacs(arch: str, latent_size: int = 32) -> tuple[int, float]:
    """(parameters, forward GMACs per image) of a model, counted on the meta device (no
    memory, no init cost) with torch's FlopCounterMode; the DiT papers call these GMACs
    "GFLOPs"."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = build_model(arch, latent_size=latent_size).eval()
        x, t = torch.randn(1, 4, latent_size, latent_size), torch.rand(1)
        y = torch.zeros(1, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x, t, y)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() / 2e9


def num_blocks(arch: str) -> int:
    size = ARCHS[arch][1]
    return sum(size["stages"]) if "stages" in size else size["depth"]


__all__ = ["ARCHS", "Projector", "SiT", "SiTDown", "build_model", "num_blocks", "size_and_gmacs"]
