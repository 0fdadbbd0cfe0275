"""Samplers against velocity fields known in closed form, and against REPA's samplers.py
step for step: its time grids, its guidance decision per model call, its last SDE step."""

import pytest
import torch

from train.sampling import Guidance, sample_ode, sample_sde


def gaussian_velocity(mu: torch.Tensor, sigma: torch.Tensor):
    """Exact E[eps - x0 | x_t] for x0 ~ N(mu, sigma^2) per dimension, eps ~ N(0, 1),
    x_t = (1 - t) x0 + t eps: jointly Gaussian, so the conditional means are linear.
    sigma = 0 is a point mass at mu: v = (x - mu) / t."""
    def v(x, t, y):
        t = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        m = (1 - t) * mu
        var = (1 - t) ** 2 * sigma ** 2 + t ** 2
        e_eps = t * (x - m) / var
        e_x0 = mu + (1 - t) * sigma ** 2 * (x - m) / var
        return e_eps - e_x0
    return v


MU = torch.tensor([1.5, -0.5, 0.0], dtype=torch.float64)
SIGMA = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)


def recorder(velocity, null=9):
    """`velocity` that logs every call as (t, batch size, inputs, output)."""
    calls = []

    def v(x, t, y):
        out = velocity(x, t, y)
        calls.append({"t": float(t[0]), "n": len(x), "x": x.clone(), "v": out.clone(),
                      "null": bool((y == null).any())})
        return out
    return v, calls


@pytest.mark.parametrize("sampler", ["sde", "heun", "euler"])
def test_samples_have_the_data_mean_and_std(sampler):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    y = torch.zeros(len(noise), dtype=torch.long)
    v = gaussian_velocity(MU, SIGMA)
    if sampler == "sde":
        x = sample_sde(v, noise, y, steps=250, generator=g)
    else:
        x = sample_ode(v, noise, y, steps=50, method=sampler)
    torch.testing.assert_close(x.mean(0), MU, atol=0.05, rtol=0)
    torch.testing.assert_close(x.std(0), SIGMA, atol=0.05, rtol=0.03)


