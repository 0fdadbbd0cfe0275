"""SiT-down (U-REPA): sizes against the paper's table, RoPE, the U-Net path, projectors."""

import pytest
import torch

from train.models import Projector, build_model, size_and_gmacs
from train.models.sit_down import SIT_DOWN_SIZES, SiTDown, apply_rope, rope_2d

# methods.md section 4: params, forward GMACs ("GFLOPs") at 256 px
PAPER = {"sit-down-b/2": (199.7e6, 24.1), "sit-down-l/2": (686.6e6, 79.3),
         "sit-down-xl/2": (954.4e6, 108.8)}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_parameters_within_2_percent_of_the_paper(name):
    params, gmacs = size_and_gmacs(name)
    want_params, want_gmacs = PAPER[name]
    assert abs(params / want_params - 1) < 0.02, params
    # the transitions are inferred: FLOPs land within 6% (B +5.9%, L +0.3%, XL +1.5%)
    assert abs(gmacs / want_gmacs - 1) < 0.06, gmacs


def test_default_alignment_depth_is_the_middle_stage_centre():
    with torch.device("meta"):
        depths = {n: SiTDown(**kw).default_align_depth for n, kw in SIT_DOWN_SIZES.items()}
    assert depths["sit-down-xl/2"] == 18 and depths["sit-down-b/2"] == 8
    assert depths["sit-down-l/2"] == 16


def test_rope_is_relative():
    """q.k after RoPE depends only on the offset between the two positions."""
    cos, sin = rope_2d(16, 4)
    q, k = torch.randn(1, 1, 1, 16).expand(1, 1, 16, 16), torch.randn(1, 1, 1, 16).expand(1, 1, 16, 16)
    qr, kr = apply_rope(q.contiguous(), cos, sin)[0, 0], apply_rope(k.contiguous(), cos, sin)[0, 0]
    dots = qr @ kr.T                                                   # [16, 16]
    # (0,0)->(1,2) and (2,1)->(3,3): same offset (+1 row, +2 cols), same score
    torch.testing.assert_close(dots[0 * 4 + 0, 1 * 4 + 2], dots[2 * 4 + 1, 3 * 4 + 3])
    torch.testing.assert_close(qr.norm(dim=-1), q[0, 0].norm(dim=-1))  # a rotation
    # coarse grid in fine units: 2x2 grid token (0, 0) sits at (0.5, 0.5)
    c2, s2 = rope_2d(16, 2, stride=2, offset=0.5)
    c1, s1 = rope_2d(16, 1, offset=0.5)
    torch.testing.assert_close(c2[0], c1[0])


def test_forward_shapes_skip_and_alignment_state():
    torch.manual_seed(0)
    model = build_model("sit-down-tiny/2", latent_size=16, num_classes=10)
    x, t, y = torch.randn(2, 4, 16, 16), torch.rand(2), torch.tensor([1, 10])
    v, hidden = model(x, t, y, align_depth=model.default_align_depth)
    assert v.shape == x.shape and not v.any()                # zero-init final layer
    assert model.default_align_depth == 2 and hidden.shape == (2, 16, 64)  # 4x4 middle
    _, h1 = model(x, t, y, align_depth=1)
    _, h4 = model(x, t, y, align_depth=4)
    assert h1.shape == h4.shape == (2, 64, 64)                # 8x8 outer stages
    # every parameter gets a gradient once the zero-init output layer moves
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)
    for block in model.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
    model(x, t, y)[0].square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, missing


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = build_model("sit-down-tiny/2", latent_size=16, num_classes=10)
    b = build_model("sit-down-tiny/2", latent_size=16, num_classes=10, checkpointing=True)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        for block in m.blocks:
            torch.nn.init.constant_(block.adaLN_modulation[-1].weight, 0.01)
        torch.nn.init.constant_(m.final_layer.linear.weight, 0.01)
    x, t, y = torch.randn(2, 4, 16, 16), torch.rand(2), torch.tensor([1, 2])
    for m in (a, b):                         # training mode: checkpointing on, labels dropped
        torch.manual_seed(1)                 # ... identically in both
        m(x, t, y)[0].square().mean().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)


def test_projector_repa_and_urepa_shapes():
    proj = Projector(64, out_dim=32, hidden=48)
    h = torch.randn(2, 16, 64)                                       # 4x4 middle tokens
    assert proj(h, out_tokens=16).shape == (2, 16, 32)               # REPA: same grid
    up = proj(h, out_tokens=64)                                      # U-REPA: MLP, then x2
    assert up.shape == (2, 64, 32)
    # MLP first, then upsampling: constant tokens stay constant after bilinear resize
    const = proj(torch.ones(1, 16, 64), out_tokens=64)
    torch.testing.assert_close(const, const[:, :1].expand_as(const))
    near = Projector(64, out_dim=32, hidden=48, upsample="nearest")
    near.load_state_dict(proj.state_dict())
    z = near.mlp(h).view(2, 4, 4, 32)
    grid = near(h, out_tokens=64).view(2, 8, 8, 32)
    torch.testing.assert_close(grid[:, 2 * 1 + 1, 2 * 3], z[:, 1, 3])  # token (3,6) <- (1,3)
    with pytest.raises(ValueError, match="upsample"):
        Projector(8, upsample="area")
