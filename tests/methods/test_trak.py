"""TRAK / D-TRAK against closed forms computed here from independent per-example gradients.

Reference (float64, explicit loop over examples and draws, plain autograd): the gradient g of
each example's output function, a mean over the same Monte Carlo draws the method uses
(``methods.gradients.draw_examples``: an input, not an output, of the method; ``grad_samples``
draws per training example, ``query_samples`` per query). With the identity projection,
TRAK must equal ``g_q^T (G^T G + N p lambda I)^{-1} g_j`` (module docstring of methods.trak).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn
from trak import TRAKer

from benchmarks.store import ArtifactStore
from diffusion.schedule import NoiseSchedule
from methods import MethodContext, create_method, get_method
from methods.gradients import draw_examples
from methods.trak import QUERY_STREAM, TRAIN_STREAM, TRAK, TRAKConfig

T = 50
SCHEDULE = NoiseSchedule(num_timesteps=T)
SIDE = 4


class TinyEps(nn.Module):
    """``eps(x_t, t) = conv2(tanh(conv1(x_t) + temb(t / T)))``: 21 * hidden + 1 parameters."""

    def __init__(self, hidden: int = 3, seed: int = 0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, hidden, 3, padding=1)
        self.temb = nn.Linear(1, hidden)
        self.conv2 = nn.Conv2d(hidden, 1, 3, padding=1)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.temb(t.to(x.dtype)[:, None] / T)[:, :, None, None]  # [B, hidden, 1, 1]
        return self.conv2(torch.tanh(self.conv1(x) + temb))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_ctx(model, n_train, n_queries, *, dtype=torch.float64, **kw) -> MethodContext:
    gen = torch.Generator().manual_seed(123)
    images = torch.rand(n_train + n_queries, 1, SIDE, SIDE, generator=gen, dtype=dtype) * 2 - 1
    defaults = dict(measurement="loss", seed=7, grad_samples=4, query_samples=3)
    defaults.update(kw)
    return MethodContext(
        model=model.to(dtype),
        schedule=SCHEDULE,
        train_images=images[:n_train],
        query_images=images[n_train:],
        **defaults,
    )


def per_draw_value(model, x0, t, eps, function: str) -> torch.Tensor:
    """The output function for one draw, written out from the formulas (not diffusion.*)."""
    abar = SCHEDULE.alpha_bars[t]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    out = model(x_t[None], t.reshape(1))[0]
    if function == "loss":
        return ((eps - out) ** 2).mean()
    if function == "square-norm":
        return (out**2).mean()
    if function == "elbo":
        return T * SCHEDULE.elbo_weights[t] * ((eps - out) ** 2).sum()
    raise AssertionError(function)


def reference_grads(model, images, stream, function, ctx, *, hflip=False) -> torch.Tensor:
    """``# [n, p]`` float64 gradients of each image's MC-averaged output function."""
    model64 = copy.deepcopy(model).double()
    params = list(model64.parameters())
    rows = []
    n_samples = ctx.query_samples if stream == QUERY_STREAM else ctx.grad_samples
    for i in range(images.shape[0]):
        d = draw_examples(
            [i], n_samples, (1, SIDE, SIDE), T, seed=ctx.seed, stream=stream, hflip=hflip
        )
        values = []
        for s in range(n_samples):
            x0 = images[i].double()
            x0 = x0.flip(-1) if d.flip is not None and bool(d.flip[0, s]) else x0
            values.append(per_draw_value(model64, x0, d.t[0, s], d.eps[0, s].double(), function))
        grads = torch.autograd.grad(torch.stack(values).mean(), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def closed_form(g_train: torch.Tensor, g_query: torch.Tensor, ridge: float) -> np.ndarray:
    """``g_q^T (G^T G + ridge I)^{-1} g_j``: ``# [n_queries, n_train]``."""
    p = g_train.shape[1]
    system = g_train.T @ g_train + ridge * torch.eye(p, dtype=torch.float64)
    return (g_query @ torch.linalg.solve(system, g_train.T)).numpy()


def assert_scores_close(actual, expected, rtol=1e-5):
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


# --------------------------------------------------------------------------------------------
# exact answers with the identity projection
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_train", "hflip", "measurement"),
    [(6, False, "loss"), (6, True, "elbo"), (50, False, "loss")],
    ids=["N<p", "N<p-hflip-elbo", "N>p"],
)
def test_trak_identity_projection_equals_closed_form(n_train, hflip, measurement):
    model = TinyEps(hidden=2)  # 43 parameters
    ctx = make_ctx(model, n_train, 3, hflip=hflip, measurement=measurement)
    g_train = reference_grads(model, ctx.train_images, TRAIN_STREAM, "loss", ctx, hflip=hflip)
    g_query = reference_grads(model, ctx.query_images, QUERY_STREAM, measurement, ctx)
    p = n_params(model)
    ridge = 0.05 * float((g_train**2).sum()) / n_train  # N * p * damping
    damping = ridge / (n_train * p)
    method = TRAK(TRAKConfig(projector="identity", damping=damping, batch_size=4))
    scores = method.score(ctx)
    assert scores.shape == (3, n_train) and scores.dtype == np.float64
    assert_scores_close(scores, closed_form(g_train, g_query, ridge))


