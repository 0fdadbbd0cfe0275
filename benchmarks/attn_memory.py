"""What it costs in training memory for student blocks to return their attention logits
(HASTE, issue 16).

    python benchmarks/attn_memory.py [--archs sit-xl/2,sit-down-xl/2,sit-b/2,sit-down-b/2]
                                     [--batch 2] [--precision fp32,bf16] [--blocks 5,6,7,8]
                                     [--presets 32,256] [--device cpu] [--arithmetic]

About 1.5 min on 2 CPU cores, no GPU needed. `attn_logits=(k, ...)` makes those blocks of
SiT / SiT-down run their attention spelled out (train/models/sit.py explicit_attention:
logits and softmax materialised, [B, heads, N, N]) instead of the fused SDPA kernel, and
return the logits; the cost is what autograd then keeps for the backward pass. For each
backbone (train mode, 256 px: latent 4x32x32, batch --batch) one forward, with the loss
sum(velocity) + sum of each returned logit tensor, runs twice: without attn_logits (every
block fused SDPA) and with attn_logits on the blocks HASTE maps to the teacher (XL: 5-8,
B: 3-5, 1-indexed; --blocks overrides), in fp32 and under a bf16 autocast.

Measured in a torch.autograd.graph.saved_tensors_hooks context: the bytes autograd saves
for backward, each storage once (key: storage data_ptr + size; a saved view counts its
whole storage, which is what stays alive; for a plain tensor that is numel *
element_size). Parameters and buffers are left out (they exist anyway), and so are
autocast's bf16 copies of the weights (batch-independent; printed apart), so what is
left, the activations, grows linearly with the batch, from 2 on (at 1, [1, H, N, d]
reshapes to [H, N, d] as a view and the explicit path's matmuls copy nothing, unlike any
real batch). Weights are never read: the matrix products and convolutions skip their
arithmetic (NoArithmetic: zeros of the kernel's shape, strides and dtype, below autograd,
which saves what it always saves), and the model gets unwritten storage; --arithmetic
initialises it and computes for real, several times slower, with the same bytes. No
backward pass runs.

Printed per backbone and precision: saved activations without and with the logits and
their ratio (also one ratio line); the difference Δ per mapped block per sample, split
into n tensors of [heads, N, N] (the autocast dtype) and the rest; the returned logits
themselves ("held": not saved by the block, but alive until the loss has read them); what
HASTE's loss saves on top (train/losses.py attention_loss on the first 12 heads against a
random DINOv2-B-shaped teacher q, k: the logits it reads, a view of what is held, and q, k;
its backward rebuilds both softmaxes); then all of it scaled linearly to the per-device batches of the presets
(--presets: 32 = HASTE's global 256 over 8 GPUs, 256 = all of it on one device); the
analytic figure heads x N x N x bytes x count per block per sample next to the measured
one, with where the rest comes from; and what the attention of one mapped block saves
with and without logits (shape, dtype, the autograd node that made it, storage size).

CPU baseline vs GPU baseline. torch's fused SDPA on a CPU is its flash kernel
(ScaledDotProductFlashAttentionForCpu, printed): it saves q, k, v (views of the qkv
output), the output and a logsumexp [B, H, N] fp32, no [N, N] tensor, as the GPU's flash
and memory-efficient kernels do, so the baseline is the same in kind. What differs is
the autocast: the CPU's runs softmax in bf16, CUDA's in fp32 (softmax is on its fp32
list), and P @ V then needs a bf16 copy, so on a GPU the explicit block keeps 4 + 2 bytes
per logit instead of the 2 measured here. The analytic GPU lines and the "GPU bf16
estimate" (6 B x [H, N, N] plus the rest as measured; the rest, copies of q, k, v for
the matmuls and a logsumexp, does not depend on the device) account for it;
--device cuda is meant to measure it there the same way (untested: written without a GPU).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.losses import attention_loss  # noqa: E402
from train.models import build_model  # noqa: E402

# HASTE's student blocks (1-indexed) whose attention maps are distilled
MAPPED = {"sit-xl/2": (5, 6, 7, 8), "sit-down-xl/2": (5, 6, 7, 8),
          "sit-l/2": (5, 6, 7, 8), "sit-down-l/2": (5, 6, 7, 8),
          "sit-b/2": (3, 4, 5), "sit-down-b/2": (3, 4, 5)}
TEACHER_HEADS, TEACHER_HEAD_DIM = 12, 64   # DINOv2-B
LATENT = 32                                # 256 px through the SD-VAE
MiB, GiB = 2 ** 20, 2 ** 30
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Record:
    """One storage autograd saved: where it was first saved and what it was."""
    where: str                 # innermost module of the model running at the time
    shape: tuple[int, ...]     # the saved tensor (maybe a view of the storage)
    dtype: torch.dtype
    creator: str               # the autograd node that made it ("-" for no grad)
    nbytes: int                # its storage
    weight_cast: bool          # an autocast copy of a parameter


@dataclass
class Saved:
    records: list[Record] = field(default_factory=list)

    @property
    def act(self) -> int:
        return sum(r.nbytes for r in self.records if not r.weight_cast)

    @property
    def weights(self) -> int:
        return sum(r.nbytes for r in self.records if r.weight_cast)


VIEWS = {"TBackward0", "ViewBackward0", "TransposeBackward0", "PermuteBackward0",
         "ExpandBackward0", "UnsafeViewBackward0", "AliasBackward0"}


def weight_cast(fn) -> bool:
    """Whether a saved tensor made by autograd node `fn` is (a view of) autocast's
    low-precision copy of a parameter (a linear saves weight.t() of the copy)."""
    while fn is not None and fn.name() in VIEWS:
        fn = fn.next_functions[0][0]
    return (fn is not None and fn.name() == "ToCopyBackward0"
            and any(isinstance(getattr(nf, "variable", None), nn.Parameter)
                    for nf, _ in fn.next_functions if nf is not None))


class NoArithmetic(TorchDispatchMode):
    """Matrix products and convolutions without their arithmetic: each returns zeros of
    the shape, strides and dtype its kernel would (worked out on the meta device).
    Autograd sits above this mode, so it records and saves exactly what it would;
    only the values differ, and what is saved does not depend on them. The products are
    nearly all of the forward's time (bf16 GEMMs are slow on CPUs without bf16 units)."""

    OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
           torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default,
           torch.ops.aten.convolution.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.OPS:
            return func(*args, **kwargs)
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        meta = func(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args],
                    **kwargs)
        return torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype,
                                   device=device).zero_()