def test_ode_heun_is_more_accurate_than_euler_and_deterministic():
    noise = torch.randn(4000, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.zeros(len(noise), dtype=torch.long)
    v = gaussian_velocity(MU, SIGMA)
    # the exact ODE map of a Gaussian is affine: x0 = mu + sigma * eps
    exact = MU + SIGMA * noise
    err = {m: (sample_ode(v, noise, y, steps=20, method=m) - exact).abs().max()
           for m in ("euler", "heun")}
    assert err["heun"] < err["euler"] / 5, err
    torch.testing.assert_close(sample_ode(v, noise, y, method="heun"),
                               sample_ode(v, noise, y, method="heun"))


def test_sde_ends_with_one_step_along_the_drift_as_the_reference():
    """Point-mass data at mu: v = (x - mu) / t, score -(x - (1 - t) mu) / t^2, and the
    drift with w(t) = 2t is d = (2x - (2 - t) mu) / t. The reference's last step from
    t = 0.04 to 0, x + d (0 - t), therefore maps x to (2 - t) mu - x, i.e. x_t = (1 - t) mu
    + t eps to mu - t eps: the samples keep a spread of t = 0.04. A step along v instead,
    x - t v, lands on mu exactly (the option last_step="denoise")."""
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    y = torch.zeros(len(noise), dtype=torch.long)
    v, calls = recorder(gaussian_velocity(MU, torch.zeros(3, dtype=torch.float64)))
    x = sample_sde(v, noise, y, steps=250, generator=g)
    assert len(calls) == 250 and calls[-1]["t"] == pytest.approx(0.04)
    x_last = calls[-1]["x"]
    torch.testing.assert_close(x, (2 - 0.04) * MU - x_last, rtol=0, atol=1e-12)
    # the old last step (x - t v) would have differed by t ((1 - t) v + x) per sample
    old = x_last - 0.04 * calls[-1]["v"]
    torch.testing.assert_close(old, MU.expand_as(old), rtol=0, atol=1e-12)
    assert (x - old).abs().max() > 0.05
    # ... so the samples are mu - 0.04 eps: spread 0.04 around mu (Euler-Maruyama's error
    # aside), and exactly mu with the denoising last step
    torch.testing.assert_close(x.std(0), torch.full((3,), 0.04, dtype=torch.float64),
                               rtol=0.1, atol=0)
    g.manual_seed(2)
    noise = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    x_denoise = sample_sde(v, noise, y, steps=250, generator=g, last_step="denoise")
    torch.testing.assert_close(x_denoise, MU.expand_as(x_denoise), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="drift"):
        sample_sde(v, noise, y, last_step="velocity")


def reference_schedule(grid: list[float], heun: bool, hi: float) -> list[tuple[float, bool]]:
    """REPA's samplers.py, written out: the model calls of each step i from grid[i] to
    grid[i + 1] as (time of the call, guided?), with the guidance decided from the step's
    own t_cur = grid[i] (cfg > 1 and 0 <= t_cur <= hi), also for Heun's corrector at
    grid[i + 1], which every step but the last has."""
    calls = []
    steps = len(grid) - 1
    for i in range(steps):
        guided = 0.0 <= grid[i] <= hi
        calls.append((grid[i], guided))
        if heun and i < steps - 1:
            calls.append((grid[i + 1], guided))
    return calls


@pytest.mark.parametrize("method", ["heun", "euler"])
def test_ode_guidance_decisions_per_call_match_the_reference(method):
    v, calls = recorder(lambda x, t, y: -x)
    x, y = torch.ones(2, 1), torch.tensor([0, 1])
    sample_ode(v, x, y, steps=50, method=method,
               guidance=Guidance(scale=1.8, null_label=9, interval=(0.0, 0.7)))
    grid = torch.linspace(1.0, 0.0, 51, dtype=torch.float64).tolist()
    expected = reference_schedule(grid, method == "heun", 0.7)
    got = [(c["t"], c["n"] == 4) for c in calls]
    assert [g for _, g in got] == [e for _, e in expected]
    assert [t for t, _ in got] == pytest.approx([t for t, _ in expected], abs=1e-7)
    assert all(c["null"] == (c["n"] == 4) for c in calls)   # [y; null] exactly when guided
    if method == "heun":
        # the step 0.72 -> 0.70: neither its predictor (0.72) nor its corrector (evaluated
        # at 0.70) is guided; the next step, from 0.70, guides both of its calls
        k = 2 * 14
        assert [(round(t, 2), g) for t, g in got[k:k + 4]] == [
            (0.72, False), (0.7, False), (0.7, True), (0.68, True)]
        assert len(calls) == 99                         # 50 predictors, 49 correctors


def test_sde_guidance_decisions_per_call_match_the_reference():
    v, calls = recorder(lambda x, t, y: -x)
    x, y = torch.ones(2, 1), torch.tensor([0, 1])
    sample_sde(v, x, y, steps=250, guidance=Guidance(scale=1.8, null_label=9,
                                                     interval=(0.0, 0.7)),
               generator=torch.Generator().manual_seed(0))
    grid = torch.linspace(1.0, 0.04, 250, dtype=torch.float64).tolist() + [0.0]
    expected = reference_schedule(grid, heun=False, hi=0.7)
    assert [c["n"] == 4 for c in calls] == [g for _, g in expected]
    assert sum(g for _, g in expected) == 172           # t_cur <= 0.7, the last step included
    assert calls[-1]["t"] == pytest.approx(0.04) and calls[-1]["n"] == 4


def test_guidance_decides_on_the_float64_grid_time():
    g = Guidance(scale=2.0, interval=(0.0, 0.7))
    assert g.active(0.7) and g.active(0.0) and not g.active(0.7000000000000001)
    assert not Guidance(scale=1.0).active(0.5)          # scale 1: never a second call


def test_guidance_extrapolates_from_the_null_label_inside_the_interval():
    # v = 1 for a label, 0 for the null label: guided v = 0 + 3 (1 - 0) = 3
    def v(x, t, y):
        return torch.where(y.view(-1, 1) == 9, torch.zeros_like(x), torch.ones_like(x))
    x, y = torch.zeros(2, 1), torch.tensor([0, 1])
    one_step = dict(steps=1, method="euler")
    guided = sample_ode(v, x, y, **one_step, guidance=Guidance(3.0, 9, (0.0, 1.0)))
    assert torch.equal(guided, torch.full((2, 1), -3.0))             # x + (0 - 1) * 3
    outside = sample_ode(v, x, y, **one_step, guidance=Guidance(3.0, 9, (0.0, 0.7)))
    assert torch.equal(outside, torch.full((2, 1), -1.0))            # t_cur = 1 > 0.7
    with pytest.raises(ValueError, match="euler"):
        sample_ode(v, x, y, method="rk4")


def test_state_is_float64_and_the_model_sees_the_noise_dtype():
    v, calls = recorder(lambda x, t, y: -x)
    noise = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(3, dtype=torch.long)
    for out in (sample_sde(v, noise, y, steps=4, generator=torch.Generator()),
                sample_ode(v, noise, y, steps=4)):
        assert out.dtype == torch.float32
    assert {c["x"].dtype for c in calls} == {torch.float32}


@pytest.mark.parametrize("mode, method", [("sde", "heun"), ("ode", "heun"), ("ode", "euler")])
def test_a_block_ticks_once_per_model_evaluation(mode, method):
    """`train sample`'s bar moves with each model evaluation of a block, and a block makes
    exactly evaluations(s) of them (with guidance too: one call on [x; x])."""
    from train.generate import evaluations, sample_block
    from train.methods import Sampling
    from train.settings import SampleSettings

    class Net(torch.nn.Module):   # a real module for Sampling's device and dtype
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, t, y):
            return (self.w * x,)
    s = SampleSettings(num=3, cfg=1.5, mode=mode, ode_method=method, steps=7, batch_size=3)
    sampling = Sampling(Net(), s, num_classes=4, dtype=torch.float32, interval=(0.0, 1.0))
    ticks = []
    sample_block(sampling, s, torch.Generator().manual_seed(0), (3, 2, 4, 4),
                 tick=lambda: ticks.append(1))
    assert len(ticks) == evaluations(s) == {"sde": 7, "heun": 13, "euler": 7}[
        mode if mode == "sde" else method]
