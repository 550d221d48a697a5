"""Counterfactual sanity check with real retraining: removing the training examples that K-FAC
influence scores highest for a query raises that query's loss more than removing random ones.

The model is a linear denoiser ``eps_theta(x_t, t) = W x_t + b`` on 8x8 digits. Its diffusion
loss is quadratic in ``theta = [W | b]`` and its expectation over ``t ~ U{0..T-1}`` and
``eps ~ N(0, I)`` has a closed form, so "training to convergence" on any subset is an exact
least-squares solve: the retraining is real and free of optimisation noise. Per example
``x`` (``d`` pixels), with ``z = [x_t; 1]``, ``a_t = sqrt(abar_t)``, ``s_t = sqrt(1 - abar_t)``:

    E[z z^T] = [[E[a^2] x x^T + E[s^2] I, E[a] x], [E[a] x^T, 1]],   E[eps z^T] = [E[s] I | 0],
    l(theta, x) = (d - 2 tr(theta E[z eps^T]) + tr(theta E[z z^T] theta^T)) / d,

and the optimum on a subset S is ``theta* = (sum_S E[eps z^T]) (sum_S E[z z^T])^-1``.
The method sees only the trained ``nn.Linear`` and Monte Carlo draws, as in the benchmark.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from diffusion.schedule import NoiseSchedule
from methods.context import MethodContext
from methods.kfac import KFACInfluence
from tests.methods.conftest import digits_images

SCHEDULE = NoiseSchedule(num_timesteps=20, beta_start=1e-3, beta_end=0.1)
N_TRAIN, N_QUERIES, N_REMOVE = 40, 6, 5


class LinearDenoiser(nn.Module):
    def __init__(self, theta: torch.Tensor) -> None:
        super().__init__()
        d = theta.shape[0]
        self.lin = nn.Linear(d, d)
        with torch.no_grad():
            self.lin.weight.copy_(theta[:, :d])
            self.lin.bias.copy_(theta[:, d])

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.lin(x_t.flatten(1)).view_as(x_t)


def _moments(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example ``E[z z^T] # [n, d+1, d+1]`` and the shared ``E[eps z^T] # [d, d+1]``."""
    abar = SCHEDULE.alpha_bars  # [T] float64, t uniform
    ea, ea2, es, es2 = abar.sqrt().mean(), abar.mean(), (1 - abar).sqrt().mean(), (1 - abar).mean()
    x = images.flatten(1).to(torch.float64)  # [n, d]
    n, d = x.shape
    m = torch.zeros(n, d + 1, d + 1, dtype=torch.float64)
    m[:, :d, :d] = ea2 * x[:, :, None] * x[:, None, :] + es2 * torch.eye(d, dtype=torch.float64)
    m[:, :d, d] = ea * x
    m[:, d, :d] = ea * x
    m[:, d, d] = 1.0
    c = torch.cat([es * torch.eye(d, dtype=torch.float64), torch.zeros(d, 1)], dim=1)
    return m, c


def _train(m_train: torch.Tensor, c: torch.Tensor, keep: np.ndarray) -> torch.Tensor:
    """Exact minimiser of the expected loss summed over the kept examples ``# [d, d+1]``."""
    mask = torch.from_numpy(keep)
    total_m = m_train[mask].sum(0)
    return torch.linalg.solve(total_m, (int(keep.sum()) * c).T).T


def _loss(theta: torch.Tensor, m_q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Exact expected loss of each query ``# [n_q]``."""
    d = theta.shape[0]
    cross = torch.einsum("ij,ij->", theta, c)  # tr(theta c^T)
    quad = torch.einsum("ij,qjk,ik->q", theta, m_q, theta)  # tr(theta M theta^T)
    return (d - 2 * cross + quad) / d


@pytest.fixture(scope="module")
def problem():
    images = digits_images(0, N_TRAIN + N_QUERIES)
    train, queries = images[:N_TRAIN], images[N_TRAIN:]
    m_train, c = _moments(train)
    m_query, _ = _moments(queries)
    full = np.ones(N_TRAIN, dtype=bool)
    theta = _train(m_train, c, full)
    return train, queries, m_train, m_query, c, theta


def test_exact_training_is_a_minimum(problem):
    """The closed form is a stationary point: perturbing theta raises the training loss."""
    _, _, m_train, _, c, theta = problem
    base = _loss(theta, m_train, c).mean()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        step = 1e-3 * torch.randn(theta.shape, generator=gen, dtype=torch.float64)
        assert _loss(theta + step, m_train, c).mean() > base


def test_removing_top_scored_examples_raises_the_query_loss_more_than_random(problem):
    train, queries, m_train, m_query, c, theta = problem
    model = LinearDenoiser(theta.float()).eval()
    ctx = MethodContext(
        model=model,
        schedule=SCHEDULE,
        train_images=train,
        query_images=queries,
        measurement="loss",
        grad_samples=256,
        query_samples=256,
        fit_samples=64,
        seed=0,
    )
    scores = KFACInfluence().score(ctx)  # default: GGN^model MC-Fisher, expand, int8
    assert scores.shape == (N_QUERIES, N_TRAIN)
    base = _loss(theta, m_query, c)  # [n_q]
    rng = np.random.default_rng(0)
    top_changes, random_changes = [], []
    for q in range(N_QUERIES):
        keep = np.ones(N_TRAIN, dtype=bool)
        keep[np.argsort(-scores[q])[:N_REMOVE]] = False
        top_changes.append(
            float(_loss(_train(m_train, c, keep), m_query[q : q + 1], c)[0] - base[q])
        )
        for _ in range(10):
            keep = np.ones(N_TRAIN, dtype=bool)
            keep[rng.choice(N_TRAIN, N_REMOVE, replace=False)] = False
            change = _loss(_train(m_train, c, keep), m_query[q : q + 1], c)[0] - base[q]
            random_changes.append(float(change))
    top, rand = np.mean(top_changes), np.mean(random_changes)
    print(f"mean loss change: top-{N_REMOVE} {top:.3e}, random {rand:.3e}")
    assert top > 0
    assert top > 2 * max(rand, 0.0), (top_changes, rand)
    assert sum(t > rand for t in top_changes) >= N_QUERIES - 1


def test_predicted_changes_track_actual_retraining(problem):
    """Sum of removed examples' scores vs the actual loss change over random 50 % subsets
    (a small LDS): strongly rank-correlated for a quadratic problem."""
    from scipy.stats import spearmanr

    train, queries, m_train, m_query, c, theta = problem
    model = LinearDenoiser(theta.float()).eval()
    ctx = MethodContext(
        model=model,
        schedule=SCHEDULE,
        train_images=train,
        query_images=queries,
        grad_samples=256,
        query_samples=256,
        fit_samples=64,
    )
    scores = KFACInfluence().score(ctx)
    base = _loss(theta, m_query, c).numpy()
    rng = np.random.default_rng(1)
    predicted, actual = [], []
    for _ in range(30):
        keep = np.zeros(N_TRAIN, dtype=bool)
        keep[rng.permutation(N_TRAIN)[: N_TRAIN // 2]] = True
        predicted.append(scores[:, ~keep].sum(1))
        actual.append(_loss(_train(m_train, c, keep), m_query, c).numpy() - base)
    predicted, actual = np.array(predicted), np.array(actual)  # [subsets, n_q]
    correlations = [spearmanr(predicted[:, q], actual[:, q])[0] for q in range(N_QUERIES)]
    print("per-query Spearman:", np.round(correlations, 3))
    assert np.mean(correlations) > 0.5, correlations
