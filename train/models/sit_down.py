"""SiT-down (U-REPA, Tian et al. 2025): a SiT with one U-Net dip, read top to bottom.

    latent [B, 4, 32, 32] -> 2x2 patches -> 16x16 tokens          (no absolute positions)
    stage 1: n1 blocks on 16x16  ------------------------------.  long skip
    down:    3x3 conv D -> D/4, PixelUnshuffle(2), 3x3 conv D -> D  (8x8, width kept)
    stage 2: n2 blocks on 8x8   <- REPA/U-REPA align here (centre block)
    up:      3x3 conv D -> D, 3x3 conv D -> 4D, PixelShuffle(2)  (16x16)
    skip:    Linear(2D -> D) on [up ; stage-1 output]  <---------'
    stage 3: n3 blocks on 16x16
    out:     3x3 conv D -> D, final adaLN layer -> [B, 4, 32, 32] velocity

Blocks are SiT's adaLN-Zero blocks with 2-D RoPE on q/k and a SwiGLU MLP (hidden 8D/3,
rounded up to a multiple of 64, so FLOPs match SiT's 4D GELU MLP); one condition vector
c = t-embed + label-embed drives every block (methods.md section 4).

The paper gives stage sizes, widths, parameter counts and GFLOPs but no code. The
transitions are ours **[inferred]**: U-DiT's conv-then-shuffle down/up samplers kept at
constant width, the middle stage framed by a 3x3 conv on each side, U-DiT's 3x3 output
conv before the final layer, and a linear long-skip fusion. U-DiT's pieces alone leave
~25*D^2 of the paper's parameters unexplained; the two framing convs (18*D^2, on the 8x8
grid where the paper's extra FLOPs point) close the gap. Sizes (fwd GMACs, the DiT
papers' "GFLOPs", at 256 px) against the paper's table (tests/test_sit_down.py):

    SiT-down-B/2   [5, 5, 5]    768/12   201.9M (paper 199.7M, +1.1%)  25.5 (24.1)
    SiT-down-L/2   [9, 14, 9]  1024/16   681.6M (paper 686.6M, -0.7%)  79.5 (79.3)
    SiT-down-XL/2  [10, 16, 10] 1152/16  955.4M (paper 954.4M, +0.1%) 110.4 (108.8)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..archs import SIT_DOWN_SIZES  # noqa: F401  (the sizes, kept torch-free there)

from .sit import (FinalLayer, LabelEmbedder, TimestepEmbedder, check_attn_logits,
                  explicit_attention, head_out, initialize_sit_weights, logits_tail,
                  modulate, unpatchify)


def rope_2d(head_dim: int, grid: int, *, stride: float = 1.0, offset: float = 0.0,
            theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [grid*grid, head_dim] of 2-D rotary positions. The first half of each head
    rotates with the token's column, the second half with its row; each half is
    (x1, x2) pairs of head_dim/4 channels at frequencies theta^(-k / (head_dim/4)).
    `stride`/`offset` place a coarse grid in fine-grid units (8x8 token (i, j) sits at
    2i + 0.5, 2j + 0.5 of the 16x16 grid), so a distance means the same in every stage."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head width divisible by 4, got {head_dim}")
    q = head_dim // 4
    freqs = theta ** (-torch.arange(q, dtype=torch.float64) / q)
    pos = torch.arange(grid, dtype=torch.float64) * stride + offset
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")
    ax = cols.reshape(-1, 1) * freqs                                       # [N, hd/4]
    ay = rows.reshape(-1, 1) * freqs
    ang = torch.cat([ax, ax, ay, ay], dim=1)                               # [N, hd]
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, hd] rotated pairwise: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    b, h, n, d = x.shape
    xr = x.view(b, h, n, 2, 2, d // 4)                                     # half, pair, k
    rot = torch.stack((-xr[..., 1, :], xr[..., 0, :]), dim=-2).view(b, h, n, d)
    return (x.float() * cos + rot.float() * sin).to(x.dtype)


class RoPEAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                logits_from: int | None = None):
        """Fused SDPA by default; `logits_from` = p as SiT's Attention: spelled out, and
        also the logits (after RoPE) among the tokens from p on [B, H, N - p, N - p]."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)            # [B, H, N, hd]
        if logits_from is None:
            x = F.scaled_dot_product_attention(q, k, v)
            return self.proj(x.transpose(1, 2).reshape(b, n, d))           # [B, N, D]
        x, logits = explicit_attention(q, k, v)
        return (self.proj(x.transpose(1, 2).reshape(b, n, d)),
                logits[:, :, logits_from:, logits_from:])


