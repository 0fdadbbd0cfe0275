"""Loss formulas against direct computations."""

import torch

from train.losses import (flow_loss, interpolate, manifold_loss, manifold_loss_naive,
                          repa_loss)


def test_interpolant_and_flow_loss():
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0.0, 0.5, 1.0])
    xt, v = interpolate(x0, eps, t)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[2], eps[2])
    torch.testing.assert_close(xt[1], (x0[1] + eps[1]) / 2)
    torch.testing.assert_close(v, eps - x0)
    assert flow_loss(v, v) == 0
    torch.testing.assert_close(flow_loss(v + 2, v), torch.tensor(4.0))


def test_repa_loss_is_negative_mean_tokenwise_cosine():
    h, y = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    want = -sum(torch.dot(h[b, n], y[b, n]) / (h[b, n].norm() * y[b, n].norm())
                for b in range(2) for n in range(5)) / 10
    torch.testing.assert_close(repa_loss(h, y), want)
    torch.testing.assert_close(repa_loss(y * 3, y), torch.tensor(-1.0))


def test_manifold_loss_equals_the_naive_gram_formula():
    torch.manual_seed(0)
    for b, n, d in ((2, 3, 4), (4, 16, 32), (8, 64, 96)):
        h, y = torch.randn(b, n, d), torch.randn(b, n, d) + 0.5
        for pooled in (False, True):
            want = manifold_loss_naive(h, y, pooled=pooled)
            got = manifold_loss(h, y, pooled=pooled)
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    # zero when the student's token geometry equals the teacher's (up to a rotation)
    y = torch.randn(4, 16, 32)
    q, _ = torch.linalg.qr(torch.randn(32, 32))
    assert manifold_loss(y @ q, y) < 1e-6


def test_manifold_loss_gradients_match():
    torch.manual_seed(1)
    h = torch.randn(3, 8, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 8, 16, dtype=torch.float64)
    g1, = torch.autograd.grad(manifold_loss(h, y), h)
    g2, = torch.autograd.grad(manifold_loss_naive(h, y), h)
    torch.testing.assert_close(g1.double(), g2, rtol=1e-4, atol=1e-7)


def test_manifold_loss_stays_fp32_under_bf16_autocast():
    """Near convergence the three D x D terms nearly cancel: bf16 products would make the
    loss ~10x too large. The loss must equal its fp32 value inside an autocast region."""
    torch.manual_seed(0)
    y = torch.randn(4, 64, 32) + 3 * torch.randn(1, 1, 32)            # correlated tokens
    h = y + 0.1 * torch.randn_like(y)                                   # student ~ teacher
    exact = manifold_loss_naive(h, y).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = manifold_loss(h, y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, exact, rtol=1e-2, atol=0)
