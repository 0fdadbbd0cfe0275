"""SiT (Ma et al. 2024) as REPA trains it: a DiT backbone on SD-VAE latents, read top to bottom.

    latent [B, 4, 32, 32] -> 2x2 patches -> 256 tokens + fixed 2-D sin-cos positions
    condition c = TimestepEmbed(t in [0, 1]) + LabelEmbed(y; 1000 = null class)
    N x adaLN-Zero blocks (attention + GELU-tanh MLP, each gated by c)
    final adaLN layer -> [B, 4, 32, 32] velocity

Sizes (methods.md section 2; "GFLOPs" in the DiT papers are forward multiply-adds at
256 px): B/2 130M 23.0, L/2 458M 80.8, XL/2 675M 118.6. `forward` can also return the
hidden state output by block k (1-indexed), which REPA projects onto the teacher tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..archs import SIT_SIZES  # noqa: F401  (the sizes, kept torch-free there)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def unpatchify(x: torch.Tensor, patch: int, channels: int, grid: int) -> torch.Tensor:
    """[B, grid*grid, p*p*C] tokens (row-major patches, each p x p x C) -> [B, C, H, W]."""
    b = x.shape[0]
    x = x.view(b, grid, grid, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, grid * patch, grid * patch)             # [B, C, H, W]


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """MAE-style fixed 2-D positions [grid*grid, dim]: the first half of the channels
    encodes the column, the second half the row; each half is sin then cos of
    position * 10000^(-k / (dim/4))."""
    assert dim % 4 == 0, "sin-cos positions need a width divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")

    def embed(pos: torch.Tensor) -> torch.Tensor:
        ang = pos.reshape(-1, 1) * omega                                  # [N, dim/4]
        return torch.cat([ang.sin(), ang.cos()], dim=1)                   # [N, dim/2]
    return torch.cat([embed(cols), embed(rows)], dim=1).float()           # [N, dim]


class TimestepEmbedder(nn.Module):
    """t in [0, 1] (raw, no x1000) -> 256-dim sinusoid (cos half, then sin half) -> MLP."""

    def __init__(self, dim: int, freq_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period)
                          * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]                            # [B, 128]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)        # [B, 256]
        return self.mlp(emb.to(self.mlp[0].weight.dtype))                  # [B, D]


class LabelEmbedder(nn.Module):
    """Class table with one extra row, the null class (index num_classes), used when a
    label is dropped (p = 0.1 in training) and for the unconditional branch of CFG."""

    def __init__(self, num_classes: int, dim: int, dropout: float = 0.1):
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor, train: bool, drop: torch.Tensor | None = None
                ) -> torch.Tensor:
        """`drop` [B] bool: the labels to replace by the null class in training; drawn
        here with probability `dropout` when not given."""
        if train and self.dropout > 0:
            if drop is None:
                drop = torch.rand(y.shape, device=y.device) < self.dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.table(y)                                               # [B, D]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, *, logits_from: int | None = None):
        """Fused SDPA by default. `logits_from` = p: the same attention spelled out,
        softmax(q k^T / sqrt(hd)) v, and also its pre-softmax logits among the tokens
        from p on (the grid, without p prefix tokens) [B, H, N - p, N - p]."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if logits_from is None:
            x = F.scaled_dot_product_attention(q, k, v)                    # [B, H, N, D/H]
            return self.proj(x.transpose(1, 2).reshape(b, n, d))           # [B, N, D]
        x, logits = explicit_attention(q, k, v)
        return (self.proj(x.transpose(1, 2).reshape(b, n, d)),
                logits[:, :, logits_from:, logits_from:])


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(hd)) v with the logits kept: what SDPA computes, for blocks
    whose attention map a method reads. q, k, v [B, H, N, hd] -> out, logits [B, H, N, N]."""
    logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5               # [B, H, N, N]
    return logits.softmax(dim=-1).to(v.dtype) @ v, logits


class SiTBlock(nn.Module):
    """adaLN-Zero: c -> shift/scale/gate for attention and MLP; LayerNorms without affine."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, logits_from: int | None = None):
        """The new tokens; with `logits_from` (see Attention) also the attention logits."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        a = self.attn(modulate(self.norm1(x), shift1, scale1), logits_from=logits_from)
        a, logits = a if logits_from is not None else (a, None)
        x = x + gate1.unsqueeze(1) * a
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x if logits_from is None else (x, logits)


def check_attn_logits(attn_logits, depth: int) -> tuple[int, ...]:
    """The blocks (1-indexed) whose attention logits a forward returns, checked."""
    blocks = tuple(int(k) for k in attn_logits)
    bad = [k for k in blocks if not 1 <= k <= depth]
    if bad:
        raise ValueError(f"attn_logits: blocks {bad} outside 1..{depth}")
    return blocks


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def features(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The modulated final norm of every token, before the output projection."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return modulate(self.norm(x), shift, scale)                        # [B, N, D]

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x, c))                            # [B, N, p*p*C]


def head_out(final_layer: FinalLayer, h: torch.Tensor, c: torch.Tensor, prefix: int
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The final layer on the grid tokens of h, and the normed prefix tokens (the first
    `prefix`, which a method's own head reads) or None without them."""
    if not prefix:
        return final_layer(h, c), None
    f = final_layer.features(h, c)
    return final_layer.linear(f[:, prefix:]), f[:, :prefix]