def test_dtrak_identity_projection_equals_square_norm_closed_form():
    """D-TRAK: ||eps_theta||^2 on both sides, whatever ctx.measurement says."""
    model = TinyEps(hidden=3, seed=1)
    ctx = make_ctx(model, 6, 3, measurement="elbo")
    g_train = reference_grads(model, ctx.train_images, TRAIN_STREAM, "square-norm", ctx)
    g_query = reference_grads(model, ctx.query_images, QUERY_STREAM, "square-norm", ctx)
    ridge = 0.05 * float((g_train**2).sum()) / 6
    damping = ridge / (6 * n_params(model))
    method = create_method("dtrak", projector="identity", damping=damping)
    assert_scores_close(method.score(ctx), closed_form(g_train, g_query, ridge))


def test_dtrak_is_trak_with_the_square_norm_substituted(monkeypatch):
    model = TinyEps(hidden=3, seed=2)
    ctx = make_ctx(model, 6, 2, measurement="loss")
    dtrak = create_method("dtrak", projector="identity", damping=1e-3).score(ctx)
    trak_default = create_method("trak", projector="identity", damping=1e-3).score(ctx)
    monkeypatch.setattr(TRAK, "_functions", lambda self, ctx: ("square-norm", "square-norm"))
    trak_substituted = create_method("trak", projector="identity", damping=1e-3).score(ctx)
    np.testing.assert_array_equal(trak_substituted, dtrak)
    assert not np.allclose(trak_default, dtrak)
    entries = {name: get_method(name) for name in ("trak", "dtrak")}
    assert entries["dtrak"].load() is entries["trak"].load() is TRAK
    assert dict(entries["dtrak"].defaults) == {"output_function": "square-norm"}


# --------------------------------------------------------------------------------------------
# random projections
# --------------------------------------------------------------------------------------------


def test_random_projection_rank_correlation_rises_with_proj_dim():
    model = TinyEps(hidden=128, seed=3)  # 2689 parameters
    p = n_params(model)
    n_train = 30
    ctx = make_ctx(model, n_train, 5, dtype=torch.float32, grad_samples=2)
    g_train = reference_grads(model, ctx.train_images, TRAIN_STREAM, "loss", ctx)
    g_query = reference_grads(model, ctx.query_images, QUERY_STREAM, "loss", ctx)
    param_ridge = 0.01 * float((g_train**2).sum()) / n_train
    exact = closed_form(g_train, g_query, param_ridge).ravel()
    correlations = []
    for k in (16, 128, 1024):
        # E[P^T P] = k I, so traker's ridge N p lambda in projected space ~ (N p lambda / k) I
        damping = param_ridge * k / (n_train * p)
        scores = TRAK(TRAKConfig(proj_dim=k, damping=damping, projector="basic")).score(ctx)
        correlations.append(spearmanr(scores.ravel(), exact).statistic)
    assert correlations[0] < correlations[1] < correlations[2], correlations
    assert correlations[2] > 0.9, correlations


def test_proj_dim_above_n_params_is_capped_with_a_warning():
    model = TinyEps(hidden=3)
    ctx = make_ctx(model, 5, 2, dtype=torch.float32)
    with pytest.warns(UserWarning, match="exceeds the number of parameters"):
        scores = TRAK(TRAKConfig(proj_dim=10_000, damping=1e-3)).score(ctx)
    assert scores.shape == (2, 5) and np.isfinite(scores).all()


# --------------------------------------------------------------------------------------------
# invariances, caching and resumption
# --------------------------------------------------------------------------------------------


