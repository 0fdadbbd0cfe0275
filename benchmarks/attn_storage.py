"""How to store HASTE's teacher attention targets: bytes against the error of the rebuilt
probabilities (issue 16).

    python benchmarks/attn_storage.py [--images 4] [--blocks 8,9,10,11] [--sharpen 1,8,32]
                                      [--time-batch 256]

HASTE (methods.md sections 6, 6b) distils, for teacher blocks 8-11 (0-indexed) of DINOv2-B,
softmax over the 256 patch keys of the pre-softmax logits (q * d^-0.5) k^T per head, with
the CLS row and column removed. This script runs the real DINOv2-B architecture (timm,
random weights, pos-embed on the 16x16 grid of a 256 px image) once on smooth random
images and once on their horizontal flips (the flipped view). A forward hook on each
chosen block's `attn.qkv` keeps q and k of that same forward (no second pass); the
reference is the fp32 q, k with logits and softmax in float64. Each candidate storage is
then rebuilt to logits (in float64, so only the storage error is measured) and compared:

  qk-*      q (pre-scaled by d^-0.5) and k per head [L, 2, H, T, d]: fp16, bf16,
            float8_e4m3fn (plain cast, and with an fp16 absmax scale per (token, head)),
            int8 with an fp16 absmax scale per (token, head); the same after subtracting
            k's mean over the tokens (per head and dim; exact: it shifts each row's
            logits by one constant, q . mean k, to which the softmax is blind)
  logits-*  the logits [L, H, T, T]: fp16; int8 with an fp16 absmax scale per row; int8
            "centred": per row (l - (max + min) / 2) / s, the shift dropped because the
            softmax does not depend on it (twice the resolution of absmax for free)

Per candidate: bytes per sample (one view), KL(teacher || rebuilt) per row (mean, max),
the max abs error of a probability, on both views. For scale, what *does* change the loss:
KL(teacher || uniform) (the attention term's excess at a uniform student), the KL between
the image's attention and its flip's (mapped back to the same tokens), and between
consecutive blocks. Random-weight attention is near uniform (logits std ~0.3), which
flatters any quantiser, so --sharpen S multiplies the q and k projections (weights and
biases) of every block by sqrt(S) (logits x S); each S gets its own table.
Last, the time to rebuild fp32 logits for a batch of --time-batch samples, all blocks,
on this machine's device (CPU here: GPU numbers need a GPU run of the same command).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.encoders import (IMAGENET_MEAN, IMAGENET_STD, build_teacher,  # noqa: E402
                               teacher_input_size, teacher_pixels, token_grid)

RES = 256
F8 = torch.float8_e4m3fn
F8_MAX = torch.finfo(F8).max   # 448


def smooth_images(n: int, seed: int = 0) -> torch.Tensor:
    """n smooth random images [n, 3, R, R] in 0..255: noise at 4, 8 and 32 px upsampled."""
    g = torch.Generator().manual_seed(seed)
    x = sum(w * F.interpolate(torch.randn(n, 3, s, s, generator=g), size=(RES, RES),
                              mode="bicubic", align_corners=False)
            for s, w in ((4, 1.0), (8, 0.5), (32, 0.25)))
    return (127.5 + 60.0 * x).clamp(0, 255).round()


# ---- candidate storages: an encoder of q and k, or of the logits, and one rebuild ------
def _absmax(x: torch.Tensor, top: float) -> tuple[torch.Tensor, torch.Tensor]:
    """An fp16 scale per last-dim row (as stored) and x divided by it."""
    s = (x.abs().amax(-1, keepdim=True) / top).clamp_min(1e-12).half()
    return s, x / s.to(x.dtype)


def _int8(x):
    s, y = _absmax(x, 127.0)
    return s, y.round().clamp(-127, 127).to(torch.int8)


def _fp8_scaled(x):
    s, y = _absmax(x, F8_MAX)
    return s, y.to(F8)


def _int8_centred(lg):
    return _int8(lg - (lg.amax(-1, keepdim=True) + lg.amin(-1, keepdim=True)) / 2)


CANDIDATES = {   # name: (what is stored, encoder -> tensor or (scale, values))
    "qk-fp16": ("qk", lambda x: x.half()),
    "qk-bf16": ("qk", lambda x: x.bfloat16()),
    "qk-fp8e4m3": ("qk", lambda x: x.to(F8)),
    "qk-fp8e4m3+scale": ("qk", _fp8_scaled),
    "qk-int8+scale": ("qk", _int8),
    "qk-int8+scale,k-centred": ("qk-centred", _int8),
    "logits-fp16": ("logits", lambda x: x.half()),
    "logits-int8+scale": ("logits", _int8),
    "logits-int8-centred": ("logits", _int8_centred),
}


def encode(name: str, q, k, logits) -> list:
    kind, enc = CANDIDATES[name]
    if kind == "qk-centred":   # q.(k - mean_T k) moves a row's logits by one constant
        k = k - k.mean(-2, keepdim=True)
    return [enc(logits)] if kind == "logits" else [enc(q), enc(k)]


def rebuild(stored: list, dtype=torch.float32) -> torch.Tensor:
    deq = [s[0].to(dtype) * s[1].to(dtype) if isinstance(s, tuple) else s.to(dtype)
           for s in stored]
    return deq[0] @ deq[1].transpose(-1, -2) if len(deq) == 2 else deq[0]


def nbytes(stored: list) -> int:
    return sum(t.numel() * t.element_size() for s in stored
               for t in (s if isinstance(s, tuple) else (s,)))


# ---- the teacher's q, k from the same forward ------------------------------------------
def capture_qk(teacher, pixels: torch.Tensor, blocks: list[int]) -> tuple[torch.Tensor, ...]:
    """One forward; q * d^-0.5 and k of the patch tokens, float64 [B, L, H, T, d] each."""
    got, hooks = {}, []
    for b in blocks:
        attn = teacher.blocks[b].attn
        def hook(_m, _i, out, b=b, attn=attn):
            B, N, _ = out.shape
            qkv = out.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
            p = teacher.num_prefix_tokens                 # CLS (+ registers) dropped
            got[b] = (q[:, :, p:] * attn.scale, k[:, :, p:])
        hooks.append(attn.qkv.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            teacher.forward_features(pixels)
    finally:
        for h in hooks:
            h.remove()
    q = torch.stack([got[b][0] for b in blocks], 1).double()
    k = torch.stack([got[b][1] for b in blocks], 1).double()
    return q, k


def sharpen(teacher, factor: float) -> None:
    for blk in teacher.blocks:
        lin, c = blk.attn.qkv, blk.attn.qkv.out_features // 3
        with torch.no_grad():
            lin.weight[:2 * c] *= math.sqrt(factor)
            if lin.bias is not None:
                lin.bias[:2 * c] *= math.sqrt(factor)


def row_kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    return (lp.exp() * (lp - lq)).sum(-1)


def unflip(x: torch.Tensor, g: int) -> torch.Tensor:
    """Attention of the flipped view [..., T, T] re-indexed to the original's tokens."""
    perm = torch.arange(g * g).view(g, g).flip(1).reshape(-1)
    return x[..., perm, :][..., perm]


