"""Attribution by unlearning (methods/unlearn.py) against closed forms computed here.

On a linear denoiser ``eps_theta(x_t) = W x_t + b`` every per-draw loss is quadratic in theta,
so a training example's loss change under a parameter step ``delta`` is exactly
``grad L_j^T delta + delta^T H_j delta / 2``. The reference rebuilds everything independently in
float64 with ``torch.func`` on a flat parameter vector and explicit loops over examples and
draws: the diagonal Fisher (each draw's gradient squared), the query gradient, the
Fisher-preconditioned step(s) ``lr * g / (w * (F + d * mean F))``, and ``grad L_j`` / ``H_j`` of
each example's loss on the evenly spaced timesteps. Only the draws are shared with the code
under test (same seeds and streams), so both sides see the same data.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian

from diffusion.schedule import NoiseSchedule
from methods import create_method, get_method
from methods.context import MethodContext
from methods.gradients import draw_examples
from methods.unlearn import (
    CACHE_KIND,
    FISHER_STREAM,
    LOSS_STREAM,
    QUERY_STREAM,
    Unlearn,
    UnlearnConfig,
    loss_timestep_grid,
)
from tests.methods.conftest import DictCache

SCHEDULE = NoiseSchedule(num_timesteps=20, beta_start=1e-3, beta_end=0.1)
SHAPE = (1, 3, 3)
D = 9
N_TRAIN, N_QUERIES = 6, 2


class LinearDenoiser(nn.Module):
    """``eps_theta(x_t, t) = W vec(x_t) + b`` (t ignored)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.lin(x_t.flatten(1)).view_as(x_t)


def make_ctx(hflip: bool = False, seed: int = 0, **overrides) -> MethodContext:
    """6 training images, 2 queries, a seeded linear denoiser, all float64."""
    torch.manual_seed(3)
    model = LinearDenoiser().double().eval()
    gen = torch.Generator().manual_seed(5)
    images = torch.rand((N_TRAIN + N_QUERIES, *SHAPE), generator=gen, dtype=torch.float64) * 2 - 1
    values = {
        "model": model,
        "schedule": SCHEDULE,
        "train_images": images[:N_TRAIN],
        "query_images": images[N_TRAIN:],
        "hflip": hflip,
        "seed": seed,
        "train_spec": {"test": "unlearn-linear"},
        "grad_samples": 3,
        "fit_samples": 2,
        "query_samples": 4,
    }
    return MethodContext(**{**values, **overrides})


# --------------------------------------------------------------------------- reference


def _params(flat: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"lin.weight": flat[: D * D].view(D, D), "lin.bias": flat[D * D :]}


def _draw_loss(model, flat, x0, t, eps) -> torch.Tensor:
    """One draw's loss ``mean (eps - eps_theta(x_t))^2`` with parameters ``flat``."""
    eps = eps.to(torch.float64)  # drawn in float32; a 0-dim float64 factor would not promote it
    abar = SCHEDULE.alpha_bars[t]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    pred = functional_call(model, _params(flat), (x_t[None], t.view(1)))[0]
    return (eps - pred).square().mean()


