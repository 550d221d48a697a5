"""Measurements against brute-force loops, closed-form expectations and torch.distributions."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from diffusion.measurements import (
    MEASUREMENTS,
    MCDraws,
    draw_mc,
    measure,
    measure_many,
    parse_measurement,
    per_draw,
    per_draw_many,
)
from diffusion.sampling import sample
from diffusion.schedule import NoiseSchedule
from tests.diffusion.tiny_models import TinyEps

T = 10
SHAPE = (1, 2, 2)
SCHEDULE = NoiseSchedule(T, 1e-3, 0.2)
NAMES = (
    "loss",
    "elbo",
    "square-norm",
    "mean-output",
    "timestep-loss:3",
    "timestep-loss:0",
    "trajectory-logprob",
)


class LinearEps(nn.Module):
    """eps_theta(x_t, t) = c_t x_t: every expectation over eps has a closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Parameter(torch.linspace(0.2, 1.1, T, dtype=torch.float64))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.c[t].view(-1, 1, 1, 1) * x


def _x0(n: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    return torch.rand((n, *SHAPE), generator=gen, dtype=torch.float64) * 2 - 1  # [n, 1, 2, 2]


def _draws(n_items: int, n_samples: int, seed: int = 5) -> MCDraws:
    gen = torch.Generator().manual_seed(seed)
    return draw_mc(n_items, n_samples, SHAPE, T, generator=gen, dtype=torch.float64)


def _trajectory(model: nn.Module, n: int, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    out = sample(model, SCHEDULE, n, image_shape=SHAPE, generator=gen, return_trajectory=True)
    return out.trajectory  # [n, T + 1, 1, 2, 2]


# --------------------------------------------------------------------------- brute force
def _brute_value(name, model, x0_b, t_bs, eps_bs, traj_b) -> torch.Tensor:
    """One item, one draw, each measurement written out from its definition."""
    abar = SCHEDULE.alpha_bars
    if name.startswith("timestep-loss:"):
        t_bs = int(name.split(":")[1])
        name = "loss"
    t_bs = int(t_bs)
    if name == "trajectory-logprob":
        if t_bs == 0:
            return torch.zeros((), dtype=x0_b.dtype)
        x_in, x_out = traj_b[T - 1 - t_bs], traj_b[T - t_bs]  # paper x_{t+1} -> x_t
        alpha, beta = SCHEDULE.alphas[t_bs].item(), SCHEDULE.betas[t_bs].item()
        e = model(x_in[None], torch.tensor([t_bs]))[0]
        mu = (x_in - beta / math.sqrt(1 - abar[t_bs].item()) * e) / math.sqrt(alpha)
        abar_prev = abar[t_bs - 1].item()
        sigma = math.sqrt((1 - abar_prev) / (1 - abar[t_bs].item()) * beta)
        logp = torch.distributions.Normal(mu, sigma).log_prob(x_out).sum()
        return T * logp
    a = abar[t_bs].item()
    x_t = math.sqrt(a) * x0_b + math.sqrt(1 - a) * eps_bs
    e = model(x_t[None], torch.tensor([t_bs]))[0]
    if name == "loss":
        return ((eps_bs - e) ** 2).mean()
    if name == "elbo":
        return T * SCHEDULE.elbo_weights[t_bs].item() * ((eps_bs - e) ** 2).sum()
    if name == "square-norm":
        return (e**2).mean()
    if name == "mean-output":
        return e.mean()
    raise AssertionError(name)


def _brute_measure(name, model, x0, draws, traj) -> torch.Tensor:  # [B]
    out = []
    for b in range(x0.shape[0]):
        vals = [
            _brute_value(name, model, x0[b], draws.t[b, s], draws.eps[b, s], traj[b])
            for s in range(draws.n_samples)
        ]
        out.append(torch.stack(vals).mean())
    return torch.stack(out)


# --------------------------------------------------------------------------- exact values
@pytest.mark.parametrize("name", NAMES)
def test_measure_equals_double_loop_and_is_chunk_invariant(name: str) -> None:
    model = TinyEps().double()
    x0, draws = _x0(3), _draws(3, 5)
    traj = _trajectory(model, 3)
    with torch.no_grad():
        expected = _brute_measure(name, model, x0, draws, traj)  # [3]
        vals = per_draw(name, model, SCHEDULE, x0, draws.t, draws.eps, trajectory=traj)
        assert vals.shape == (3, 5)
        torch.testing.assert_close(vals.mean(dim=1), expected, rtol=1e-10, atol=1e-10)
        for chunk_size in (1, 2, 7, 4096):
            got = measure(name, model, SCHEDULE, x0, draws, trajectory=traj, chunk_size=chunk_size)
            assert got.shape == (3,) and got.dtype == torch.float64
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def _enumerated(n_items: int, seed: int = 9) -> MCDraws:
    """Draws that cover every timestep exactly once per item (S = T)."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(T).expand(n_items, T).contiguous()
    return MCDraws(t=t, eps=torch.randn((n_items, T, *SHAPE), generator=gen, dtype=torch.float64))


def test_enumerated_timesteps_give_uniform_average_and_elbo_sum() -> None:
    model = TinyEps().double()
    x0 = _x0(2)
    draws = _enumerated(2)
    with torch.no_grad():
        loss = measure("loss", model, SCHEDULE, x0, draws)
        elbo = measure("elbo", model, SCHEDULE, x0, draws)
    for b in range(2):
        sq_err = []  # per timestep: sum over pixels of (eps - eps_theta)^2
        for t in range(T):
            a = SCHEDULE.alpha_bars[t].item()
            eps = draws.eps[b, t]
            x_t = math.sqrt(a) * x0[b] + math.sqrt(1 - a) * eps
            with torch.no_grad():
                e = model(x_t[None], torch.tensor([t]))[0]
            sq_err.append(((eps - e) ** 2).sum().item())
        pixels = math.prod(SHAPE)
        assert math.isclose(loss[b].item(), sum(sq_err) / T / pixels, rel_tol=1e-12)
        weights = SCHEDULE.elbo_weights.tolist()
        expected_elbo = sum(w * s for w, s in zip(weights, sq_err, strict=True))
        assert math.isclose(elbo[b].item(), expected_elbo, rel_tol=1e-12)


def test_timestep_loss_equals_loss_at_that_timestep() -> None:
    model = TinyEps().double()
    x0, draws = _x0(2), _draws(2, 6)
    fixed = MCDraws(t=torch.full_like(draws.t, 7), eps=draws.eps)
    with torch.no_grad():
        a = measure("timestep-loss:7", model, SCHEDULE, x0, draws)
        b = measure("loss", model, SCHEDULE, x0, fixed)
        c = measure("loss", model, SCHEDULE, x0, draws)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert not torch.allclose(a, c)


def _closed_forms(model: LinearEps, x0: torch.Tensor) -> dict[str, torch.Tensor]:
    """E over t ~ U and eps ~ N(0, I) for eps_theta = c_t x_t, x_t = a_t x0 + s_t eps:
    E (eps - c x_t)^2 = (1 - c s)^2 + c^2 a^2 x0^2,  E (c x_t)^2 = c^2 (a^2 x0^2 + s^2)."""
    out = {"loss": [], "elbo": [], "square-norm": [], "timestep-loss:4": []}
    c = model.c.detach().tolist()
    w = SCHEDULE.elbo_weights.tolist()
    for b in range(x0.shape[0]):
        x2 = (x0[b] ** 2).flatten().tolist()
        loss_t, sq_t, sqn_t = [], [], []
        for t in range(T):
            a2 = SCHEDULE.alpha_bars[t].item()
            s = math.sqrt(1 - a2)
            per_pixel = [(1 - c[t] * s) ** 2 + c[t] ** 2 * a2 * v for v in x2]
            loss_t.append(sum(per_pixel) / len(x2))
            sq_t.append(sum(per_pixel))
            sqn_t.append(sum(c[t] ** 2 * (a2 * v + s**2) for v in x2) / len(x2))
        out["loss"].append(sum(loss_t) / T)
        out["elbo"].append(sum(wt * st for wt, st in zip(w, sq_t, strict=True)))
        out["square-norm"].append(sum(sqn_t) / T)
        out["timestep-loss:4"].append(loss_t[4])
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


@pytest.mark.parametrize("name", ["loss", "elbo", "square-norm", "timestep-loss:4"])
def test_monte_carlo_estimate_is_unbiased_against_closed_form(name: str) -> None:
    model = LinearEps()
    x0 = _x0(2)
    draws = _draws(2, 20000, seed=21)
    expected = _closed_forms(model, x0)[name]
    with torch.no_grad():
        vals = per_draw(name, model, SCHEDULE, x0, draws.t, draws.eps)  # [2, S]
        got = measure(name, model, SCHEDULE, x0, draws, chunk_size=8192)
    torch.testing.assert_close(got, vals.mean(dim=1), rtol=1e-12, atol=1e-12)
    se = vals.std(dim=1) / math.sqrt(draws.n_samples)
    assert torch.all((got - expected).abs() < 5 * se), (got, expected, se)


# --------------------------------------------------------------------------- trajectory
def _exact_logprob(model: nn.Module, traj: torch.Tensor) -> torch.Tensor:
    """Sum over the T - 1 stochastic steps of Normal(mu, sigma).log_prob(x_{t-1}): [B]."""
    out = []
    for b in range(traj.shape[0]):
        total = torch.zeros((), dtype=traj.dtype)
        for k in range(T - 1):  # frame k -> k + 1 is code timestep T - 1 - k (>= 1)
            t = T - 1 - k
            x_in, x_out = traj[b, k], traj[b, k + 1]
            e = model(x_in[None], torch.tensor([t]))[0]
            alpha = 1 - SCHEDULE.betas[t].item()
            abar, abar_prev = SCHEDULE.alpha_bars[t].item(), SCHEDULE.alpha_bars[t - 1].item()
            mu = (x_in - (1 - alpha) / math.sqrt(1 - abar) * e) / math.sqrt(alpha)
            sigma = math.sqrt((1 - abar_prev) / (1 - abar) * (1 - alpha))
            total = total + torch.distributions.Normal(mu, sigma).log_prob(x_out).sum()
        out.append(total)
    return torch.stack(out)


@pytest.mark.parametrize("source", ["sampled", "random"])
def test_trajectory_logprob_exact_sum(source: str) -> None:
    model = TinyEps().double()
    if source == "sampled":
        traj = _trajectory(model, 2)
    else:
        gen = torch.Generator().manual_seed(3)
        traj = torch.randn((2, T + 1, *SHAPE), generator=gen, dtype=torch.float64)
    x0 = traj[:, -1]
    draws = _enumerated(2)
    with torch.no_grad():
        got = measure("trajectory-logprob", model, SCHEDULE, x0, draws, trajectory=traj)
        expected = _exact_logprob(model, traj)
        at_zero = per_draw(
            "trajectory-logprob", model, SCHEDULE, x0, draws.t, draws.eps, trajectory=traj
        )[:, 0]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-8)
    assert torch.equal(at_zero, torch.zeros(2, dtype=torch.float64))  # t = 0 excluded


def test_trajectory_logprob_monte_carlo_unbiased() -> None:
    model = TinyEps().double()
    traj = _trajectory(model, 2, seed=4)
    x0 = traj[:, -1]
    draws = _draws(2, 4000, seed=8)
    with torch.no_grad():
        vals = per_draw(
            "trajectory-logprob", model, SCHEDULE, x0, draws.t, draws.eps, trajectory=traj
        )
        expected = _exact_logprob(model, traj)
    se = vals.std(dim=1) / math.sqrt(draws.n_samples)
    assert torch.all((vals.mean(dim=1) - expected).abs() < 5 * se), (vals.mean(1), expected)


def test_trajectory_logprob_requires_trajectory() -> None:
    model, x0, draws = TinyEps(), _x0(2).float(), _draws(2, 3)
    with pytest.raises(ValueError, match="trajectory"):
        measure("trajectory-logprob", model, SCHEDULE, x0, draws)
    with pytest.raises(ValueError, match=r"T \+ 1"):
        measure(
            "trajectory-logprob", model, SCHEDULE, x0, draws, trajectory=torch.zeros(2, T, *SHAPE)
        )


# --------------------------------------------------------------------------- gradients
def _traj_for_grads(model: nn.Module, n: int) -> torch.Tensor:
    with torch.no_grad():
        return _trajectory(model, n, seed=6)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_of_measure_matches_brute_force(name: str) -> None:
    model = TinyEps().double()
    params = list(model.parameters())
    x0, draws = _x0(3), _draws(3, 4)
    traj = _traj_for_grads(model, 3)
    got = torch.autograd.grad(
        measure(name, model, SCHEDULE, x0, draws, trajectory=traj, chunk_size=5).sum(), params
    )
    expected = torch.autograd.grad(_brute_measure(name, model, x0, draws, traj).sum(), params)
    assert any(g.abs().sum() > 0 for g in expected)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_per_example_gradients_under_vmap(name: str) -> None:
    model = TinyEps().double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x0, draws = _x0(3), _draws(3, 4)
    traj = _traj_for_grads(model, 3)

    def item_value(p, x0_i, t_i, eps_i, traj_i):  # one item: [C, H, W], [S], [S, ...], [T+1, ...]
        def fmodel(x, t):
            return functional_call(model, p, (x, t))

        vals = per_draw(
            name, fmodel, SCHEDULE, x0_i[None], t_i[None], eps_i[None], trajectory=traj_i[None]
        )  # [1, S]
        return vals.mean()

    grads = vmap(grad(item_value), in_dims=(None, 0, 0, 0, 0))(
        params, x0, draws.t, draws.eps, traj
    )  # {name: [B, *param.shape]}
    for b in range(3):
        value = _brute_measure(name, model, x0[b : b + 1], draws.items(b, b + 1), traj[b : b + 1])
        expected = torch.autograd.grad(value.sum(), list(model.parameters()))
        for (key, _), e in zip(model.named_parameters(), expected, strict=True):
            torch.testing.assert_close(grads[key][b], e, rtol=1e-9, atol=1e-12)


def test_gradient_flows_to_x0_in_float32() -> None:
    model = TinyEps()
    x0 = _x0(2).float().requires_grad_(True)
    draws = draw_mc(2, 3, SHAPE, T, generator=torch.Generator().manual_seed(0))
    value = measure("loss", model, SCHEDULE, x0, draws)
    assert value.dtype == torch.float32 and value.shape == (2,)
    (g,) = torch.autograd.grad(value.sum(), x0)
    assert g.shape == x0.shape and g.abs().sum() > 0


# --------------------------------------------------------------------------- draws
def test_draw_mc_deterministic_shapes_and_common() -> None:
    def draw(seed: int, **kw) -> MCDraws:
        return draw_mc(4, 50, SHAPE, T, generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = draw(0), draw(0), draw(1)
    assert a.t.shape == (4, 50) and a.t.dtype == torch.long
    assert a.eps.shape == (4, 50, *SHAPE) and a.eps.dtype == torch.float32
    assert torch.equal(a.t, b.t) and torch.equal(a.eps, b.eps)
    assert not torch.equal(a.eps, c.eps)
    assert a.t.min() >= 0 and a.t.max() < T and len(torch.unique(a.t)) == T
    assert not torch.equal(a.t[0], a.t[1])  # independent rows by default
    common = draw(0, common=True)
    for i in range(1, 4):
        assert torch.equal(common.t[i], common.t[0]) and torch.equal(common.eps[i], common.eps[0])
    assert (common.n_items, common.n_samples) == (4, 50)
    part = a.chunk(10, 20)
    assert torch.equal(part.t, a.t[:, 10:20]) and torch.equal(part.eps, a.eps[:, 10:20])
    # identical items under common draws measure identically
    x0 = _x0(1).float().expand(4, *SHAPE)
    values = measure("loss", TinyEps(), SCHEDULE, x0, common)
    assert torch.equal(values, values[0].expand(4))


@pytest.mark.parametrize(
    "args",
    [(0, 5, SHAPE, T), (2, 0, SHAPE, T), (2, 5, (1, 2), T), (2, 5, SHAPE, 0), (2, 5, (1, 0, 2), T)],
)
def test_draw_mc_invalid_arguments(args: tuple) -> None:
    with pytest.raises(ValueError):
        draw_mc(*args, generator=torch.Generator())


def test_mcdraws_validation() -> None:
    with pytest.raises(ValueError, match="int64"):
        MCDraws(t=torch.zeros(2, 3), eps=torch.zeros(2, 3, *SHAPE))
    with pytest.raises(ValueError, match="eps"):
        MCDraws(t=torch.zeros(2, 3, dtype=torch.long), eps=torch.zeros(2, 4, *SHAPE))


def test_measure_validates_inputs() -> None:
    model, x0 = TinyEps(), _x0(2).float()
    bad_t = MCDraws(t=torch.full((2, 3), T), eps=torch.zeros(2, 3, *SHAPE))
    with pytest.raises(ValueError, match=r"\[0, T\)"):
        measure("loss", model, SCHEDULE, x0, bad_t)
    neg_t = MCDraws(t=torch.full((2, 3), -1), eps=torch.zeros(2, 3, *SHAPE))
    with pytest.raises(ValueError, match=r"\[0, T\)"):
        measure("loss", model, SCHEDULE, x0, neg_t)
    with pytest.raises(ValueError, match="draws"):
        measure("loss", model, SCHEDULE, _x0(3).float(), _draws(2, 3))
    with pytest.raises(ValueError, match="chunk_size"):
        measure("loss", model, SCHEDULE, x0, _draws(2, 3), chunk_size=0)
    with pytest.raises(ValueError, match="valid measurements"):
        measure("nll", model, SCHEDULE, x0, _draws(2, 3))


# --------------------------------------------------------------------------- names
def test_parse_measurement() -> None:
    assert set(MEASUREMENTS) == {
        "loss",
        "elbo",
        "square-norm",
        "mean-output",
        "trajectory-logprob",
        "timestep-loss",
    }
    for base in ("loss", "elbo", "square-norm", "mean-output", "trajectory-logprob"):
        assert parse_measurement(base) == (base, None)
    assert parse_measurement("timestep-loss:0", 10) == ("timestep-loss", 0)
    assert parse_measurement("timestep-loss:999", 1000) == ("timestep-loss", 999)


@pytest.mark.parametrize(
    "name,match",
    [
        ("los", "valid measurements: loss, elbo, square-norm, trajectory-logprob, timestep-loss"),
        ("", "valid measurements"),
        ("loss:3", "takes no parameter"),
        ("timestep-loss", "needs an integer timestep"),
        ("timestep-loss:abc", "needs an integer timestep"),
        ("timestep-loss:1.5", "needs an integer timestep"),
        ("timestep-loss:10", "out of range"),
        ("timestep-loss:-1", "out of range"),
    ],
)
def test_parse_measurement_errors(name: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_measurement(name, 10)


class CountingEps(nn.Module):
    """Wraps a denoiser and counts its forward calls."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x, t)


def test_many_measurements_equal_each_measurement_bitwise_with_shared_forwards():
    """measure_many / per_draw_many give each name exactly measure's / per_draw's value, with
    one forward for loss, elbo and square-norm together and one per other input."""
    torch.manual_seed(0)
    model = CountingEps(TinyEps().double())
    x0, draws = _x0(3), _draws(3, 7)
    traj = _trajectory(model.inner, 3)
    many = per_draw_many(NAMES, model, SCHEDULE, x0, draws.t, draws.eps, trajectory=traj)
    # loss + elbo + square-norm + mean-output: 1; timestep-loss:3 and :0: 1 each; trajectory-logprob: 1
    assert model.calls == 4
    for name in NAMES:
        alone = per_draw(name, model, SCHEDULE, x0, draws.t, draws.eps, trajectory=traj)
        assert torch.equal(many[name], alone), name
    model.calls = 0
    estimates = measure_many(NAMES, model, SCHEDULE, x0, draws, trajectory=traj, chunk_size=6)
    assert model.calls == 4 * 4  # chunks of 3 items x 2 samples: 4 chunks over the 7 samples
    for name in NAMES:
        alone = measure(name, model, SCHEDULE, x0, draws, trajectory=traj, chunk_size=6)
        assert torch.equal(estimates[name], alone), name


def test_many_measurements_refuse_bad_names():
    x0, draws = _x0(1), _draws(1, 2)
    model = TinyEps().double()
    with pytest.raises(ValueError, match="non-empty sequence"):
        measure_many("loss", model, SCHEDULE, x0, draws)
    with pytest.raises(ValueError, match="unknown measurement"):
        measure_many(("loss", "los"), model, SCHEDULE, x0, draws)