def test_scores_do_not_depend_on_batch_size_sample_chunks_or_backend():
    model = TinyEps(hidden=8, seed=4)
    ctx = make_ctx(model, 9, 3, dtype=torch.float32, grad_samples=6, hflip=True)
    cfg = dict(proj_dim=64, damping=1e-4, projector="basic")
    reference = TRAK(TRAKConfig(batch_size=9, backend="loop", **cfg)).score(ctx)
    for extra in (
        {"batch_size": 1},
        {"batch_size": 4, "sample_chunk": 4},
        {"backend": "vmap", "batch_size": 5},
        {"backend": "vmap", "sample_chunk": 5},
    ):
        np.testing.assert_allclose(
            TRAK(TRAKConfig(**cfg, **extra)).score(ctx), reference, rtol=1e-4, atol=1e-6
        )


def test_scores_depend_on_seed():
    model = TinyEps(hidden=3)
    cfg = TRAKConfig(projector="identity", damping=1e-3)
    a = TRAK(cfg).score(make_ctx(model, 5, 2, seed=0))
    b = TRAK(cfg).score(make_ctx(model, 5, 2, seed=1))
    assert not np.allclose(a, b)


def test_killed_featurisation_resumes_and_damping_change_refinalises(tmp_path, monkeypatch):
    model = TinyEps(hidden=3, seed=5)
    cache = ArtifactStore(tmp_path)  # its work_dir: <root>/_work/trak/<key>
    ctx = make_ctx(model, 10, 2)
    ctx_cached = make_ctx(model, 10, 2, cache=cache)
    cfg = dict(projector="basic", proj_dim=16, batch_size=3)
    uninterrupted = TRAK(TRAKConfig(damping=1e-3, **cfg)).score(ctx)

    original = TRAKer.featurize
    calls: list[int] = []

    def dying(self, batch, inds=None, num_samples=None):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(len(inds))
        return original(self, batch, inds=inds, num_samples=num_samples)

    monkeypatch.setattr(TRAKer, "featurize", dying)
    with pytest.raises(KeyboardInterrupt):
        TRAK(TRAKConfig(damping=1e-3, **cfg)).score(ctx_cached)
    assert calls == [3, 3]
    assert (tmp_path / "_work" / "trak").is_dir()

    def counting(self, batch, inds=None, num_samples=None):
        calls.append(len(inds))
        return original(self, batch, inds=inds, num_samples=num_samples)

    calls.clear()
    monkeypatch.setattr(TRAKer, "featurize", counting)
    resumed = TRAK(TRAKConfig(damping=1e-3, **cfg)).score(ctx_cached)
    assert calls == [3, 1]  # only examples 6..9
    np.testing.assert_allclose(resumed, uninterrupted, rtol=1e-6)

    calls.clear()
    other_damping = TRAK(TRAKConfig(damping=1e-1, **cfg)).score(ctx_cached)
    assert calls == []  # reused the projected gradients
    fresh = TRAK(TRAKConfig(damping=1e-1, **cfg)).score(ctx)
    np.testing.assert_allclose(other_damping, fresh, rtol=1e-6)
    assert not np.allclose(other_damping, uninterrupted)

    calls.clear()
    finalized: list[int] = []
    original_finalize = TRAKer.finalize_features
    monkeypatch.setattr(
        TRAKer,
        "finalize_features",
        lambda self, *a, **k: finalized.append(1) or original_finalize(self, *a, **k),
    )
    again = TRAK(TRAKConfig(damping=1e-1, **cfg)).score(ctx_cached)
    assert calls == [] and finalized == []  # features and their finalisation reused
    np.testing.assert_array_equal(again, other_damping)


def test_config_validation():
    for bad in (
        {"output_function": "margin"},
        {"proj_dim": 0},
        {"damping": -1.0},
        {"damping": float("nan")},
        {"grad_samples": 0},
        {"projector": "gpu"},
        {"proj_max_batch_size": 12},
        {"query_samples": 0},
        {"sample_chunk": 0},
        {"backend": "jit"},
        {"backend": "hooks"},  # hooks cover Linear/Conv2d layers only, TRAK every parameter
    ):
        with pytest.raises(ValueError):
            TRAKConfig(**bad)
    assert TRAKConfig().proj_dim == 32768 and TRAKConfig().damping == 1e-9


def test_identity_projector_refuses_large_models():
    model = TinyEps(hidden=1000)  # 21001 parameters
    ctx = make_ctx(model, 2, 1, dtype=torch.float32)
    with pytest.raises(ValueError, match="identity"), warnings.catch_warnings():
        TRAK(TRAKConfig(projector="identity")).score(ctx)