def swiglu_hidden(dim: int, multiple: int = 64) -> int:
    """8D/3 (FLOPs of a 4D GELU MLP) rounded up to a multiple of 64: B 2048, L 2752, XL 3072."""
    return multiple * math.ceil(8 * dim / 3 / multiple)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)                              # gate and value, fused
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * g)


class SiTDownBlock(nn.Module):
    """SiT's adaLN-Zero block with RoPE attention and a SwiGLU MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = RoPEAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, logits_from: int | None = None):
        """The new tokens; with `logits_from` (see RoPEAttention) also the logits."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        a = self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin,
                      logits_from=logits_from)
        a, logits = a if logits_from is not None else (a, None)
        x = x + gate1.unsqueeze(1) * a
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x if logits_from is None else (x, logits)


def conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1)


def to_grid(h: torch.Tensor) -> torch.Tensor:
    b, n, d = h.shape
    g = math.isqrt(n)
    return h.transpose(1, 2).reshape(b, d, g, g)                           # [B, D, g, g]


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)                                    # [B, g*g, D]


def on_grid(fn, h: torch.Tensor, p: int) -> torch.Tensor:
    """fn (a [B, D, g, g] -> [B, D, g', g'] transition) on the grid tokens of h; the
    first p (prefix) tokens pass unchanged."""
    out = to_tokens(fn(to_grid(h[:, p:])))
    return torch.cat([h[:, :p], out], dim=1) if p else out


