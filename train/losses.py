"""Objectives (methods.md sections 3-4): flow matching, REPA alignment, U-REPA manifold loss.

    x_t = (1 - t) x0 + t eps,  v = eps - x0,  t ~ U(0, 1)         L_v    = mean (v_pred - v)^2
    L_REPA = - mean_{b, n} cos(h_bn, y_bn)                          (token n with token n)
    L_ML   = mean_{i, j} (cos(y_i, y_j) - cos(h_i, h_j))^2           (all token pairs of the batch)
    L = L_v + lambda * (L_REPA + w * L_ML),  lambda = 0.25, w = 3 by default (U-REPA)
    L_attn = - mean_{b, l, h, i} sum_j softmax(q k^T)_ij log softmax(s)_ij   (HASTE, section 6)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear path: x_t = (1 - t) x0 + t eps (t = 0 data, 1 noise); target v = eps - x0."""
    tt = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - tt) * x0 + tt * eps, eps - x0


def flow_loss(v_pred: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (v_pred.float() - v.float()).pow(2).mean()


def repa_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Negative token-wise cosine of projected student tokens h [B, N, D] and teacher
    tokens y [B, N, D], averaged over samples and tokens."""
    return -F.cosine_similarity(h.float(), y.float(), dim=-1).mean()


def manifold_loss(h: torch.Tensor, y: torch.Tensor, *, pooled: bool = False) -> torch.Tensor:
    """U-REPA's manifold loss: the squared difference of the cosine-similarity (Gram)
    matrices of teacher and student tokens over every token pair of the batch, averaged
    over the (B*N)^2 entries. `pooled=True` compares per-sample mean tokens (B x B).

    Never builds the (B*N)^2 matrices (65536^2 entries at batch 256): with unit rows,
    ||Y Y^T - H H^T||_F^2 = ||Y^T Y||_F^2 - 2 ||Y^T H||_F^2 + ||H^T H||_F^2, three D x D
    products in fp32, exact up to rounding and 27x fewer FLOPs than the pairs at D = 768.
    """
    # fp32 even inside a bf16 autocast region: the three terms nearly cancel once the
    # student is close to the teacher, and bf16 products would swamp the difference
    device = h.device.type if h.device.type != "meta" else "cpu"  # meta: FLOP counting
    with torch.autocast(device, enabled=False):
        if pooled:
            h, y = h.mean(dim=1, keepdim=True), y.mean(dim=1, keepdim=True)
        hn = F.normalize(h.float().flatten(0, 1), dim=-1)                 # [B*N, D]
        yn = F.normalize(y.float().flatten(0, 1), dim=-1)                 # [B*N, D]
        m = hn.shape[0]
        total = ((yn.T @ yn).pow(2).sum() - 2 * (yn.T @ hn).pow(2).sum()
                 + (hn.T @ hn).pow(2).sum())
        return total.clamp_min(0) / (m * m)


def manifold_loss_naive(h: torch.Tensor, y: torch.Tensor, *, pooled: bool = False
                        ) -> torch.Tensor:
    """The definition, materialising both (B*N)^2 Gram matrices (tests, small inputs)."""
    if pooled:
        h, y = h.mean(dim=1, keepdim=True), y.mean(dim=1, keepdim=True)
    hn = F.normalize(h.double().flatten(0, 1), dim=-1)
    yn = F.normalize(y.double().flatten(0, 1), dim=-1)
    return (yn @ yn.T - hn @ hn.T).pow(2).mean()


def attention_loss(student_logits: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                   ) -> torch.Tensor:
    """HASTE's attention distillation (methods.md section 6): token-wise cross-entropy of
    the teacher's attention rows against the student's.

        P = softmax_j(q k^T)      teacher, q [B, L, H, N, d] already scaled by d^-0.5
        S = log_softmax_j(s)      student logits s [B, L, H, N, N] (pre-softmax)
        L_attn = - mean_{b, l, h, i} sum_j P_ij S_ij

    L mapped blocks, the student's first H heads against the teacher's H. Its minimum
    over s is the teacher's mean row entropy, reached at s = q k^T (up to a per-row
    constant). Only the student side carries a gradient, softmax(s) - P per row (over the
    row count); the teacher is detached.

    Memory: autograd keeps s, q and k only (q, k are N/d times smaller than an N x N map);
    the backward rebuilds P and softmax(s) instead of keeping fp32 P and log S from the
    forward (8 bytes per logit, 6 MiB per block and sample for SiT-XL at 256 px:
    benchmarks/attn_memory.py).
    """
    if student_logits.shape[:-1] != q.shape[:-1] or student_logits.shape[-1] != k.shape[-2] \
            or q.shape != k.shape:
        raise ValueError(f"attention_loss: student logits {tuple(student_logits.shape)} vs "
                         f"teacher q {tuple(q.shape)}, k {tuple(k.shape)}")
    # fp32 even inside a bf16 autocast region, as manifold_loss: bf16 logits round
    # softmax rows of 256 keys coarsely, and the loss compares them entry by entry
    with torch.autocast(_autocast_device(student_logits), enabled=False):
        return _AttentionCE.apply(student_logits, q.detach(), k.detach())


def _autocast_device(x: torch.Tensor) -> str:
    return x.device.type if x.device.type != "meta" else "cpu"   # meta: FLOP counting


def _teacher_softmax(q: torch.Tensor, k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(dtype) @ k.to(dtype).transpose(-2, -1)).softmax(dim=-1)  # [..., N, N]


def _wide(s: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.promote_types(s.dtype, torch.float32)


class _AttentionCE(torch.autograd.Function):
    """attention_loss's value and gradient, with nothing of size N x N saved."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(s, q, k)
        p = _teacher_softmax(q, k, _wide(s))
        return -(p * s.to(p.dtype).log_softmax(dim=-1)).sum(dim=-1).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        s, q, k = ctx.saved_tensors
        with torch.autocast(_autocast_device(s), enabled=False):
            d = s.to(_wide(s)).softmax(dim=-1) - _teacher_softmax(q, k, _wide(s))
            rows = d.numel() // d.shape[-1]
            return (d * (grad / rows)).to(s.dtype), None, None
