"""HASTE (Wang et al., arXiv 2505.16792): REPA plus distillation of the teacher's attention
maps, both ended at a fixed step tau (methods.md sections 6 and 6b).

    s < tau:   L = L_v + lambda * L_REPA(proj(h_k), y) + lambda_A * L_attn
    s >= tau:  L = L_v                     (nothing of the teacher is read any more)

    L_attn = mean over layer pairs (t_l -> s_l), heads h < H, rows i of
             - sum_j softmax(q_h k_h^T)_ij * log_softmax(S_{s_l, h})_ij
             q, k: teacher block t_l's per-head q * head_dim^-0.5 and k over the patch
             tokens (CLS row and column removed), read from the cache (`attn_qk`);
             S: the student's pre-softmax logits of block s_l, its first H heads (H = the
             teacher's heads); fp32 log-softmax
    lambda 0.5 (align.weight), lambda_A 0.5 (method_args.attn_weight);
    L/XL: teacher blocks 8-11 -> student blocks 4-7, k = 8, tau = 250K;
    B:    teacher blocks 7, 9, 11 -> student blocks 2, 3, 4, k = 5, tau = 100K

Block numbers in method_args are 0-indexed, as in HASTE's code and `pipeline encode
--teacher-attn`; align.depth (k) is 1-indexed as for every method. `s` is the 0-based
index of the step being computed. Only the mapped student blocks spell their attention
out (their logits are kept for the loss); every other block, and every block after tau,
uses fused attention.

Termination: from step tau on, `fields_at` drops the teacher columns (tokens and
attn_qk), so the loop hands the loader's position to one that reads moments and labels
only (3 MiB of q, k per sample less at 256 px); the forward no longer returns hidden
states or logits; the projector gets no gradient (hence `partial_graph` for DDP). The
optimizer and EMA go on unchanged, as in HASTE's code (no phase change).
Sampling is REPA's; HASTE's evaluation script guides with cfg 1.65 on t in [0.01, 0.72].

`urepa-haste`, a composition no paper has tried: U-REPA's SiT-down with its manifold loss
(lambda * (L_REPA + w * L_ML) at the middle stage) plus HASTE's attention term and tau.
Only student blocks on a 16x16 stage (SiT-down's first or last stage) can take a
teacher's map: they see the same 256 tokens in the same order. A middle-stage block has
64 queries over 64 keys, with no one-to-one rows; pooling the teacher's map would be a
new method, so such a mapping is refused (check_cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from cache.format import ATTN, MOMENTS, TOKENS

from ..losses import attention_loss, flow_loss, interpolate
from ..models import ARCHS, num_blocks
from .base import Method, posterior_sample, register
from .urepa import URepa


@dataclass
class HasteArgs:
    """HASTE's options (`method_args.<name>`); lambda is align.weight, k align.depth."""
    teacher_blocks: list[int] = field(default_factory=lambda: [8, 9, 10, 11])  # 0-indexed
    student_blocks: list[int] = field(default_factory=lambda: [4, 5, 6, 7])    # 0-indexed
    attn_weight: float = 0.5            # lambda_A
    tau: int | None = 250_000           # the first step without alignment; null: never

    def __post_init__(self) -> None:
        t, s = list(self.teacher_blocks), list(self.student_blocks)
        if not t or len(t) != len(s):
            raise ValueError(f"teacher_blocks={t}, student_blocks={s}: one student block "
                             "per teacher block, at least one pair (HASTE: 8,9,10,11 -> "
                             "4,5,6,7)")
        if min(t + s) < 0 or len(set(s)) != len(s):
            raise ValueError(f"teacher_blocks={t}, student_blocks={s}: blocks are 0-indexed "
                             "(>= 0), each student block at most once")
        if not (math.isfinite(self.attn_weight) and self.attn_weight >= 0):
            raise ValueError(f"attn_weight={self.attn_weight}: must be a finite number >= 0")
        if self.tau is not None and self.tau < 0:
            raise ValueError(f"tau={self.tau}: must be >= 0 (the first step without "
                             "alignment), or null for no termination")


