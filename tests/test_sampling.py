"""Samplers against data with a closed-form velocity field: Gaussian x0 ~ N(mu, s^2)."""

import pytest
import torch

from train.sampling import guided, sample_ode, sample_sde


def gaussian_velocity(mu: torch.Tensor, sigma: torch.Tensor):
    """Exact E[eps - x0 | x_t] for x0 ~ N(mu, sigma^2) per dimension, eps ~ N(0, 1),
    x_t = (1 - t) x0 + t eps: jointly Gaussian, so the conditional means are linear."""
    def v(x, t, y):
        t = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        m = (1 - t) * mu
        var = (1 - t) ** 2 * sigma ** 2 + t ** 2
        e_eps = t * (x - m) / var
        e_x0 = mu + (1 - t) * sigma ** 2 * (x - m) / var
        return e_eps - e_x0
    return v


MU = torch.tensor([1.5, -0.5, 0.0])
SIGMA = torch.tensor([0.5, 1.0, 2.0])


@pytest.mark.parametrize("sampler", ["sde", "heun", "euler"])
def test_samples_have_the_data_mean_and_std(sampler):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    y = torch.zeros(len(noise), dtype=torch.long)
    v = gaussian_velocity(MU.double(), SIGMA.double())
    if sampler == "sde":
        x = sample_sde(v, noise, y, steps=250, generator=g)
    else:
        x = sample_ode(v, noise, y, steps=50, method=sampler)
    torch.testing.assert_close(x.mean(0), MU.double(), atol=0.05, rtol=0)
    torch.testing.assert_close(x.std(0), SIGMA.double(), atol=0.05, rtol=0.03)


def test_ode_heun_is_more_accurate_than_euler_and_deterministic():
    noise = torch.randn(4000, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.zeros(len(noise), dtype=torch.long)
    v = gaussian_velocity(MU.double(), SIGMA.double())
    # the exact ODE map of a Gaussian is affine: x0 = mu + sigma * eps
    exact = MU.double() + SIGMA.double() * noise
    err = {m: (sample_ode(v, noise, y, steps=20, method=m) - exact).abs().max()
           for m in ("euler", "heun")}
    assert err["heun"] < err["euler"] / 5, err
    torch.testing.assert_close(sample_ode(v, noise, y, method="heun"),
                               sample_ode(v, noise, y, method="heun"))


def test_guidance_only_inside_the_interval():
    calls = []

    def v(x, t, y):
        calls.append((float(t[0]), len(x)))
        return torch.where(y.view(-1, 1) == 9, torch.zeros_like(x), torch.ones_like(x))
    gv = guided(v, null_label=9, scale=3.0, interval=(0.0, 0.7))
    x, y = torch.zeros(2, 1), torch.tensor([0, 1])
    assert torch.equal(gv(x, torch.full((2,), 0.5), y), torch.full((2, 1), 3.0))  # 0 + 3 (1 - 0)
    assert torch.equal(gv(x, torch.full((2,), 0.9), y), torch.ones(2, 1))         # outside
    assert [n for _, n in calls] == [4, 2]                 # batched [cond; uncond], then cond
    assert guided(v, 9, 1.0)(x, torch.full((2,), 0.5), y).equal(torch.ones(2, 1))
    with pytest.raises(ValueError, match="euler"):
        sample_ode(v, x, y, method="rk4")