def logits_tail(attn_logits, want: tuple[int, ...], logits: dict[int, torch.Tensor]
                ) -> tuple:
    """What a forward appends to its return value: () when attn_logits is None, else
    (the computed logits in the order asked,) (a block asked twice appears twice)."""
    if attn_logits is None:
        return ()
    return ([logits[k] for k in want if k in logits],)


def initialize_sit_weights(model: nn.Module) -> None:
    """SiT's initialisation (also SiT-down's): Xavier-uniform linears, and convs as
    linears, with zero bias; label table and timestep MLP N(0, 0.02); every adaLN output
    and the final projection zero, so each block starts as the identity and the model
    starts by predicting v = 0."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            nn.init.zeros_(m.bias)
    nn.init.normal_(model.y_embedder.table.weight, std=0.02)
    for layer in (model.t_embedder.mlp[0], model.t_embedder.mlp[2]):
        nn.init.normal_(layer.weight, std=0.02)
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    for layer in (model.final_layer.adaLN_modulation[-1], model.final_layer.linear):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


class SiT(nn.Module):
    def __init__(self, *, depth: int, dim: int, heads: int, patch: int = 2,
                 latent_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
                 label_dropout: float = 0.1, mlp_ratio: float = 4.0, align_depth: int = 8,
                 checkpointing: bool = False):
        super().__init__()
        self.patch, self.in_channels, self.dim = patch, in_channels, dim
        self.default_align_depth, self.checkpointing = align_depth, checkpointing
        self.grid = latent_size // patch
        self.x_embedder = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = LabelEmbedder(num_classes, dim, label_dropout)
        self.register_buffer("pos_embed", sincos_pos_embed(dim, self.grid)[None],
                             persistent=False)                             # [1, N, D]
        self.blocks = nn.ModuleList(SiTBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(dim, patch, in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        initialize_sit_weights(self)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.patch, self.in_channels, self.grid)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *,
                align_depth: int | None = None, label_drop: torch.Tensor | None = None,
                prefix: torch.Tensor | None = None, stop_after: int | None = None,
                attn_logits: tuple[int, ...] | None = None) -> tuple:
        """x [B, C, H, W] noisy latent, t [B] in [0, 1], y [B] labels (num_classes = null;
        a method may swap y_embedder for another condition). Returns the velocity
        [B, C, H, W] and, if align_depth = k, the hidden state output by block k
        (1-indexed) [B, N, D].

        A method's hooks: `prefix` [B, P, D] tokens are prepended to the patch tokens with
        a zero position (REG's CLS token); the return value is then (velocity, hidden,
        the prefix tokens' normed final features [B, P, D]) and hidden has P + N tokens.
        `stop_after` = k returns (None, hidden) after block k (ERW's truncated warm-up).

        `attn_logits` = (k1, k2, ...) (1-indexed blocks; HASTE): one more element is
        appended to whatever the call returns otherwise, the list of those blocks'
        pre-softmax attention logits q k^T / sqrt(head_dim), [B, heads, N, N] each in the
        order asked, over the N grid tokens only (prefix tokens' rows and columns cut
        away; they still take part in the attention itself): (v, hidden, logits) or
        (v, hidden, prefix_features, logits), and (None, hidden, logits) with stop_after
        (logits of blocks past stop_after are then not computed: the list is shorter).
        Those blocks run softmax(logits) v spelled out instead of the fused kernel (the
        same values); under checkpointing they are checkpointed like the others and
        recompute their logits in the backward pass. None (not ()) returns the usual tuple."""
        want = check_attn_logits(attn_logits or (), len(self.blocks))
        logits: dict[int, torch.Tensor] = {}
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # [B, N, D]
        p = 0 if prefix is None else prefix.shape[1]
        if p:
            h = torch.cat([prefix.to(h.dtype), h], dim=1)                  # [B, P + N, D]
        c = self.t_embedder(t) + self.y_embedder(y, self.training, label_drop)  # [B, D]
        hidden = None
        for k, block in enumerate(self.blocks, start=1):
            args = (h, c) + ((p,) if k in want else ())
            if self.checkpointing and self.training:
                h = checkpoint(block, *args, use_reentrant=False)
            else:
                h = block(*args)
            if k in want:
                h, logits[k] = h
            if k == align_depth:
                hidden = h
            if k == stop_after:
                return (None, hidden) + logits_tail(attn_logits, want, logits)
        out, pre = head_out(self.final_layer, h, c, p)
        return ((self.unpatchify(out), hidden) + ((pre,) if p else ())
                + logits_tail(attn_logits, want, logits))