def reference_scores(ctx: MethodContext, cfg: UnlearnConfig, mask: torch.Tensor) -> np.ndarray:
    """``# [Q, N]`` exact scores of ``cfg`` on the linear denoiser; ``mask``: updated params."""
    model = ctx.model
    theta0 = torch.cat([p.detach().flatten() for p in model.parameters()])
    loss_of = lambda flat, x, t, e: _draw_loss(model, flat, x, t, e)  # noqa: E731
    draw_grad = grad(loss_of)

    # diagonal Fisher: each draw's gradient squared, mean over examples and draws
    n_fit = cfg.fit_samples or ctx.fit_samples
    fit = draw_examples(
        range(N_TRAIN), n_fit, SHAPE, 20, seed=ctx.seed, stream=FISHER_STREAM, hflip=ctx.hflip
    )
    fisher = torch.zeros_like(theta0)
    for j in range(N_TRAIN):
        for s in range(n_fit):
            x = ctx.train_images[j]
            x = x.flip(-1) if ctx.hflip and bool(fit.flip[j, s]) else x
            fisher += draw_grad(theta0, x, fit.t[j, s], fit.eps[j, s]).square()
    fisher = fisher[mask] / (N_TRAIN * n_fit)
    weight = N_TRAIN if cfg.ewc_weight is None else cfg.ewc_weight
    metric = weight * (fisher + cfg.fisher_damping * fisher.mean())

    # each training example's loss on the strided timesteps, one noise draw each
    grid = loss_timestep_grid(cfg.loss_timesteps, 20)
    noise = draw_examples(
        range(N_TRAIN), cfg.loss_timesteps, SHAPE, 20, seed=ctx.seed, stream=LOSS_STREAM
    ).eps
    views = (False, True) if ctx.hflip else (False,)

    def example_loss(flat, j, flipped):
        x = ctx.train_images[j].flip(-1) if flipped else ctx.train_images[j]
        draws = [loss_of(flat, x, grid[s], noise[j, s]) for s in range(cfg.loss_timesteps)]
        return torch.stack(draws).mean()

    scores = np.zeros((N_QUERIES, N_TRAIN))
    n_query = cfg.query_samples or ctx.query_samples
    for q in range(N_QUERIES):
        theta = theta0.clone()
        for step in range(cfg.steps):
            qd = draw_examples(
                [q], n_query, SHAPE, 20, seed=ctx.seed, stream=f"{QUERY_STREAM}-{step}"
            )
            g = (
                sum(
                    draw_grad(theta, ctx.query_images[q], qd.t[0, s], qd.eps[0, s])
                    for s in range(n_query)
                )
                / n_query
            )
            theta[mask] += cfg.lr * g[mask] / metric
        delta = theta - theta0
        for j in range(N_TRAIN):
            changes = []
            for flipped in views:
                f = lambda flat, j=j, flipped=flipped: example_loss(flat, j, flipped)  # noqa: E731
                change = grad(f)(theta0) @ delta + 0.5 * delta @ hessian(f)(theta0) @ delta
                changes.append(float(change))
            scores[q, j] = max(changes)
    return scores


# --------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize(
    ("hflip", "overrides"),
    [
        (False, {}),  # their defaults: one step, lr 0.01, EWC weight N
        (True, {}),  # max over the two orientations
        (False, {"steps": 2, "lr": 0.05, "ewc_weight": 3.0, "fisher_damping": 0.1}),
        (False, {"param_patterns": ("bias",), "loss_timesteps": 7}),
    ],
)
def test_scores_equal_the_closed_form_on_a_linear_denoiser(hflip, overrides):
    ctx = make_ctx(hflip=hflip)
    cfg = UnlearnConfig(**overrides)
    mask = torch.ones(D * D + D, dtype=torch.bool)
    if cfg.param_patterns:
        mask[: D * D] = False  # only the bias
    expected = reference_scores(ctx, cfg, mask)
    scores = Unlearn(cfg).score(ctx)
    assert scores.shape == (N_QUERIES, N_TRAIN) and scores.dtype == np.float64
    assert np.abs(expected).max() > 1e-6  # the step does move the losses
    np.testing.assert_allclose(scores, expected, rtol=1e-7, atol=1e-10 * np.abs(expected).max())


def test_default_hyper_parameters_are_theirs():
    cfg = get_method("unlearn").config()
    assert (cfg.steps, cfg.lr, cfg.ewc_weight, cfg.fit_samples, cfg.loss_timesteps) == (
        1,
        0.01,
        None,
        5,
        20,
    )
    assert cfg.param_patterns == ()  # every parameter: their "all"


def test_loss_timestep_grid_is_their_stride_grid():
    # theirs: torch.arange(0, T, T // S) (mscoco/compute_training_loss.py)
    assert loss_timestep_grid(20, 1000).tolist() == list(range(0, 1000, 50))
    assert loss_timestep_grid(4, 10).tolist() == [0, 2, 5, 7]


