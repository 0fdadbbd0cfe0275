"""GMem (arXiv 2412.08781, LINs-lab/GMem): condition on the sample's own DINOv2 CLS token
instead of its class label, and sample from a memory bank of the training set's CLS
tokens (methods.md sections 6 and 6b).

    c_cls = cls / max(||cls||_2, 1e-12)                       [B, D]  at load, fp32
    e     = Linear(D -> hidden)(m * c_cls / (1 - p))          m ~ Bernoulli(1 - p) per element
            (training; at eval e = Linear(c_cls)), p = method_args.cond_dropout = 0.4
    c     = TimestepEmbed(t) + e                              (replaces LabelEmbed(y))
    L     = L_v + lambda * L_REPA,  REPA at block 4, lambda 0.5 (the preset)

The order is the official code's: the CLS is L2-normalised in the training step, then the
model's FeatureEmbedder applies nn.Dropout(0.4) (inverted: kept elements x 1/(1-p)) to
the 768-d input, then the Linear; that Linear is initialised like every other linear of
the model (Xavier-uniform weight, zero bias), which is what this file does. Here the
condition module replaces the backbone's `y_embedder` (same call signature (y, train,
drop)), so the backbone, its EMA and `train sample` need nothing else; `y` is the
normalised CLS [B, D] and `drop` the element-wise mask [B, D] (True = zeroed).

Draws: the common ones (posterior noise, t, path noise, label drop), then the dropout
mask, uniform [B, D] < p, from the same per-stream generator: runs are stream-
deterministic and resumes bit-exact. The common per-sample label drop (`drop`,
model.label_dropout) is drawn, so the other draws stay those of every method, but NOT
USED: no label reaches the model, and the element-wise dropout takes its place.

Sampling (`train sample --bank`, the training previews): block b's conditions are rows
of the bank, N rows = the training cache's valid samples in index order (view 0),
drawn uniformly as the block generator's first draw, L2-normalised. The bank is a file
of `pipeline bank CACHE OUT` (cache/bank.py) or the cache itself (`--bank` defaults to
the training cache). The null condition of CFG is the all-zero vector, as in the
official code; the element-wise dropout zeroes all D inputs with probability p^D
(0.4^768 ~ 1e-306), so the unconditional branch is effectively never trained and
guidance extrapolates from an untrained point (the paper's FIDs are without CFG).
Internally a condition is one float64 row [bank row, c_cls (D)]: the row number gives
the labels (samples.npz arr_1: the bank rows' class labels); the model sees c_cls.

Not the paper's setup: GMem trains LightningDiT-XL/1 (SwiGLU, RoPE, RMSNorm) on VA-VAE
f16d32 latents with log-normal t, a velocity cosine loss, batch 1024, lr 2e-4, beta2
0.95; this is GMem on SD-VAE latents and SiT-XL/2 with REPA's settings (batch 256,
AdamW 1e-4, uniform t). Paper, without CFG: FID 7.66 in < 28 epochs, 1.53 at 160 epochs.
Its loader flips latent, tokens and CLS with three independent coins; ours picks one
view per sample for all its fields (cache/loader.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cache.format import CLS, TOKENS, CacheError

from .base import Method, Sampling, register


@dataclass
class GMemArgs:
    cond_dropout: float = 0.4       # p of the element-wise Dropout on the CLS input (paper)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.cond_dropout) and 0 <= self.cond_dropout < 1):
            raise ValueError(f"cond_dropout={self.cond_dropout!r}: must be in [0, 1) (GMem "
                             "uses 0.4)")


class ClsEmbedder(nn.Module):
    """GMem's condition in place of the label table: element-wise inverted dropout on the
    normalised CLS [B, D], then Linear(D -> hidden)."""

    def __init__(self, in_dim: int, dim: int, dropout: float):
        super().__init__()
        self.in_dim, self.dropout = in_dim, dropout
        self.linear = nn.Linear(in_dim, dim)
        nn.init.xavier_uniform_(self.linear.weight)       # the official _basic_init
        nn.init.zeros_(self.linear.bias)

    def forward(self, y: torch.Tensor, train: bool, drop: torch.Tensor | None = None
                ) -> torch.Tensor:
        """y [B, D] L2-normalised CLS tokens; `drop` [B, D] bool: the elements to zero in
        training (drawn here with probability `dropout` when not given)."""
        if y.ndim != 2 or y.shape[1] != self.in_dim:
            raise ValueError(f"GMem's condition is [B, {self.in_dim}] CLS tokens, got "
                             f"{list(y.shape)} (a class label? align.method=gmem needs the "
                             "cache's cls field)")
        y = y.to(self.linear.weight.dtype)
        if train and self.dropout > 0:
            if drop is None:
                drop = torch.rand(y.shape, device=y.device) < self.dropout
            y = y.masked_fill(drop, 0.0) / (1.0 - self.dropout)            # [B, D]
        return self.linear(y)                                               # [B, hidden]


@register
class GMem(Method):
    """REPA with the sample's CLS token as the condition (see the module docstring)."""
    name = "gmem"
    Args = GMemArgs
    fields = (TOKENS, CLS)
    sample_options = ("bank",)

    def check_cache(self, spec, arch: str, latent_size: int) -> list[str]:
        errors = super().check_cache(spec, arch, latent_size)
        f = spec.fields.get(CLS)
        if f is None:
            errors.append(f"GMem condition: the cache stores no {CLS!r} field (the teacher's "
                          "CLS token); encode one that does")
        elif f.shape[-1] != self.align.teacher_dim:
            errors.append(f"GMem condition width: cache CLS tokens are {f.shape[-1]}-d vs "
                          f"align.teacher_dim={self.align.teacher_dim} (the condition "
                          "embedder's input)")
        return errors

    # ------------------------------------------------------------------ the model
    def extend(self, net: nn.Module) -> None:
        net.y_embedder = ClsEmbedder(self.align.teacher_dim, net.dim, self.args.cond_dropout)

    # ------------------------------------------------------------------ training
    def draws(self, n: int, moments_shape: tuple[int, ...], *,
              generator: torch.Generator | None = None, device=None) -> dict[str, torch.Tensor]:
        """The common draws (their label drop unused), then the CLS dropout mask [n, D]."""
        d = super().draws(n, moments_shape, generator=generator, device=device)
        d["cond_drop"] = torch.rand((n, self.align.teacher_dim), generator=generator,
                                    device=device) < self.args.cond_dropout     # [n, D]
        return d

    def condition(self, batch: dict[str, torch.Tensor], d: dict[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The L2-normalised CLS token [B, D] and its element-wise dropout mask."""
        return F.normalize(batch[CLS].float(), p=2, dim=1), d["cond_drop"]

    # ------------------------------------------------------------------ sampling
    def sampling(self, net: nn.Module, settings, *, num_classes: int,
                 dtype: torch.dtype, cache: str | None = None) -> Sampling:
        """Conditions from `settings.bank`, by default the training `cache` itself."""
        from cache.bank import open_bank

        from ..generate import SampleError   # here: train.generate imports this package
        path = settings.bank or cache
        if not path:
            raise SampleError("GMem samples from a bank of CLS tokens: pass --bank FILE "
                              "(`pipeline bank CACHE OUT`) or --bank CACHE_DIR (the "
                              "training cache is no longer recorded or reachable)")
        try:
            bank = open_bank(path)
        except (CacheError, OSError) as e:
            raise SampleError(f"--bank {path}: {e}") from None
        width = net.y_embedder.in_dim
        if bank.dim != width:
            raise SampleError(f"--bank {bank.path}: {bank.dim}-d CLS rows, the model's "
                              f"condition takes {width}-d (align.teacher_dim): a bank of "
                              "another teacher")
        return BankSampling(net, settings, bank=bank, source=path, num_classes=num_classes,
                            dtype=dtype, interval=self.guidance_interval)

    def describe(self, net: nn.Module) -> str:
        return (f"gmem (CLS condition, dropout {self.args.cond_dropout}), REPA at block "
                f"{self.depth(net)}")


class BankSampling(Sampling):
    """Conditions are bank rows: [row, c_cls] float64 [n, 1 + D] (see the module
    docstring); the null condition is c_cls = 0."""

    def __init__(self, net: nn.Module, settings, *, bank, source: str, num_classes: int,
                 dtype: torch.dtype, interval: tuple[float, float]):
        super().__init__(net, settings, num_classes=num_classes, dtype=dtype,
                         interval=interval)
        self.bank, self.source = bank, source

    def record(self) -> dict[str, Any]:
        """The bank as given (--bank, or the training cache by default) and its digest."""
        return {"bank": self.source, "bank_identity": self.bank.identity()}

    def condition(self, generator: torch.Generator, n: int) -> torch.Tensor:
        rows = torch.randint(self.bank.rows, (n,), generator=generator,
                             device=generator.device)                       # [n], 1st draw
        cls = torch.from_numpy(self.bank.cls(rows.cpu().numpy())).to(generator.device)
        cls = F.normalize(cls.float(), p=2, dim=1)                          # [n, D]
        return torch.cat([rows[:, None].double(), cls.double()], dim=1)     # [n, 1 + D]

    def labels(self, cond: torch.Tensor) -> torch.Tensor:
        rows = cond[:, 0].long().cpu().numpy()
        return torch.from_numpy(np.ascontiguousarray(self.bank.labels(rows)))

    def null(self, cond: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(cond)                                        # c_cls = 0
        out[:, 0] = -1                                                      # no bank row
        return out

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return super().forward(x, t, cond[:, 1:].float())                  # c_cls [n, D]
