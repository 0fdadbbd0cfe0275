"""SiT as REPA trains it: sizes and FLOPs of the paper's table, initialisation, shapes."""

import pytest
import torch

from train.models import size_and_gmacs
from train.models.sit import SIT_SIZES, SiT, sincos_pos_embed

PAPER = {"sit-b/2": (130e6, 23.0), "sit-l/2": (458e6, 80.8), "sit-xl/2": (675e6, 118.6)}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_parameters_and_flops_match_the_paper(name):
    params, gmacs = size_and_gmacs(name)
    want_params, want_gmacs = PAPER[name]
    assert abs(params / want_params - 1) < 0.01, params
    assert abs(gmacs / want_gmacs - 1) < 0.01, gmacs


def test_zero_init_and_alignment_hidden_state():
    torch.manual_seed(0)
    model = SiT(**SIT_SIZES["sit-tiny/2"], latent_size=8, num_classes=10)
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 5, 10])
    v, hidden = model(x, t, y, align_depth=1)
    assert v.shape == x.shape and not v.any()          # zero-init output: v = 0
    # zero adaLN gates: block 1 is the identity on the embedded patches
    embedded = model.x_embedder(x).flatten(2).transpose(1, 2) + model.pos_embed
    torch.testing.assert_close(hidden, embedded)
    assert model(x, t, y)[1] is None
    for block in model.blocks:
        assert not block.adaLN_modulation[-1].weight.any()


def test_unpatchify_inverts_the_patch_order():
    model = SiT(**SIT_SIZES["sit-tiny/2"], latent_size=8)
    x = torch.randn(2, 4, 8, 8)
    p = x.unfold(2, 2, 2).unfold(3, 2, 2)                           # [B, C, 4, 4, 2, 2]
    tokens = p.permute(0, 2, 3, 4, 5, 1).reshape(2, 16, 16)          # [B, N, p*p*C]
    torch.testing.assert_close(model.unpatchify(tokens), x)


def test_sincos_positions_and_null_label():
    pe = sincos_pos_embed(8, 4)                                      # [16, 8]
    assert pe.shape == (16, 8)
    # first half varies along columns only, second half along rows only
    grid = pe.view(4, 4, 8)
    assert torch.allclose(grid[0, :, :4], grid[3, :, :4])
    assert torch.allclose(grid[:, 0, 4:], grid[:, 3, 4:])
    model = SiT(**SIT_SIZES["sit-tiny/2"], latent_size=8, num_classes=10, label_dropout=1.0)
    y = torch.arange(4)
    torch.testing.assert_close(model.y_embedder(y, train=True),
                               model.y_embedder.table.weight[[10] * 4])
    torch.testing.assert_close(model.y_embedder(y, train=False),
                               model.y_embedder.table.weight[:4])