def measure(teacher, images, blocks, g):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    views = {"normal": images, "flipped": images.flip(-1)}
    res, ref = {}, {}
    for vname, x in views.items():
        q, k = capture_qk(teacher, teacher_pixels(x, mean, std, teacher_input_size(RES)),
                          blocks)
        for i in range(len(x)):                    # one sample at a time: [L, H, T, d]
            lg = q[i] @ k[i].transpose(-1, -2)     # the reference logits, float64
            lp = lg.log_softmax(-1)
            ref.setdefault(vname, []).append(lp)
            for name in CANDIDATES:
                stored = encode(name, q[i], k[i], lg)
                lq = rebuild(stored, torch.float64).log_softmax(-1)
                r = res.setdefault((name, vname), dict(kl=[], err=0.0, bytes=nbytes(stored)))
                r["kl"].append(row_kl(lp, lq).flatten())
                r["err"] = max(r["err"], (lp.exp() - lq.exp()).abs().max().item())
    lp = torch.stack(ref["normal"])                # [n, L, H, T, T]
    scale = {
        "H(teacher) nats (log 256 = 5.55)": -(lp.exp() * lp).sum(-1),
        "max prob": lp.exp().amax(-1),
        "KL(teacher || uniform)": math.log(g * g) + (lp.exp() * lp).sum(-1),
        "KL(image || its flip)": row_kl(lp, unflip(torch.stack(ref["flipped"]), g)),
    }
    if len(blocks) > 1:
        scale["KL(block || next block)"] = row_kl(lp[:, :-1], lp[:, 1:])
    return res, scale


