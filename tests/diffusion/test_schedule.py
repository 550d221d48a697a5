"""NoiseSchedule against closed forms recomputed independently in plain Python floats."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion.schedule import NoiseSchedule


def _betas_py(T: float, start: float, end: float) -> list[float]:
    if T == 1:
        return [start]
    return [start + (end - start) * i / (T - 1) for i in range(T)]


@pytest.mark.parametrize("T,start,end", [(1000, 1e-4, 0.02), (10, 0.05, 0.3), (1, 0.01, 0.01)])
def test_betas_linspace_closed_form(T: int, start: float, end: float) -> None:
    s = NoiseSchedule(num_timesteps=T, beta_start=start, beta_end=end)
    expected = torch.tensor(_betas_py(T, start, end), dtype=torch.float64)
    assert s.betas.dtype == torch.float64 and s.betas.shape == (T,)
    torch.testing.assert_close(s.betas, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(s.alphas, 1.0 - expected, rtol=0, atol=1e-15)


def test_alpha_bars_explicit_product() -> None:
    s = NoiseSchedule(num_timesteps=1000)
    betas = _betas_py(1000, 1e-4, 0.02)
    prod, expected, expected_prev = 1.0, [], []
    for b in betas:
        expected_prev.append(prod)
        prod *= 1.0 - b
        expected.append(prod)
    torch.testing.assert_close(s.alpha_bars, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(s.alpha_bars_prev, torch.tensor(expected_prev, dtype=torch.float64))
    assert s.alpha_bars_prev[0].item() == 1.0
    # sanity of the standard schedule: abar_T is tiny (x_T is essentially pure noise)
    assert 0.0 < s.alpha_bars[-1].item() < 1e-4


def test_posterior_variance_elementwise() -> None:
    s = NoiseSchedule(num_timesteps=50, beta_start=1e-3, beta_end=0.2)
    betas = _betas_py(50, 1e-3, 0.2)
    abar, got = 1.0, s.posterior_variance.tolist()
    for i, b in enumerate(betas):
        abar_prev = abar
        abar *= 1.0 - b
        expected = (1.0 - abar_prev) / (1.0 - abar) * b
        assert math.isclose(got[i], expected, rel_tol=1e-12, abs_tol=1e-300), i
    assert got[0] == 0.0


def test_elbo_weights_ho_eq12() -> None:
    T = 20
    s = NoiseSchedule(num_timesteps=T, beta_start=1e-3, beta_end=0.1)
    betas = _betas_py(T, 1e-3, 0.1)
    got = s.elbo_weights.tolist()
    assert got[0] == 0.0  # reconstruction term ignored
    abar = 1.0
    for i, b in enumerate(betas):
        abar_prev, alpha = abar, 1.0 - b
        abar *= alpha
        if i == 0:
            continue
        sigma2 = (1.0 - abar_prev) / (1.0 - abar) * b
        expected = b**2 / (2.0 * sigma2 * alpha * (1.0 - abar))
        assert math.isclose(got[i], expected, rel_tol=1e-12), i
    # With sigma^2 = posterior variance, w_t = beta_t / (2 alpha_t (1 - abar_{t-1})) for t >= 1.
    torch.testing.assert_close(
        s.elbo_weights[1:], s.betas[1:] / (2 * s.alphas[1:] * (1 - s.alpha_bars_prev[1:]))
    )


def test_q_sample_marginal_moments() -> None:
    s = NoiseSchedule(num_timesteps=100)
    gen = torch.Generator().manual_seed(0)
    n = 20000
    x0 = torch.tensor([0.7, -0.4, 0.1], dtype=torch.float64).view(1, 3, 1, 1).expand(n, 3, 1, 1)
    for t_val in (0, 37, 99):
        t = torch.full((n,), t_val, dtype=torch.long)
        eps = torch.randn(n, 3, 1, 1, generator=gen, dtype=torch.float64)
        x_t = s.q_sample(x0, t, eps)  # [n, 3, 1, 1]
        abar = math.prod(1.0 - b for b in _betas_py(100, 1e-4, 0.02)[: t_val + 1])
        mean, var = x_t.mean(dim=0).flatten(), x_t.var(dim=0).flatten()
        se_mean = math.sqrt((1 - abar) / n)
        torch.testing.assert_close(
            mean, math.sqrt(abar) * x0[0].flatten(), rtol=0, atol=5 * se_mean
        )
        torch.testing.assert_close(
            var, torch.full((3,), 1 - abar, dtype=torch.float64), rtol=0.05, atol=0
        )
    # per-row timesteps are respected and the dtype follows x0
    x0f = torch.ones(2, 1, 2, 2)
    out = s.q_sample(x0f, torch.tensor([0, 99]), torch.zeros(2, 1, 2, 2))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[0], torch.full((1, 2, 2), s.alpha_bars[0].sqrt().item()))
    torch.testing.assert_close(out[1], torch.full((1, 2, 2), s.alpha_bars[99].sqrt().item()))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_timesteps": 0},
        {"num_timesteps": -5},
        {"beta_start": 0.0},
        {"beta_start": -1e-4},
        {"beta_start": 0.03, "beta_end": 0.02},
        {"beta_end": 1.0},
    ],
)
def test_invalid_schedules_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        NoiseSchedule(**kwargs)