class SavedBytes:
    """Context manager: every storage autograd saves inside it, once, with the model's
    innermost running module (global forward pre/post hooks keep a stack of names).

    The saved tensors are kept here and the graph gets their index in `kept` instead:
    a pack hook that hands back the tensor itself closes a reference cycle through the
    C++ graph for a node that saves its own output (softmax), which Python's gc cannot
    break, and every forward would leak its activations. Holding them here keeps each
    storage alive to the end of the forward, as autograd would (so no address is reused
    by a later storage and mistaken for a saved one); `release` drops them."""

    def __init__(self, model: nn.Module):
        self.skip = {t.untyped_storage().data_ptr()
                     for t in chain(model.parameters(), model.buffers())}
        self.names = {m: n for n, m in model.named_modules()}
        self.stack: list[str] = []
        self.seen: set[tuple[int, int]] = set()
        self.kept: list[torch.Tensor] = []
        self.saved = Saved()

    def release(self) -> None:
        self.kept.clear()

    def _pre(self, module, args):
        if module in self.names:
            self.stack.append(self.names[module])

    def _post(self, module, args, out):
        if module in self.names:
            self.stack.pop()

    def _pack(self, t: torch.Tensor) -> int:
        self.kept.append(t)
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if key[0] not in self.skip and key not in self.seen:
            self.seen.add(key)
            fn = t.grad_fn
            self.saved.records.append(Record(
                self.stack[-1] if self.stack else "", tuple(t.shape), t.dtype,
                fn.name() if fn is not None else "-", st.nbytes(), weight_cast(fn)))
        return len(self.kept) - 1

    def __enter__(self):
        hooks = nn.modules.module
        self.handles = [hooks.register_module_forward_pre_hook(self._pre),
                        hooks.register_module_forward_hook(self._post)]
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self.kept.__getitem__)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)
        for h in self.handles:
            h.remove()


@dataclass
class Run:
    saved: Saved
    held: int                  # returned-logit storages autograd did not save
    loss_saved: int            # what HASTE's attention_loss saves on those logits
    logit_shapes: list[tuple[int, ...]]
    sdpa: set[str]             # autograd nodes of the fused attention, if any ran
    seconds: float


