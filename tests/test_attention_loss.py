"""HASTE's building blocks (issue 16): the attention-distillation loss, and the student
models returning the pre-softmax attention logits of chosen blocks."""

import pytest
import torch

from train.losses import attention_loss
from train.models.sit import SIT_SIZES, SiT, modulate
from train.models.sit_down import SIT_DOWN_SIZES, SiTDown, apply_rope


def teacher(b=2, l=3, h=2, n=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, l, h, n, d, generator=g) * d ** -0.5
    k = torch.randn(b, l, h, n, d, generator=g)
    return q, k


def naive_loss(s, q, k):
    """The definition in float64: explicit softmax, -sum_j p_ij log q_ij, plain mean."""
    t = q.double() @ k.double().transpose(-2, -1)
    p = t.exp() / t.exp().sum(-1, keepdim=True)
    sq = s.double().exp() / s.double().exp().sum(-1, keepdim=True)
    return -(p * sq.log()).sum(-1).mean()


def test_attention_loss_matches_the_definition_and_only_the_student_gets_gradients():
    q, k = teacher()
    s = torch.randn(2, 3, 2, 7, 7, requires_grad=True)
    q.requires_grad_(True)
    k.requires_grad_(True)
    loss = attention_loss(s, q, k)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), naive_loss(s, q, k), rtol=1e-6, atol=1e-6)
    loss.backward()
    assert q.grad is None and k.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0
    # d/ds of a row's cross-entropy is softmax(s) - p: zero-sum rows
    torch.testing.assert_close(s.grad.sum(-1), torch.zeros(2, 3, 2, 7), atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="student logits"):
        attention_loss(s[..., :6, :6], q, k)


def test_attention_loss_is_minimal_at_the_teacher_logits():
    q, k = teacher(seed=1)
    t = (q @ k.transpose(-2, -1)).requires_grad_(True)
    loss = attention_loss(t, q, k)
    p = t.detach().double().softmax(-1)
    entropy = -(p * p.log()).sum(-1).mean()
    torch.testing.assert_close(loss.double(), entropy, rtol=1e-6, atol=1e-6)
    loss.backward()
    torch.testing.assert_close(t.grad, torch.zeros_like(t), atol=1e-7, rtol=0)
    # a per-row shift changes nothing; any other change costs
    shifted = t.detach() + torch.randn(*t.shape[:-1], 1)
    torch.testing.assert_close(attention_loss(shifted, q, k), loss.detach())
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        other = t.detach() + 0.3 * torch.randn(t.shape, generator=g)
        assert attention_loss(other, q, k) > loss.detach()


def test_attention_loss_gradient_is_autograds_and_keeps_nothing_n_by_n():
    """The hand-written backward equals autograd's through the definition (float64), and
    what the graph keeps for it is s, q, k: no N x N tensor beyond the student's own."""
    q, k = teacher(b=2, l=2, h=3, n=9, d=4, seed=3)
    s = torch.randn(2, 2, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: attention_loss(x, q.double(), k.double()),
                                    (s,))
    ref = s.detach().clone().requires_grad_(True)
    naive_loss(ref, q, k).backward()
    attention_loss(s, q.double(), k.double()).backward()
    torch.testing.assert_close(s.grad, ref.grad)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        attention_loss(torch.randn(2, 2, 3, 9, 9, requires_grad=True), q, k)
    assert sorted(t.numel() for t in saved) == sorted([s.numel(), q.numel(), k.numel()])