@register
class HASTE(Method):
    """REPA plus attention distillation, both terminated at tau (module docstring)."""
    name = "haste"
    Args = HasteArgs
    fields = (TOKENS, ATTN)
    partial_graph = True                  # after tau the projector has no gradient
    guidance_interval = (0.01, 0.72)      # HASTE's scripts/test.sh (cfg 1.65)

    def __init__(self, align, args, model):
        super().__init__(align, args, model)
        self.attn_index: slice | list[int] | None = None   # rows of attn_qk (use_cache)

    def aligning(self, step: int) -> bool:
        """Whether step `step` (0-based) still has the alignment terms."""
        return self.args.tau is None or step < self.args.tau

    def fields_at(self, step: int) -> tuple[str, ...]:
        return self.fields if self.aligning(step) else ()

    # ------------------------------------------------------------------ the cache
    def check_cache(self, spec, arch: str, latent_size: int) -> list[str]:
        errors = super().check_cache(spec, arch, latent_size)
        a = self.args
        blocks, size = num_blocks(arch), ARCHS[arch][1]
        wrong = [b for b in a.student_blocks if b >= blocks]
        if wrong:
            errors.append(f"method_args.student_blocks {wrong}: {arch} has blocks "
                          f"0..{blocks - 1} (0-indexed)")
        if "stages" in size:   # SiT-down: only the 16x16 stages see the teacher's grid
            n1, n2, _ = size["stages"]
            middle = [b for b in a.student_blocks if n1 <= b < n1 + n2]
            if middle:
                errors.append(
                    f"method_args.student_blocks {middle}: {arch}'s blocks {n1}..{n1 + n2 - 1}"
                    f" (0-indexed) form its middle stage, on a grid of half the teacher's "
                    "side, with no one-to-one attention rows to distil; map the teacher "
                    f"blocks onto its first stage (0..{n1 - 1}) or last stage "
                    f"({n1 + n2}..{blocks - 1})")
        if not spec.attn_blocks:
            return errors + [f"{self.name} reads the teacher's attention (attn_qk), which "
                             "this cache does not hold: encode one with `pipeline encode ... "
                             f"--teacher-attn {','.join(map(str, a.teacher_blocks))}`"]
        missing = [b for b in a.teacher_blocks if b not in spec.attn_blocks]
        if missing:
            errors.append(f"method_args.teacher_blocks {missing}: the cache holds the "
                          f"attention of teacher blocks {list(spec.attn_blocks)} only")
        if spec.attn_heads > size["heads"]:
            errors.append(f"the cache's teacher has {spec.attn_heads} heads, {arch} "
                          f"{size['heads']}: each teacher head needs a student head")
        return errors

    def use_cache(self, spec) -> None:
        rows = [spec.attn_blocks.index(b) for b in self.args.teacher_blocks]
        # consecutive rows (blocks 8-11 of a cache with 7-11): a view, no copy per step
        consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
        self.attn_index = slice(rows[0], rows[-1] + 1) if consecutive else rows

    # ------------------------------------------------------------------ training
    def loss(self, student: nn.Module, batch: dict[str, torch.Tensor],
             d: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        x0 = posterior_sample(batch[MOMENTS], d["eps"], student.latent_scale)
        xt, v = interpolate(x0, d["noise"], d["t"])
        y, drop = self.condition(batch, d)
        if not self.aligning(step):   # fused attention everywhere, no hidden state
            v_pred, _ = student.net(xt, d["t"], y, label_drop=drop)
            out = {"loss_v": flow_loss(v_pred, v)}
            return {**out, "loss": out["loss_v"]}
        if self.attn_index is None:
            raise RuntimeError(f"{self.name}: use_cache(spec) was not called, so the rows "
                               "of the cache's attn_qk field are unknown")
        v_pred, hidden, logits = student.net(
            xt, d["t"], y, align_depth=student.depth, label_drop=drop,
            attn_logits=tuple(b + 1 for b in self.args.student_blocks))
        out = {"loss_v": flow_loss(v_pred, v)}
        qk = batch[ATTN][:, self.attn_index]                     # [B, L, 2, H, T, d]
        heads = qk.shape[3]
        # per layer pair, then their mean (every pair has as many rows): no stacked copy
        # of the student's logits; the mean of per-pair means is the mean over all rows
        out["loss_attn"] = sum(
            attention_loss(lg[:, None, :heads], qk[:, i:i + 1, 0], qk[:, i:i + 1, 1])
            for i, lg in enumerate(logits)) / len(logits)
        total = out["loss_v"] + self.args.attn_weight * out["loss_attn"]
        out.update(self.aligned(student, hidden, batch[TOKENS], step, total))
        return out

    # ------------------------------------------------------------------ description
    def describe(self, net: nn.Module) -> str:
        a = self.args
        pairs = ", ".join(f"{t}->{s}" for t, s in zip(a.teacher_blocks, a.student_blocks))
        end = f"until step {a.tau}" if a.tau is not None else "without termination"
        return (f"{super().describe(net)} + attention distillation (teacher -> student "
                f"blocks, 0-indexed: {pairs}; weight {a.attn_weight:g}), {end}")


@register
class URepaHaste(HASTE):
    """U-REPA's SiT-down and manifold loss with HASTE's attention term and termination."""
    name = "urepa-haste"
    guidance_interval = Method.guidance_interval   # U-REPA's sampling, as urepa
    align_terms = URepa.align_terms