def make_model(arch: str, device: torch.device, arithmetic: bool) -> nn.Module:
    """`arch` in train mode. For --arithmetic, initialised as the trainer does; otherwise
    built on the meta device and given storage without writing it (torch.empty): nothing
    reads the weights (NoArithmetic), so they cost neither init time nor resident memory
    (an XL is 2.7-3.8 GB of fp32), and the buffers (positions, RoPE tables) are zeros."""
    torch.manual_seed(0)
    if arithmetic:
        with torch.device(device):
            return build_model(arch, latent_size=LATENT).train()
    with torch.device("meta"):
        model = build_model(arch, latent_size=LATENT)
    model = model.to_empty(device=device).train()
    for b in model.buffers():
        b.zero_()
    return model


def forward(model: nn.Module, batch: int, blocks: tuple[int, ...], precision: str,
            device: torch.device, arithmetic: bool = False) -> Run:
    """One forward (+ the loss) at `batch`, logits of `blocks` asked if any."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, LATENT, LATENT, generator=g).to(device)
    t = torch.rand(batch, generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    rec, lrec = SavedBytes(model), SavedBytes(model)
    t0 = time.perf_counter()
    with rec, torch.autocast(**amp), (nullcontext() if arithmetic else NoArithmetic()):
        out = model(x, t, y, attn_logits=blocks or None)
        logits = out[-1] if blocks else []
        loss = out[0].sum(dtype=torch.float32) + sum(l.sum(dtype=torch.float32)
                                                     for l in logits)
    seconds = time.perf_counter() - t0
    held, seen = 0, set(rec.seen)
    for l in logits:
        st = l.untyped_storage()
        if (st.data_ptr(), st.nbytes()) not in seen:
            seen.add((st.data_ptr(), st.nbytes()))
            held += st.nbytes()
    ht = min(TEACHER_HEADS, model.blocks[0].attn.heads)
    for l in logits:   # HASTE's loss on the first 12 heads against a random DINOv2-B q, k;
        n = l.shape[-1]  # a block at a time (a middle-stage block's N differs)
        q, k = (torch.randn(batch, 1, ht, n, TEACHER_HEAD_DIM, device=device)
                * TEACHER_HEAD_DIM ** -0.25 for _ in range(2))
        with lrec, torch.autocast(**amp):
            loss = loss + attention_loss(l[:, :ht].unsqueeze(1), q, k)
    run = Run(rec.saved, held, lrec.saved.act, [tuple(l.shape) for l in logits],
              {r.creator for r in rec.saved.records if "ScaledDotProduct" in r.creator},
              seconds)
    del loss, out, logits
    rec.release()
    lrec.release()
    return run


def core(saved: Saved, block: int) -> list[Record]:
    """What block `block` (1-indexed)'s attention saved between its qkv and proj linears
    (RoPE, SDPA or the explicit path): storages first saved with its attn innermost."""
    return [r for r in saved.records if r.where == f"blocks.{block - 1}.attn"]


def describe(r: Record) -> str:
    dt = str(r.dtype).replace("torch.", "").replace("float", "f")
    return f"{list(r.shape)} {dt} {r.creator.replace('Backward0', '')} {r.nbytes / 1024:.0f}K"


def fmt(b: float) -> str:
    return f"{b / GiB:.2f} GiB" if abs(b) >= GiB else f"{b / MiB:.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="sit-xl/2,sit-down-xl/2,sit-b/2,sit-down-b/2")
    ap.add_argument("--batch", type=int, default=2,
                    help="measured batch, >= 2 (results are per sample); at 1 the matmuls "
                         "of the explicit path reshape q, k, v as views, not copies, so "
                         "what they save is not what a real batch saves")
    ap.add_argument("--precision", default="fp32,bf16", help="fp32, bf16 (autocast) or both")
    ap.add_argument("--blocks", default=None,
                    help="1-indexed blocks for every arch (default: HASTE's map per arch)")
    ap.add_argument("--presets", default="32,256", help="per-device batches to scale to")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--arithmetic", action="store_true",
                    help="do the matrix products and convolutions for real (slow; the "
                         "same bytes: see NoArithmetic)")
    a = ap.parse_args()
    if a.batch < 2:
        ap.error("--batch must be >= 2 (see --help)")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    archs = a.archs.split(",")
    precisions = a.precision.split(",")
    presets = [int(p) for p in a.presets.split(",")]
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.platform()}, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f"; 256 px (latent 4x{LATENT}x{LATENT}), batch {a.batch}, random weights, "
          "train mode")

    rows, t_start = [], time.perf_counter()
    for arch in archs:
        blocks = tuple(int(b) for b in a.blocks.split(",")) if a.blocks else MAPPED[arch]
        t0 = time.perf_counter()
        model = make_model(arch, device, a.arithmetic)
        heads = model.blocks[0].attn.heads
        print(f"{arch}: built in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        for prec in precisions:
            base = forward(model, a.batch, (), prec, device, a.arithmetic)
            with_ = forward(model, a.batch, blocks, prec, device, a.arithmetic)
            print(f"  {prec}: forward {base.seconds:.1f} s without, {with_.seconds:.1f} s with",
                  file=sys.stderr, flush=True)
            L, b = len(blocks), a.batch
            ns = [s[-1] for s in with_.logit_shapes]
            square = [(n, n) for n in ns]
            nn_bytes = [sum(r.nbytes for r in run.saved.records if r.shape[-2:] in square)
                        for run in (base, with_)]
            rows.append(dict(
                arch=arch, prec=prec, blocks=blocks, heads=heads, dim=model.dim, n=ns,
                base=base, with_=with_, el=DTYPES[prec].itemsize,
                hn2=sum(heads * n * n for n in ns) / L,                 # mean H N^2
                delta=(with_.saved.act - base.saved.act) / L / b,     # per block per sample
                nn=(nn_bytes[1] - nn_bytes[0]) / L / b,               # of it, [.., N, N]
                held=with_.held / L / b, loss=with_.loss_saved / L / b))
        del model

    print(f"\n## measured: activations autograd saves for backward in one forward at batch "
          f"{a.batch} (parameters and autocast weight copies left out)")
    print("Δ: with - without, per mapped block per sample; = n x [H,N,N] (of the autocast "
          "dtype) + other; held: the returned logits (alive until the loss reads them); "
          "HASTE loss: what attention_loss saves on them")
    print(f"| {'arch':13s} | prec | mapped  | H  | N   | without MiB | with MiB | ratio "
          "| Δ MiB  | n [H,N,N] | other MiB | held MiB | HASTE loss MiB |")
    print("|" + "---|" * 13)
    for r in rows:
        bs, ws = r["base"].saved.act, r["with_"].saved.act
        print(f"| {r['arch']:13s} | {r['prec']} | {','.join(map(str, r['blocks'])):7s} "
              f"| {r['heads']:2d} | {max(r['n']):3d} | {bs / MiB:11.1f} | {ws / MiB:8.1f} "
              f"| {ws / bs:5.3f} | {r['delta'] / MiB:6.3f} "
              f"| {r['nn'] / (r['hn2'] * r['el']):9.3f} "
              f"| {(r['delta'] - r['nn']) / MiB:9.3f} | {r['held'] / MiB:8.3f} "
              f"| {r['loss'] / MiB:14.3f} |")
    casts = {r["arch"]: r["base"].saved.weights for r in rows if r["base"].saved.weights}
    if casts:
        print("autocast's bf16 weight copies, saved in both runs (batch-independent, left out "
              "above): " + ", ".join(f"{k} {v / MiB:.0f} MiB" for k, v in casts.items()))
    print("ratio, saved activations with / without logits (any batch): "
          + "; ".join(f"{r['arch']} {r['prec']} {r['with_'].saved.act / r['base'].saved.act:.3f}"
                      for r in rows))

    print("\n## scaled linearly to a per-device batch: Δ per mapped block, Δ of all mapped "
          "blocks, and all of them with the held logits and HASTE's loss")
    print(f"| {'arch':13s} | prec | "
          + " | ".join(f"Δ/block @{p} | Δ all @{p} | +held+loss @{p}" for p in presets) + " |")
    print("|" + "---|" * (2 + 3 * len(presets)))
    for r in rows:
        L, cells = len(r["blocks"]), []
        for p in presets:
            cells += [fmt(r["delta"] * p), fmt(r["delta"] * p * L),
                      fmt((r["delta"] + r["held"] + r["loss"]) * p * L)]
        print(f"| {r['arch']:13s} | {r['prec']} | " + " | ".join(cells) + " |")

    print("\n## analytic, per mapped block per sample: heads x N x N x bytes x count")
    bf16_here = "1 x 2 B (CPU autocast runs softmax in bf16)" if device.type == "cpu" else \
        "(4 + 2) B (softmax in fp32, its bf16 copy for P @ V)"
    for arch in dict.fromkeys(r["arch"] for r in rows):
        mine = {r["prec"]: r for r in rows if r["arch"] == arch}
        r0 = next(iter(mine.values()))
        h, n, one, L = r0["heads"], max(r0["n"]), r0["hn2"], len(r0["blocks"])
        dim = r0["dim"]
        ht = min(TEACHER_HEADS, h)
        here = 2 if device.type == "cpu" else 6
        print(f"{arch} (H {h}, N {n}): one [H,N,N] is {one * 4 / MiB:.2f} MiB fp32, "
              f"{one * 2 / MiB:.2f} MiB bf16; the fused kernel's logsumexp H x N x 4 B = "
              f"{h * n * 4 / 1024:.0f} KiB")
        print(f"  {device.type}, kept by the explicit path: fp32 1 x 4 B = {one * 4 / MiB:.2f} "
              f"MiB; bf16 {bf16_here} = {one * here / MiB:.2f} MiB; measured: "
              + "; ".join(f"{p} {r['delta'] / MiB:.3f} MiB = {r['nn'] / (one * r['el']):.2f}"
                          f" x [H,N,N] {(r['delta'] - r['nn']) / MiB:+.3f} MiB other"
                          for p, r in mine.items()))
        nd = {p: (r["nn"] - r["delta"] - h * n * 4) / (n * dim * r["el"])
              for p, r in mine.items()}
        print("  other = - logsumexp (the explicit path keeps its own copies of q, k, v for "
              "its matmuls where the fused kernel kept the qkv output they view, and proj "
              "keeps out either way) - "
              + ", ".join(f"{v:.2f} ({p})" for p, v in nd.items()) + " x N x D x bytes"
              + (" (RoPE: the fused kernel also kept the rotated q and k, the explicit path "
                 "only its copies)" if max(nd.values()) > 0.5 else ""))
        print("  GPU: the flash / mem-efficient baseline keeps for attention q, k, v, out (the "
              "same storages the explicit path copies or proj keeps) and the logsumexp, "
              "O(N) per head, no [H,N,N]; explicit fp32: 1 x 4 B; bf16 autocast: softmax is "
              "on CUDA autocast's fp32 list, so (4 + 2) B: the fp32 softmax and its bf16 "
              f"copy for P @ V = {one * 6 / MiB:.2f} MiB")
        if "bf16" in mine and device.type == "cpu":
            r = mine["bf16"]
            gpu = one * 6 + (r["delta"] - r["nn"])      # the other terms do not change
            extra = r["held"] + r["loss"]
            print(f"  GPU bf16 estimate: (4 + 2) B x [H,N,N] {(r['delta'] - r['nn']) / MiB:+.3f}"
                  f" MiB other (as measured) = {gpu / MiB:.2f} MiB per block per sample -> "
                  + ", ".join(f"@{p}: {fmt(gpu * p)} per block, {fmt(gpu * p * L)} all "
                              f"{L}, {fmt((gpu + extra) * p * L)} with held logits + loss"
                              for p in presets))
        print(f"  + held logits {one * 4 / MiB:.2f} (fp32) / {one * 2 / MiB:.2f} (bf16) MiB, "
              f"+ HASTE loss (teacher q, k of {ht} heads; it keeps no N x N tensor) "
              f"{2 * ht * n * TEACHER_HEAD_DIM * 4 / MiB:.2f} MiB")

    print("\n## what the attention of the first mapped block saves: storages first saved "
          "between its qkv and proj linears (RoPE, SDPA or the explicit path); shape of the "
          "saved tensor, dtype, the node that made it, storage size")
    for r in rows:
        k = r["blocks"][0]
        print(f"{r['arch']} {r['prec']} block {k}, fused kernel: "
              f"{', '.join(sorted(r['base'].sdpa)) or '-'}")
        for name, run in (("without", r["base"]), ("with", r["with_"])):
            print(f"  {name + ':':8s} " + ("; ".join(map(describe, core(run.saved, k))) or "-"))
    print(f"\n# {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