def test_attention_loss_runs_in_fp32_under_bf16_autocast():
    q, k = teacher(seed=2)
    s = torch.randn(2, 3, 2, 7, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = attention_loss(s.bfloat16(), q.bfloat16(), k.bfloat16())
    assert loss.dtype == torch.float32
    ref = naive_loss(s.bfloat16(), q.bfloat16(), k.bfloat16())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- student logits

def randomized(model):
    """Every weight random (SiT's init zeroes the adaLN gates: blocks would be identities
    and the attention would not reach the output); q and k large enough for peaked
    attention rows, the rest small enough for O(1) outputs."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            std = 0.25 if name.endswith("attn.qkv.weight") else 0.05
            prm.copy_(torch.randn(prm.shape, generator=g) * std)
    return model


def by_hand(block, args, prefix):
    """The block's pre-softmax logits from its input: adaLN, norm1, qkv, (RoPE), q k^T."""
    x, c = args[0], args[1]
    shift1, scale1, *_ = block.adaLN_modulation(c).chunk(6, dim=1)
    xm = modulate(block.norm1(x), shift1, scale1)
    b, n, d = xm.shape
    heads = block.attn.heads
    q, k, _ = block.attn.qkv(xm).view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    if len(args) >= 4:                                               # SiT-down: RoPE tables
        q, k = apply_rope(q, args[2], args[3]), apply_rope(k, args[2], args[3])
    return ((q @ k.transpose(-2, -1)) / (d // heads) ** 0.5)[:, :, prefix:, prefix:]


CASES = [("sit", 0, (2, 1)), ("sit", 1, (1,)), ("down", 0, (3, 1, 2)), ("down", 1, (2, 4))]


@pytest.mark.parametrize("kind,p,blocks", CASES)
def test_returned_logits_are_the_blocks_and_leave_the_output_unchanged(kind, p, blocks):
    torch.manual_seed(0)
    model = (SiT(**SIT_SIZES["sit-tiny/2"]) if kind == "sit"
             else SiTDown(**SIT_DOWN_SIZES["sit-down-tiny/2"]))
    model = randomized(model).eval()
    b = 2
    x, t, y = torch.randn(b, 4, 32, 32), torch.rand(b), torch.randint(0, 1000, (b,))
    kw = dict(prefix=torch.randn(b, p, model.dim)) if p else {}
    inputs = {}
    hooks = [blk.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a))
             for i, blk in enumerate(model.blocks, start=1)]
    out = model(x, t, y, align_depth=1, attn_logits=blocks, **kw)
    for hk in hooks:
        hk.remove()
    base = model(x, t, y, align_depth=1, **kw)
    assert len(out) == len(base) + 1 and len(base) == (3 if p else 2)
    for got, want in zip(out[:-1], base):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    logits = out[-1]
    assert isinstance(logits, list) and len(logits) == len(blocks)
    heads = model.blocks[0].attn.heads
    for blk, lg in zip(blocks, logits):
        n = 64 if kind == "down" and blk in (2, 3) else 256         # middle stage: 8x8
        assert lg.shape == (b, heads, n, n)
        want = by_hand(model.blocks[blk - 1], inputs[blk], p)
        torch.testing.assert_close(lg, want, atol=1e-5, rtol=1e-5)
    # gradients flow into the logits, and from them into the model
    sum(lg.pow(2).mean() for lg in logits).backward()
    assert model.blocks[blocks[0] - 1].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["sit", "down"])
def test_logits_blocks_under_checkpointing_give_the_same_gradients(kind):
    grads, outs = [], []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = (SiT(**SIT_SIZES["sit-tiny/2"]) if kind == "sit"
                 else SiTDown(**SIT_DOWN_SIZES["sit-down-tiny/2"]))
        model = randomized(model).train()
        model.checkpointing = ckpt
        g = torch.Generator().manual_seed(1)
        x, t = torch.randn(2, 4, 32, 32, generator=g), torch.rand(2, generator=g)
        y = torch.randint(0, 1000, (2,), generator=g)
        v, _, logits = model(x, t, y, label_drop=torch.zeros(2, dtype=torch.bool),
                             attn_logits=(2,))
        (v.pow(2).mean() + logits[0].pow(2).mean()).backward()
        outs.append(logits[0].detach())
        grads.append([prm.grad.clone() for prm in model.parameters()])
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_attn_logits_edge_cases():
    model = randomized(SiT(**SIT_SIZES["sit-tiny/2"])).eval()
    x, t, y = torch.randn(1, 4, 32, 32), torch.rand(1), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="outside"):
        model(x, t, y, attn_logits=(3,))
    assert model(x, t, y, attn_logits=())[-1] == []                  # () still appends
    none, hidden, logits = model(x, t, y, align_depth=1, stop_after=1, attn_logits=(1, 2))
    assert none is None and len(logits) == 1                         # block 2 never ran
