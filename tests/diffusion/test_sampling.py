"""DDPM ancestral sampler against closed forms and an independent transcription of Alg. 2."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from diffusion.sampling import SampleResult, posterior_mean, sample
from diffusion.schedule import NoiseSchedule
from tests.diffusion.tiny_models import TinyEps

SHAPE = (1, 2, 2)


class PointMassEps(nn.Module):
    """The optimal eps-model for data that is a point mass at x*:
    eps*(x_t, t) = (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t)."""

    def __init__(self, x_star: torch.Tensor, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.x_star = x_star  # [C, H, W]
        self.abar = schedule.alpha_bars  # [T] float64

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.abar[t].to(x).view(-1, 1, 1, 1)
        return (x - abar.sqrt() * self.x_star.to(x)) / (1 - abar).sqrt()


def _x_star() -> torch.Tensor:
    return torch.tensor([[[0.9, -0.3], [0.0, -0.8]]], dtype=torch.float64)  # [1, 2, 2]


@pytest.mark.parametrize("schedule", [NoiseSchedule(), NoiseSchedule(10, 0.05, 0.3)])
def test_point_mass_samples_converge_to_x_star(schedule: NoiseSchedule) -> None:
    x_star = _x_star()
    model = PointMassEps(x_star, schedule)
    gen = torch.Generator().manual_seed(0)
    out = sample(model, schedule, 16, image_shape=SHAPE, generator=gen, dtype=torch.float64)
    assert out.images.shape == (16, *SHAPE) and out.trajectory is None
    # the last step (sigma_0 = 0) lands exactly on the posterior mean = x*
    torch.testing.assert_close(out.images, x_star.expand(16, *SHAPE), rtol=0, atol=1e-8)


def test_point_mass_marginals_match_posterior_recursion() -> None:
    """With eps* the reverse step is exactly q(x_{t-1} | x_t, x0 = x*) (Ho et al. Eq. 7), so the
    mean and variance of every trajectory frame follow a scalar recursion from N(0, 1)."""
    T, start, end = 10, 0.05, 0.3
    schedule = NoiseSchedule(T, start, end)
    x_star = _x_star()
    n = 4000
    out = sample(
        PointMassEps(x_star, schedule),
        schedule,
        n,
        image_shape=SHAPE,
        generator=torch.Generator().manual_seed(1),
        return_trajectory=True,
        batch_size=1000,
        dtype=torch.float64,
    )
    traj = out.trajectory  # [n, T + 1, 1, 2, 2]
    assert traj.shape == (n, T + 1, *SHAPE)
    betas = [start + (end - start) * i / (T - 1) for i in range(T)]
    abars = [math.prod(1 - b for b in betas[: i + 1]) for i in range(T)]
    xs = x_star.flatten().tolist()
    mean, var = [0.0] * 4, 1.0
    for k in range(T + 1):
        frame = traj[:, k].reshape(n, 4)
        for p in range(4):
            se = math.sqrt(max(var, 1e-30) / n)
            assert abs(frame[:, p].mean().item() - mean[p]) < 5 * se + 1e-9, (k, p)
            if var > 1e-12:
                assert abs(frame[:, p].var().item() / var - 1) < 5 * math.sqrt(2 / n), (k, p)
        if k == T:
            break
        t = T - 1 - k  # code timestep of the step from frame k to frame k + 1
        abar, abar_prev, beta = abars[t], (abars[t - 1] if t > 0 else 1.0), betas[t]
        c_x0 = math.sqrt(abar_prev) * beta / (1 - abar)
        c_xt = math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar)
        post_var = (1 - abar_prev) / (1 - abar) * beta
        mean = [c_xt * m + c_x0 * x for m, x in zip(mean, xs, strict=True)]
        var = c_xt**2 * var + post_var
    assert var == 0.0  # the recursion itself ends in the point mass


def _alg2_reference(model: nn.Module, schedule: NoiseSchedule, n: int, seed: int) -> torch.Tensor:
    """Ho et al. Algorithm 2 transcribed step by step, one sample at a time, consuming the
    generator in the documented order: x_T [n, ...], then z [n, ...] for t = T-1..1."""
    gen = torch.Generator().manual_seed(seed)
    T = schedule.num_timesteps
    x = torch.randn((n, *SHAPE), generator=gen, dtype=torch.float64)
    frames = [x.clone()]
    for t in range(T - 1, -1, -1):
        z = torch.randn((n, *SHAPE), generator=gen, dtype=torch.float64) if t > 0 else None
        alpha = 1.0 - schedule.betas[t].item()
        abar = schedule.alpha_bars[t].item()
        abar_prev = schedule.alpha_bars[t - 1].item() if t > 0 else 1.0
        sigma = math.sqrt((1 - abar_prev) / (1 - abar) * (1 - alpha))
        new = torch.empty_like(x)
        for i in range(n):
            eps = model(x[i : i + 1], torch.tensor([t]))[0]
            mu = (x[i] - (1 - alpha) / math.sqrt(1 - abar) * eps) / math.sqrt(alpha)
            new[i] = mu + sigma * z[i] if z is not None else mu
        x = new
        frames.append(x.clone())
    return torch.stack(frames, dim=1)  # [n, T + 1, C, H, W]


def test_matches_algorithm_2_transcription_and_batch_size_invariant() -> None:
    schedule = NoiseSchedule(10, 1e-3, 0.2)
    model = TinyEps().double().eval()
    with torch.no_grad():
        expected = _alg2_reference(model, schedule, 5, seed=7)
    for batch_size in (2, 256):
        out = sample(
            model,
            schedule,
            5,
            image_shape=SHAPE,
            generator=torch.Generator().manual_seed(7),
            return_trajectory=True,
            batch_size=batch_size,
        )
        assert out.images.dtype == torch.float64  # inferred from the model parameters
        assert out.trajectory.shape == (5, 11, *SHAPE)
        torch.testing.assert_close(out.trajectory, expected, rtol=1e-10, atol=1e-10)
        assert torch.equal(out.trajectory[:, -1], out.images)
        assert not out.images.requires_grad


def test_trajectory_endpoints_and_determinism() -> None:
    schedule = NoiseSchedule(10, 1e-3, 0.2)
    model = TinyEps().eval()

    def run(seed: int, **kw) -> SampleResult:
        gen = torch.Generator().manual_seed(seed)
        return sample(model, schedule, 3, image_shape=SHAPE, generator=gen, **kw)

    a, b = run(3, return_trajectory=True), run(3, return_trajectory=True, progress=True)
    assert torch.equal(a.trajectory, b.trajectory) and torch.equal(a.images, b.images)
    assert a.trajectory.dtype == torch.float32 and a.trajectory.shape == (3, 11, *SHAPE)
    noise = torch.randn((3, *SHAPE), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.trajectory[:, 0], noise)  # x_T is the first draw
    assert torch.equal(a.trajectory[:, 10], a.images)  # x_0 is the sample
    assert torch.equal(run(3).images, a.images)  # keeping the trajectory changes nothing
    assert not torch.allclose(run(4).images, a.images)


def test_posterior_mean_last_step_and_shapes() -> None:
    """At code t = 0 (abar_0 = alpha_0) the mean with eps* is exactly x*, for any x_t."""
    schedule = NoiseSchedule(10, 0.05, 0.3)
    x_star = _x_star()
    x_t = torch.randn(4, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mu = posterior_mean(PointMassEps(x_star, schedule), schedule, x_t, torch.zeros(4).long())
    assert mu.shape == x_t.shape and mu.dtype == torch.float64
    torch.testing.assert_close(mu, x_star.expand(4, *SHAPE))


def test_image_shape_inferred_from_model_config() -> None:
    schedule = NoiseSchedule(10, 1e-3, 0.2)
    model = TinyEps().eval()
    model.config = SimpleNamespace(image_channels=1, image_size=2)
    gen = torch.Generator().manual_seed(0)
    assert sample(model, schedule, 2, generator=gen).images.shape == (2, *SHAPE)
    with pytest.raises(ValueError, match="image_shape"):
        sample(TinyEps(), schedule, 2, generator=gen)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 0},
        {"batch_size": 0},
        {"image_shape": (1, 2)},
        {"image_shape": (1, 0, 2)},
        {"generator": 0},
        {"dtype": torch.long},
    ],
)
def test_invalid_arguments_raise(kwargs: dict) -> None:
    args = {
        "n": 2,
        "image_shape": SHAPE,
        "generator": torch.Generator().manual_seed(0),
        "batch_size": 4,
    }
    args.update(kwargs)
    n = args.pop("n")
    with pytest.raises(ValueError):
        sample(TinyEps(), NoiseSchedule(10), n, **args)


def test_sample_result_validates_shapes() -> None:
    with pytest.raises(ValueError):
        SampleResult(images=torch.zeros(2, 1, 2))
    with pytest.raises(ValueError):
        SampleResult(images=torch.zeros(2, *SHAPE), trajectory=torch.zeros(3, 11, *SHAPE))
    with pytest.raises(ValueError):
        SampleResult(images=torch.zeros(2, *SHAPE), trajectory=torch.zeros(2, 11, 1, 2, 3))
