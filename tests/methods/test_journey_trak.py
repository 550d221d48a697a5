"""Journey-TRAK against closed forms computed here with ``torch.func`` on a tiny model.

Reference (float64): the sampler's x0-prediction at code timestep t written out from the
trajectory state ``traj[:, T - 1 - t]``; per-example gradients by ``torch.func.grad`` of
``functional_call`` (not the engine), of each example's output function averaged over the same
draws the method uses (``methods.gradients.draw_examples``: an input of the method). With the
identity projection every step's score must be ``g_q(t)^T (G^T G + N p lambda I)^{-1} g_j``, G
the training gradients of the loss (``shared``) or of the loss at timestep t (``per-step``).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad

from benchmarks.lds import LDSConfig, _needs_trajectories
from benchmarks.store import ArtifactStore
from methods import create_method, get_method
from methods.gradients import draw_examples
from methods.journey_trak import JourneyTRAK, JourneyTRAKConfig, query_stream
from methods.trak import TRAIN_STREAM
from tests.methods.test_trak import (
    SCHEDULE,
    SIDE,
    T,
    TinyEps,
    assert_scores_close,
    closed_form,
    make_ctx,
    n_params,
)

N_TRAIN, N_QUERIES = 6, 3


def trajectories(n: int, seed: int = 5) -> torch.Tensor:
    """``# [n, T + 1, 1, SIDE, SIDE]`` float64 stand-in trajectories, large enough to clip."""
    gen = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(n, T + 1, 1, SIDE, SIDE, generator=gen, dtype=torch.float64)


def journey_ctx(model, **kw):
    ctx = make_ctx(model, N_TRAIN, N_QUERIES, **kw)
    return replace(ctx, query_trajectories=trajectories(N_QUERIES))


def mean_loss_grad(model, x0, t, eps) -> torch.Tensor:
    """``# [p]`` torch.func gradient of ``mean_s mean_pixels (eps_s - model(x_t_s, t_s))^2``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def value(p):
        abar = SCHEDULE.alpha_bars[t].to(x0.dtype)  # [S]
        x_t = abar.sqrt()[:, None, None, None] * x0 + (1 - abar).sqrt()[:, None, None, None] * eps
        out = functional_call(model, p, (x_t, t))  # [S, 1, SIDE, SIDE]
        return ((eps - out) ** 2).mean()

    grads = grad(value)(params)
    return torch.cat([grads[name].reshape(-1) for name, _ in model.named_parameters()])


def train_grads(model, ctx, timestep: int | None) -> torch.Tensor:
    """``# [N, p]``: the loss at the drawn timesteps, or at ``timestep`` for every draw."""
    rows = []
    for j in range(ctx.n_train):
        d = draw_examples(
            [j], ctx.grad_samples, (1, SIDE, SIDE), T, seed=ctx.seed, stream=TRAIN_STREAM
        )
        t = d.t[0] if timestep is None else torch.full_like(d.t[0], timestep)
        rows.append(mean_loss_grad(model, ctx.train_images[j], t, d.eps[0].double()))
    return torch.stack(rows)


def reference_x0(model, traj: torch.Tensor, timestep: int, clip: bool = True) -> torch.Tensor:
    """The x0-prediction from the state denoised at code timestep ``timestep``."""
    x = traj[:, T - 1 - timestep]
    abar = SCHEDULE.alpha_bars[timestep]
    with torch.no_grad():
        eps_hat = model(x, torch.full((x.shape[0],), timestep))
    x0 = (x - (1 - abar).sqrt() * eps_hat) / abar.sqrt()
    return x0.clamp(-1, 1) if clip else x0


def query_grads(model, ctx, timestep: int, n_samples: int) -> torch.Tensor:
    """``# [n_queries, p]``: loss at ``timestep`` of the re-noised x0-prediction, fresh noise."""
    x0 = reference_x0(model, ctx.query_trajectories, timestep)
    rows = []
    for q in range(ctx.n_queries):
        d = draw_examples(
            [q], n_samples, (1, SIDE, SIDE), T, seed=ctx.seed, stream=query_stream(timestep)
        )
        t = torch.full((n_samples,), timestep)
        rows.append(mean_loss_grad(model, x0[q], t, d.eps[0].double()))
    return torch.stack(rows)


@pytest.mark.parametrize("train_features", ["shared", "per-step"])
def test_per_step_scores_equal_the_closed_form(train_features):
    model = TinyEps(hidden=2, seed=4).double()  # 43 parameters
    ctx = journey_ctx(model)
    p = n_params(model)
    method = JourneyTRAK(
        JourneyTRAKConfig(
            projector="identity", n_steps=3, query_samples=5, train_features=train_features
        )
    )
    steps = method.timesteps(T)
    assert steps == [49, 24, 0]
    # clipping is exercised: some x0-predictions leave [-1, 1]
    assert (reference_x0(model, ctx.query_trajectories, 24, clip=False).abs() > 1).any()

    per_step = method.per_step_scores(ctx)
    assert per_step.shape == (3, N_QUERIES, N_TRAIN) and per_step.dtype == np.float64
    shared_grads = train_grads(model, ctx, None)
    for s, t in enumerate(steps):
        g_train = shared_grads if train_features == "shared" else train_grads(model, ctx, t)
        ridge = N_TRAIN * p * method.config.damping
        expected = closed_form(g_train, query_grads(model, ctx, t, 5), ridge)
        assert_scores_close(per_step[s], expected)
    np.testing.assert_allclose(method.score(ctx), per_step.mean(axis=0), rtol=1e-12)


