"""K-FAC influence: invariances (chunk sizes, cache), query compression, errors."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from benchmarks.store import ArtifactStore
from methods import kfac as kfac_module
from methods.context import MethodContext
from methods.kfac import KFACInfluence, quantize_rows
from tests.methods.conftest import DictCache

VARIANTS = {
    "kfac": {},
    "kfac-reduce": {"kfac_approx": "reduce"},
    "kfac-empirical": {"hessian": "ggn-loss"},
    "ekfac": {"curvature": "ekfac"},
}


def _scores(ctx: MethodContext, **config) -> np.ndarray:
    return KFACInfluence(KFACInfluence.Config(**config)).score(ctx)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_scores_do_not_depend_on_chunk_sizes(smoke_context, variant):
    options = {**VARIANTS[variant], "quantize": None}
    reference = _scores(smoke_context, batch_size=24, **options)
    chunked = _scores(smoke_context, batch_size=5, sample_chunk=3, **options)
    scale = np.abs(reference).max()
    assert scale > 0
    np.testing.assert_allclose(chunked, reference, rtol=1e-4, atol=1e-5 * scale)


def test_cached_curvature_equals_a_fresh_one(smoke_context, tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path)
    fresh = _scores(smoke_context, quantize=None)
    ctx = replace(smoke_context, cache=store)
    first = _scores(ctx, quantize=None)  # computes, stores, reads back
    assert store.exists(kfac_module.CACHE_KIND, KFACInfluence()._curvature_spec(ctx, ctx.model))

    def refuse(*args, **kwargs):
        raise AssertionError("the curvature was refitted instead of read from the cache")

    monkeypatch.setattr(kfac_module, "fit_kfac", refuse)
    second = _scores(ctx, quantize=None)
    np.testing.assert_array_equal(second, first)
    np.testing.assert_allclose(first, fresh, rtol=1e-12, atol=0)
    rebatched = _scores(ctx, quantize=None, batch_size=7)  # batch size is not part of the key
    np.testing.assert_allclose(rebatched, first, rtol=1e-4, atol=1e-5 * np.abs(first).max())


def test_cache_key_tracks_the_curvature_not_the_damping(smoke_context):
    cache = DictCache()
    ctx = replace(smoke_context, cache=cache)
    a = _scores(ctx, quantize=None, damping=1e-8)
    b = _scores(ctx, quantize=None, damping=1e-2)  # same eigendecomposition, new damping
    assert cache.computed == 1
    assert not np.allclose(a, b)
    _scores(ctx, quantize=None, fit_samples=3)  # a different curvature
    _scores(ctx, quantize=None, kfac_approx="reduce")
    _scores(replace(ctx, seed=1), quantize=None)
    assert cache.computed == 4
    other_model = replace(ctx, model=_perturbed_copy(ctx.model))
    _scores(other_model, quantize=None)
    assert cache.computed == 5  # the model's weights are part of the key


def _perturbed_copy(model):
    import copy

    clone = copy.deepcopy(model)
    with torch.no_grad():
        next(clone.parameters()).add_(1e-3)
    return clone


@pytest.mark.parametrize("kind", ["int8", "int16"])
def test_quantised_scores_keep_the_ranking(smoke_context, kind):
    exact = _scores(smoke_context, quantize=None)
    compressed = _scores(smoke_context, quantize=kind)
    for row_exact, row_compressed in zip(exact, compressed, strict=True):
        assert spearmanr(row_exact, row_compressed)[0] >= 0.99
    error = np.abs(compressed - exact).max() / np.abs(exact).max()
    assert error < (2e-2 if kind == "int8" else 1e-4)
    assert error > 0  # compression did happen


def test_quantize_rows_bounds_the_error():
    gen = torch.Generator().manual_seed(0)
    matrix = torch.randn(3, 50, generator=gen, dtype=torch.float64)
    matrix[:, 40:] *= 1e-3  # a small-scale group keeps its resolution with its own scale
    matrix[1, :40] = 0.0
    groups = [(0, 40), (40, 50)]
    values, scales = quantize_rows(matrix, "int8", groups)
    assert values.dtype == torch.int8 and values.abs().max() <= 127
    assert scales.shape == (3, 2)
    for g, (a, b) in enumerate(groups):
        restored = values[:, a:b].double() * scales[:, g, None]
        error = (restored - matrix[:, a:b]).abs().max(dim=1).values
        assert error.le(scales[:, g] / 2 + 1e-18).all()
        assert error.le(matrix[:, a:b].abs().max(dim=1).values / 254 + 1e-18).all()
    assert torch.equal(values[1, :40], torch.zeros(40, dtype=torch.int8))
    whole_values, whole_scales = quantize_rows(matrix, "int16")
    assert whole_values.dtype == torch.int16 and whole_scales.shape == (3, 1)
    with pytest.raises(ValueError, match="int8"):
        quantize_rows(matrix, "int4")


def test_measurement_override_and_trajectory_error(smoke_context):
    elbo_ctx = replace(smoke_context, measurement="elbo")
    loss_scores = _scores(smoke_context, quantize=None)
    mloss = _scores(elbo_ctx, quantize=None, measurement="loss")  # the "m. loss" variant
    np.testing.assert_array_equal(mloss, loss_scores)
    elbo = _scores(elbo_ctx, quantize=None)
    assert not np.allclose(elbo, loss_scores)
    # the smoke contexts carry stand-in trajectories (for journey-trak): drop them here
    traj_ctx = replace(smoke_context, measurement="trajectory-logprob", query_trajectories=None)
    with pytest.raises(ValueError, match="query_trajectories"):
        _scores(traj_ctx)


def test_hflip_context_changes_the_scores(smoke_context):
    plain = _scores(smoke_context, quantize=None)
    flipped = _scores(replace(smoke_context, hflip=True), quantize=None)
    assert np.isfinite(flipped).all()
    assert not np.allclose(plain, flipped)


def test_dense_curvature_refuses_large_models(smoke_context):
    with pytest.raises(ValueError, match="tiny models"):
        _scores(smoke_context, curvature="dense")