def test_a_huge_ewc_weight_shrinks_scores_in_proportion():
    ctx = make_ctx()
    base = Unlearn(UnlearnConfig(ewc_weight=1e4)).score(ctx)
    huge = Unlearn(UnlearnConfig(ewc_weight=1e10)).score(ctx)
    assert np.abs(huge).max() < 1e-5 * np.abs(base).max()
    # in the linear regime the change is first order in the step, which scales as 1 / weight
    np.testing.assert_allclose(huge * 1e6, base, rtol=1e-3, atol=1e-6 * np.abs(base).max())


def test_the_query_that_is_a_training_example_is_its_own_top_score():
    ctx = make_ctx()
    ctx = replace(ctx, query_images=ctx.train_images[[1, 4]].clone(), query_samples=256)
    scores = Unlearn().score(ctx)
    assert scores.argmax(axis=1).tolist() == [1, 4]


def test_seed_determines_the_scores():
    first = Unlearn().score(make_ctx(seed=0))
    np.testing.assert_array_equal(Unlearn().score(make_ctx(seed=0)), first)
    assert not np.allclose(Unlearn().score(make_ctx(seed=1)), first)


def test_the_fisher_is_cached_on_the_training_side_only():
    cache = DictCache()
    ctx = make_ctx(cache=cache)
    uncached = Unlearn().score(make_ctx())
    np.testing.assert_allclose(Unlearn().score(ctx), uncached, rtol=1e-12)
    assert cache.computed == 1
    other_queries = replace(ctx, query_images=ctx.query_images.flip(-1))
    Unlearn(UnlearnConfig(lr=0.1, steps=2)).score(other_queries)  # same Fisher
    assert cache.computed == 1
    assert all(kind == CACHE_KIND for kind, _ in cache.entries)
    Unlearn(UnlearnConfig(fit_samples=3)).score(ctx)  # a different Fisher
    assert cache.computed == 2


def test_batch_size_does_not_change_the_scores():
    ctx = make_ctx(hflip=True)
    a = create_method("unlearn", batch_size=1).score(ctx)
    b = create_method("unlearn", batch_size=4).score(ctx)
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    "bad",
    [
        {"steps": 0},
        {"lr": 0.0},
        {"lr": float("nan")},
        {"ewc_weight": -1.0},
        {"fisher_damping": -1e-3},
        {"fit_samples": 0},
        {"query_samples": 1.5},
        {"loss_timesteps": 0},
        {"param_patterns": "attn"},
        {"param_patterns": ("",)},
        {"batch_size": 0},
        {"backend": "jit"},
    ],
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        UnlearnConfig(**bad)


def test_patterns_that_select_nothing_are_refused():
    with pytest.raises(ValueError, match="select no parameter"):
        Unlearn(UnlearnConfig(param_patterns=("attn2.to_k",))).score(make_ctx())


def test_an_undamped_zero_fisher_under_a_query_gradient_is_refused():
    class GatedDenoiser(LinearDenoiser):
        """The bias acts only where a pixel exceeds 5: never on the training noise levels."""

        def forward(self, x_t, t):
            gate = (x_t.flatten(1)[:, :1] > 5.0).to(x_t.dtype)
            return (self.lin.weight @ x_t.flatten(1).T).T.view_as(x_t) + (
                gate * self.lin.bias
            ).view_as(x_t)

    torch.manual_seed(0)
    model = GatedDenoiser().double().eval()
    ctx = make_ctx(model=model)
    ctx = replace(ctx, query_images=torch.full_like(ctx.query_images, 50.0))
    with pytest.raises(ValueError, match="fisher_damping > 0"):
        Unlearn(UnlearnConfig(fisher_damping=0.0)).score(ctx)
    assert np.isfinite(Unlearn().score(ctx)).all()  # the default damping bounds the step