def time_rebuild(blocks, heads, g, d, batch, device) -> dict[str, float]:
    """Seconds to rebuild fp32 logits [batch, H, T, T] of every block from each storage
    (values random: speed does not depend on them), block by block as a trainer would."""
    T, out = g * g, {}
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(batch, heads, T, d, generator=gen) * 0.1 for _ in range(2))
    lg = torch.randn(batch, heads, T, T, generator=gen)
    for name in CANDIDATES:
        stored = [tuple(t.to(device) for t in s) if isinstance(s, tuple) else s.to(device)
                  for s in encode(name, q, k, lg)]
        rebuild(stored)                                      # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in blocks:
            rebuild(stored)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[name] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--blocks", default="8,9,10,11", help="0-indexed teacher blocks")
    ap.add_argument("--sharpen", default="1,8,32", help="logit multipliers, one table each")
    ap.add_argument("--time-batch", type=int, default=256, help="0: skip the timing")
    a = ap.parse_args()
    blocks = [int(b) for b in a.blocks.split(",")]
    g = token_grid(RES)
    teacher = build_teacher("dinov2-b", resolution=RES, random_weights=True)
    heads, d = teacher.blocks[0].attn.num_heads, teacher.blocks[0].attn.head_dim
    base = {i: (b.attn.qkv.weight.clone(), b.attn.qkv.bias.clone())
            for i, b in enumerate(teacher.blocks)}
    images = smooth_images(a.images)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; DINOv2-B (timm, random "
          f"weights), {RES} px, blocks {blocks}, {heads} heads x {g * g} tokens x d {d}, "
          f"{a.images} images + their flips")
    for s in (float(x) for x in a.sharpen.split(",")):
        for i, b in enumerate(teacher.blocks):
            with torch.no_grad():
                b.attn.qkv.weight.copy_(base[i][0])
                b.attn.qkv.bias.copy_(base[i][1])
        sharpen(teacher, s)
        res, scale = measure(teacher, images, blocks, g)
        print(f"\n## sharpen {s:g}: the teacher's attention (rows of all blocks, heads, "
              "images), mean / max")
        for k, v in scale.items():
            print(f"  {k:34s} {v.mean().item():10.3g} / {v.max().item():.3g}")
        print(f"\n| {'storage':23s} | bytes/sample | MiB | KL mean normal | KL max normal "
              "| max abs err normal | KL mean flipped | KL max flipped | max abs err flipped |")
        print("|" + "---|" * 9)
        for name in CANDIDATES:
            nb = res[name, "normal"]["bytes"]
            cells = []
            for v in ("normal", "flipped"):
                r = res[name, v]
                kl = torch.cat(r["kl"])
                cells += [f"{kl.mean().item():.2e}", f"{kl.max().item():.2e}",
                          f"{r['err']:.2e}"]
            print(f"| {name:23s} | {nb:12,d} | {nb / 2**20:.3f} | " + " | ".join(cells) + " |")
    if a.time_batch:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        print(f"\n## rebuild fp32 logits [{a.time_batch}, {heads}, {g * g}, {g * g}] x "
              f"{len(blocks)} blocks on {dev.type}"
              + ("" if dev.type == "cuda" else " (no GPU here: rerun on one for GPU times)"))
        for name, t in time_rebuild(blocks, heads, g, d, a.time_batch, dev).items():
            print(f"  {name:23s} {t:8.3f} s")


if __name__ == "__main__":
    main()
