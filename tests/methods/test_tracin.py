"""TracIn-CP (methods/tracin.py) against closed forms computed here.

On a linear denoiser ``eps_theta(x_t) = W x_t + b`` the reference rebuilds every gradient
independently in float64 with ``torch.func`` on a flat parameter vector and explicit loops over
examples and draws; only the draws are shared with the code under test (same seeds and streams),
so both sides see the same data.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from diffusion.schedule import NoiseSchedule
from methods import MethodUnavailableError, get_method
from methods.context import MethodContext
from methods.gradients import draw_examples
from methods.kfac import QUERY_STREAM, TRAIN_STREAM
from methods.tracin import TracIn, TracInConfig

SCHEDULE = NoiseSchedule(num_timesteps=20, beta_start=1e-3, beta_end=0.1)
SHAPE = (1, 3, 3)
D = 9
N_TRAIN, N_QUERIES = 6, 2
LEARNING_RATES = (0.5, 0.2, 0.05)


class LinearDenoiser(nn.Module):
    """``eps_theta(x_t, t) = W vec(x_t) + b`` (t ignored)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.lin(x_t.flatten(1)).view_as(x_t)


def linear_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)  # nn's default init, fixed
    return LinearDenoiser().double().eval()


def make_ctx(hflip: bool = False, checkpoints=None, **overrides) -> MethodContext:
    """6 training images, 2 queries, 3 linear-denoiser checkpoints, all float64."""
    gen = torch.Generator().manual_seed(5)
    images = torch.rand((N_TRAIN + N_QUERIES, *SHAPE), generator=gen, dtype=torch.float64) * 2 - 1
    if checkpoints is None:
        checkpoints = [(lr, linear_model(10 + k)) for k, lr in enumerate(LEARNING_RATES)]

    def checkpoints_fn(n_checkpoints: int):
        return checkpoints[-n_checkpoints:]

    values = {
        "model": checkpoints[-1][1],
        "schedule": SCHEDULE,
        "train_images": images[:N_TRAIN],
        "query_images": images[N_TRAIN:],
        "hflip": hflip,
        "seed": 0,
        "checkpoints_fn": checkpoints_fn,
        "grad_samples": 3,
        "query_samples": 4,
    }
    return MethodContext(**{**values, **overrides})


# --------------------------------------------------------------------------- reference


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([model.lin.weight.detach().flatten(), model.lin.bias.detach()])


def _draw_loss(model, flat, x0, t, eps) -> torch.Tensor:
    """One draw's loss ``mean (eps - eps_theta(x_t))^2`` with parameters ``flat``."""
    eps = eps.to(torch.float64)
    abar = SCHEDULE.alpha_bars[t]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    params = {"lin.weight": flat[: D * D].view(D, D), "lin.bias": flat[D * D :]}
    pred = functional_call(model, params, (x_t[None], t.view(1)))[0]
    return (eps - pred).square().mean()


def _mean_loss(model, flat, x, draws, row, hflip) -> torch.Tensor:
    """Mean over example ``row``'s draws of the loss of ``x`` (flipped where drawn)."""
    values = []
    for s in range(draws.t.shape[1]):
        xs = x.flip(-1) if hflip and bool(draws.flip[row, s]) else x
        values.append(_draw_loss(model, flat, xs, draws.t[row, s], draws.eps[row, s]))
    return torch.stack(values).mean()