def with_prefix(rope: tuple[torch.Tensor, torch.Tensor], p: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables with p leading rows that rotate nothing (cos 1, sin 0): the prefix
    tokens' zero position."""
    if not p:
        return rope
    cos, sin = rope
    return (torch.cat([cos.new_ones(p, cos.shape[1]), cos]),
            torch.cat([sin.new_zeros(p, sin.shape[1]), sin]))


class SiTDown(nn.Module):
    def __init__(self, *, stages: tuple[int, int, int], dim: int, heads: int, patch: int = 2,
                 latent_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
                 label_dropout: float = 0.1, rope_theta: float = 10000.0,
                 checkpointing: bool = False):
        super().__init__()
        self.patch, self.in_channels, self.dim = patch, in_channels, dim
        self.grid = latent_size // patch
        if len(stages) != 3 or min(stages) < 1:
            raise ValueError(f"SiT-down needs three stages of >= 1 block, got {stages}")
        if self.grid % 2 or dim % 4:
            raise ValueError(f"SiT-down needs an even token grid and a width divisible by 4 "
                             f"(grid {self.grid}, width {dim})")
        self.stages, self.checkpointing = tuple(stages), checkpointing
        self.x_embedder = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = LabelEmbedder(num_classes, dim, label_dropout)
        self.blocks = nn.ModuleList(SiTDownBlock(dim, heads) for _ in range(sum(stages)))
        self.down = nn.Sequential(conv3x3(dim, dim // 4), nn.PixelUnshuffle(2), conv3x3(dim, dim))
        self.up = nn.Sequential(conv3x3(dim, dim), conv3x3(dim, 4 * dim), nn.PixelShuffle(2))
        self.skip = nn.Linear(2 * dim, dim)
        self.out_conv = conv3x3(dim, dim)
        self.final_layer = FinalLayer(dim, patch, in_channels)
        hd = dim // heads
        for name, (cos, sin) in {
                "fine": rope_2d(hd, self.grid, theta=rope_theta),
                "coarse": rope_2d(hd, self.grid // 2, stride=2, offset=0.5, theta=rope_theta),
        }.items():
            self.register_buffer(f"rope_{name}_cos", cos, persistent=False)
            self.register_buffer(f"rope_{name}_sin", sin, persistent=False)
        self.initialize_weights()

    @property
    def default_align_depth(self) -> int:
        """Centre of the middle stage (U-REPA: block 18 of 36 for XL, 8 of 15 for B)."""
        return self.stages[0] + math.ceil(self.stages[1] / 2)

    def initialize_weights(self) -> None:
        initialize_sit_weights(self)  # SiT's, convs initialised like linears

    def _run(self, block: SiTDownBlock, *args):
        if self.checkpointing and self.training:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *,
                align_depth: int | None = None, label_drop: torch.Tensor | None = None,
                prefix: torch.Tensor | None = None, stop_after: int | None = None,
                attn_logits: tuple[int, ...] | None = None) -> tuple:
        """x [B, C, H, W] noisy latent, t [B] in [0, 1], y [B] labels. Returns the velocity
        and, if align_depth = k, the hidden state output by block k (1-indexed) [B, N_k, D]
        (N_k = 64 inside the middle stage at 256 px, else 256).

        `prefix` and `stop_after` as SiT's (a method's hooks). Prefix tokens have no grid
        position: RoPE leaves them unrotated, the down/up convolutions and the output conv
        pass them unchanged, and the long skip fuses each with its stage-1 self through
        the same Linear(2D -> D) as the grid tokens (docs/training.md, composition).

        `attn_logits` as SiT's: the list of the asked blocks' logits (after RoPE, grid
        tokens only) appended last; a middle-stage block's are [B, heads, 64, 64] at
        256 px (8x8 grid), the others' [B, heads, 256, 256]."""
        want = check_attn_logits(attn_logits or (), len(self.blocks))
        logits: dict[int, torch.Tensor] = {}
        n1, n2, _ = self.stages
        p = 0 if prefix is None else prefix.shape[1]
        fine = with_prefix((self.rope_fine_cos, self.rope_fine_sin), p)
        coarse = with_prefix((self.rope_coarse_cos, self.rope_coarse_sin), p)
        h = to_tokens(self.x_embedder(x))                                  # [B, 256, D]
        if p:
            h = torch.cat([prefix.to(h.dtype), h], dim=1)                  # [B, P + 256, D]
        c = self.t_embedder(t) + self.y_embedder(y, self.training, label_drop)  # [B, D]
        hidden = skip = None
        for k, block in enumerate(self.blocks, start=1):
            if k == n1 + 1:                                                # 16x16 -> 8x8
                skip = h
                h = on_grid(self.down, h, p)                               # [B, P + 64, D]
            elif k == n1 + n2 + 1:                                         # 8x8 -> 16x16
                h = on_grid(self.up, h, p)                                 # [B, P + 256, D]
                h = self.skip(torch.cat([h, skip], dim=-1))                # [B, P + 256, D]
            rope = coarse if n1 < k <= n1 + n2 else fine
            h = self._run(block, h, c, *rope, *((p,) if k in want else ()))
            if k in want:
                h, logits[k] = h
            if k == align_depth:
                hidden = h
            if k == stop_after:
                return (None, hidden) + logits_tail(attn_logits, want, logits)
        h = on_grid(self.out_conv, h, p)                                   # [B, P + 256, D]
        out, pre = head_out(self.final_layer, h, c, p)                     # [B, 256, p*p*C]
        v = unpatchify(out, self.patch, self.in_channels, self.grid)
        return (v, hidden) + ((pre,) if p else ()) + logits_tail(attn_logits, want, logits)