def test_one_step_with_damping_and_sum_aggregate():
    """One step (t = 0), a damping that matters, ``aggregate="sum"``."""
    model = TinyEps(hidden=2, seed=6).double()
    ctx = journey_ctx(model)
    g_train = train_grads(model, ctx, 0)
    ridge = 0.05 * float((g_train**2).sum()) / N_TRAIN
    damping = ridge / (N_TRAIN * n_params(model))
    method = create_method(
        "journey-trak",
        projector="identity",
        n_steps=1,
        damping=damping,
        train_features="per-step",
        aggregate="sum",
    )
    expected = closed_form(g_train, query_grads(model, ctx, 0, 20), ridge)  # 20: their default
    assert_scores_close(method.score(ctx), expected)


def test_aggregates_and_per_step_output(tmp_path):
    model = TinyEps(hidden=2, seed=7)
    ctx = journey_ctx(model, dtype=torch.float32)
    path = tmp_path / "out" / "per_step.npy"
    common = dict(projector="identity", n_steps=4, query_samples=2, damping=1e-3)
    mean_scores = create_method("journey-trak", per_step_output=str(path), **common).score(ctx)
    per_step = np.load(path)
    assert per_step.shape == (4, N_QUERIES, N_TRAIN)
    np.testing.assert_array_equal(
        np.load(tmp_path / "out" / "per_step.timesteps.npy"), [49, 33, 16, 0]
    )
    np.testing.assert_allclose(mean_scores, per_step.mean(axis=0), rtol=1e-12)
    sums = create_method("journey-trak", aggregate="sum", **common).score(ctx)
    np.testing.assert_allclose(sums, per_step.sum(axis=0), rtol=1e-12)
    assert not np.allclose(per_step[0], per_step[-1])  # the steps differ


def test_missing_or_misshapen_trajectories_raise_a_clear_error():
    model = TinyEps(hidden=2)
    method = create_method("journey-trak", projector="identity", n_steps=1)
    with pytest.raises(ValueError, match="query_trajectories is None.*benchmarks.lds"):
        method.score(make_ctx(model, N_TRAIN, N_QUERIES))
    bad = replace(journey_ctx(model), query_trajectories=trajectories(N_QUERIES)[:, :T])
    with pytest.raises(ValueError, match=r"\[n_queries, T \+ 1, C, H, W\]"):
        method.score(bad)


def test_shared_features_are_trak_cache_entry(tmp_path):
    """With the same training config, journey-trak reuses TRAK's featurised work directory."""
    model = TinyEps(hidden=2, seed=8)
    ctx = journey_ctx(model, dtype=torch.float32)
    ctx = replace(ctx, cache=ArtifactStore(tmp_path), train_spec={"test": "journey"})
    create_method("trak", projector="identity", damping=1e-3, proj_dim=2048).score(ctx)
    work = tmp_path / "_work" / "trak"
    before = sorted(p.name for p in work.iterdir())
    create_method("journey-trak", projector="identity", damping=1e-3, n_steps=2).score(ctx)
    assert sorted(p.name for p in work.iterdir()) == before and len(before) == 1
    create_method("journey-trak", projector="identity", train_features="per-step", n_steps=2).score(
        ctx
    )
    assert len(list(work.iterdir())) == 3  # one featurisation per step


def test_timesteps_and_config_validation():
    assert JourneyTRAK(JourneyTRAKConfig(n_steps=100)).timesteps(T) == list(range(T - 1, -1, -1))
    assert JourneyTRAK(JourneyTRAKConfig(n_steps=2)).timesteps(1000) == [999, 0]
    for bad in (
        {"output_function": "square-norm"},
        {"n_steps": 0},
        {"aggregate": "max"},
        {"train_features": "all"},
        {"clip_x0": 1},
        {"per_step_output": 3},
    ):
        with pytest.raises(ValueError):
            JourneyTRAKConfig(**bad)


def test_registry_entry_declares_it_needs_trajectories():
    entry = get_method("journey-trak")
    assert entry.display_name == "Journey-TRAK"
    assert entry.needs_query_trajectories
    assert not get_method("trak").needs_query_trajectories
    config = entry.config()
    assert (config.proj_dim, config.query_samples, config.aggregate) == (2048, 20, "mean")


def test_lds_runner_stores_trajectories_for_it():
    assert _needs_trajectories(LDSConfig(methods=("trak", "journey-trak")))
    assert not _needs_trajectories(LDSConfig(methods=("trak",)))
    assert _needs_trajectories(LDSConfig(methods=("trak",), targets=("trajectory-logprob",)))