def gradients(ctx: MethodContext, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(# [Q, P] query loss gradients, # [N, P] training loss gradients)`` at ``model``."""
    theta = _flat(model)
    qd = draw_examples(range(N_QUERIES), ctx.query_samples, SHAPE, 20, seed=0, stream=QUERY_STREAM)
    td = draw_examples(
        range(N_TRAIN), ctx.grad_samples, SHAPE, 20, seed=0, stream=TRAIN_STREAM, hflip=ctx.hflip
    )
    query = torch.stack(
        [
            grad(lambda f, q=q: _mean_loss(model, f, ctx.query_images[q], qd, q, False))(theta)
            for q in range(N_QUERIES)
        ]
    )
    train = torch.stack(
        [
            grad(lambda f, j=j: _mean_loss(model, f, ctx.train_images[j], td, j, ctx.hflip))(theta)
            for j in range(N_TRAIN)
        ]
    )
    return query, train


def reference_scores(ctx: MethodContext, n_checkpoints: int) -> np.ndarray:
    """``# [Q, N]`` ``sum_k lr_k <grad m(w_k, x_q), grad l(w_k, x_j)>``, independently."""
    total = torch.zeros(N_QUERIES, N_TRAIN, dtype=torch.float64)
    for lr, model in ctx.checkpoints_fn(n_checkpoints):
        query, train = gradients(ctx, model)
        total += lr * query @ train.T
    return total.numpy()


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("hflip", [False, True])
def test_scores_are_the_lr_weighted_sum_of_gradient_dot_products(hflip: bool) -> None:
    ctx = make_ctx(hflip=hflip)
    scores = TracIn(TracInConfig(n_checkpoints=3, batch_size=4)).score(ctx)
    expected = reference_scores(ctx, 3)
    assert scores.shape == (N_QUERIES, N_TRAIN) and scores.dtype == np.float64
    np.testing.assert_allclose(scores, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())
    # each checkpoint counts: dropping the first one changes the scores
    assert not np.allclose(reference_scores(ctx, 2), expected, rtol=1e-3)


def test_the_config_sample_counts_override_the_contexts() -> None:
    ctx = make_ctx()
    scores = TracIn(TracInConfig(n_checkpoints=2, grad_samples=2, query_samples=5)).score(ctx)
    expected = reference_scores(replace(ctx, grad_samples=2, query_samples=5), 2)
    np.testing.assert_allclose(scores, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())


def test_one_final_checkpoint_at_lr_one_is_n_times_grad_dot() -> None:
    model = linear_model(3)
    ctx = make_ctx(checkpoints=[(1.0, model)])
    scores = get_method("tracin").build(n_checkpoints=1).score(ctx)
    grad_dot = get_method("grad-dot").build(quantize=None).score(ctx)  # <grad m, grad l> / N
    np.testing.assert_allclose(scores, N_TRAIN * grad_dot, rtol=1e-12, atol=0)


def test_sign_predicts_the_measurement_increase_when_an_example_is_left_out() -> None:
    """One SGD step of the mean training loss from the checkpoint, with and without example j:
    leaving j out raises the query loss by ``lr / N * <grad m, grad l_j>`` to first order, i.e.
    by the TracIn score (one checkpoint at that lr) over N."""
    lr, model = 1e-4, linear_model(4)
    ctx = make_ctx(checkpoints=[(lr, model)])
    scores = TracIn(TracInConfig(n_checkpoints=1)).score(ctx)
    qd = draw_examples(range(N_QUERIES), 4, SHAPE, 20, seed=0, stream=QUERY_STREAM)
    _, train = gradients(ctx, model)
    theta = _flat(model)
    full = theta - lr * train.sum(0) / N_TRAIN
    measured = np.zeros((N_QUERIES, N_TRAIN))
    for j in range(N_TRAIN):
        without = theta - lr * (train.sum(0) - train[j]) / N_TRAIN
        for q in range(N_QUERIES):
            x = ctx.query_images[q]
            after = _mean_loss(model, without, x, qd, q, False)
            before = _mean_loss(model, full, x, qd, q, False)
            measured[q, j] = float(after - before)
    np.testing.assert_allclose(scores / N_TRAIN, measured, rtol=1e-3, atol=0)
    assert (np.sign(scores) == np.sign(measured)).all()


def test_batch_size_does_not_change_the_scores() -> None:
    ctx = make_ctx(hflip=True)
    a = TracIn(TracInConfig(n_checkpoints=3, batch_size=1)).score(ctx)
    b = TracIn(TracInConfig(n_checkpoints=3, batch_size=5)).score(ctx)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14 * np.abs(a).max())


def test_unavailable_without_checkpoints() -> None:
    ctx = make_ctx(checkpoints_fn=None)
    with pytest.raises(MethodUnavailableError, match="checkpoints_fn"):
        TracIn().score(ctx)


def test_a_wrong_checkpoint_count_is_an_error() -> None:
    ctx = make_ctx()
    with pytest.raises(RuntimeError, match="returned 3 checkpoints"):
        TracIn(TracInConfig(n_checkpoints=4)).score(ctx)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"n_checkpoints": 0}, "n_checkpoints"),
        ({"n_checkpoints": True}, "n_checkpoints"),
        ({"batch_size": 0}, "batch_size"),
        ({"grad_samples": 0}, "grad_samples"),
        ({"query_samples": 1.5}, "query_samples"),
        ({"measurement": "nope"}, "measurement"),
        ({"backend": "nope"}, "backend"),
    ],
)
def test_invalid_config_raises(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TracInConfig(**changes)


def test_registry_entry() -> None:
    entry = get_method("tracin")
    assert entry.display_name == "TracIn-CP"
    assert entry.config() == TracInConfig()
    assert TracInConfig().n_checkpoints == 4
