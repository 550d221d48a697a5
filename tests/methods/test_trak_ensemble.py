"""TRAK / D-TRAK ensembles against single-model TRAK and closed forms computed here.

The members' scores are recomputed independently: from per-example gradients written out in
tests/methods/test_trak.py (``reference_grads``) and, for random projections, traker's random
matrix of checkpoint ``i`` rebuilt here (``BasicProjector``: one block of N(0, 1) entries drawn
by a CPU generator seeded with ``projector_seed + 10^5 i``; features divided by sqrt(p)).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from trak import TRAKer

from benchmarks.store import ArtifactStore
from methods import create_method, get_method
from methods.base import MethodUnavailableError
from methods.gradients import example_seed
from methods.retrain import ExactRetraining
from methods.trak import PROJECTION_STREAM, QUERY_STREAM, TRAIN_STREAM, TRAK, TRAKConfig
from methods.trak_ensemble import MEMBER_SEED_OFFSET, TRAKEnsemble, TRAKEnsembleConfig
from tests.methods.test_trak import (
    TinyEps,
    assert_scores_close,
    closed_form,
    make_ctx,
    n_params,
    reference_grads,
)

N_TRAIN, N_QUERIES = 8, 3


class RecordingTrainFn:
    """``train_fn`` that records its calls and returns ``model_of(seed)``."""

    def __init__(self, model_of) -> None:
        self.model_of = model_of
        self.calls: list[tuple[list[int], int]] = []

    def __call__(self, positions: torch.Tensor, seed: int) -> torch.nn.Module:
        self.calls.append((positions.tolist(), seed))
        return self.model_of(seed)


def member_model(seed: int) -> torch.nn.Module:
    """A distinct tiny model per member seed (float64, as make_ctx's)."""
    return TinyEps(hidden=2, seed=seed - MEMBER_SEED_OFFSET + 10).double()


def projected_closed_form(model, ctx, k: int, model_id: int, damping: float) -> np.ndarray:
    """``# [n_queries, n_train]`` TRAK scores with traker's basic projection of ``model_id``."""
    p = n_params(model)
    seed = example_seed(ctx.seed, PROJECTION_STREAM, 0) % (2**30) + 10**5 * model_id
    matrix = torch.empty(p, k).normal_(generator=torch.Generator().manual_seed(seed))  # [p, k]
    matrix = matrix.double() / math.sqrt(p)
    phi = reference_grads(model, ctx.train_images, TRAIN_STREAM, "loss", ctx) @ matrix  # [N, k]
    phi_q = reference_grads(model, ctx.query_images, QUERY_STREAM, "loss", ctx) @ matrix
    return closed_form(phi, phi_q, N_TRAIN * damping)


def test_one_member_that_is_the_base_model_gives_trak_scores_exactly():
    base = TinyEps(hidden=3, seed=1)
    ctx = make_ctx(base, N_TRAIN, N_QUERIES, dtype=torch.float32)
    ctx = replace(ctx, train_fn=RecordingTrainFn(lambda seed: ctx.model))
    for output_function in ("loss", "square-norm"):
        cfg = dict(output_function=output_function, proj_dim=16, damping=1e-3, projector="basic")
        ensemble = TRAKEnsemble(TRAKEnsembleConfig(n_models=1, **cfg)).score(ctx)
        np.testing.assert_array_equal(ensemble, TRAK(TRAKConfig(**cfg)).score(ctx))


def test_two_members_are_the_mean_of_their_closed_form_trak_scores():
    base = TinyEps(hidden=2)  # 43 parameters
    ctx = make_ctx(base, N_TRAIN, N_QUERIES)
    ctx = replace(ctx, train_fn=RecordingTrainFn(member_model))
    damping = 1e-3
    cfg = TRAKEnsembleConfig(n_models=2, projector="identity", damping=damping)
    scores = TRAKEnsemble(cfg).score(ctx)
    members = [member_model(MEMBER_SEED_OFFSET + i) for i in range(2)]
    single = [TRAK(TRAKConfig(projector="identity", damping=damping)) for _ in members]
    runs = [method.score(replace(ctx, model=m)) for method, m in zip(single, members, strict=True)]
    np.testing.assert_array_equal(scores, (runs[0] + runs[1]) / 2)
    exact = []
    for model in members:
        g_train = reference_grads(model, ctx.train_images, TRAIN_STREAM, "loss", ctx)
        g_query = reference_grads(model, ctx.query_images, QUERY_STREAM, "loss", ctx)
        exact.append(closed_form(g_train, g_query, N_TRAIN * n_params(model) * damping))
    assert_scores_close(scores, (exact[0] + exact[1]) / 2)
    assert not np.allclose(exact[0], exact[1], rtol=0.1)  # the members differ


def test_each_member_has_traker_s_projection_of_its_model_id():
    base = TinyEps(hidden=2, seed=2)
    ctx = make_ctx(base, N_TRAIN, N_QUERIES)
    ctx = replace(ctx, train_fn=RecordingTrainFn(lambda seed: ctx.model))  # both members: base
    k, damping = 16, 1e-4
    cfg = TRAKEnsembleConfig(n_models=2, proj_dim=k, damping=damping, projector="basic")
    scores = TRAKEnsemble(cfg).score(ctx)
    per_id = [projected_closed_form(base, ctx, k, i, damping) for i in range(2)]
    assert_scores_close(scores, (per_id[0] + per_id[1]) / 2, rtol=1e-4)
    assert not np.allclose(per_id[0], per_id[1], rtol=0.1)  # two different projections


def test_members_are_deterministic_distinct_half_subsets_with_seeds_the_oracle_never_uses():
    n_train = 20  # C(20, 10) subsets: three random halves coincide with probability < 1e-4
    ctx = make_ctx(TinyEps(hidden=2), n_train, N_QUERIES, dtype=torch.float32)
    method = TRAKEnsemble(TRAKEnsembleConfig(n_models=3, projector="identity", damping=1e-3))
    train_fn = RecordingTrainFn(member_model)
    first = method.score(replace(ctx, train_fn=train_fn))
    again = method.score(replace(ctx, train_fn=train_fn))
    calls = train_fn.calls
    assert calls[:3] == calls[3:]  # the same (positions, seed): the store returns the models
    np.testing.assert_array_equal(first, again)
    positions = [tuple(p) for p, _ in calls[:3]]
    assert [seed for _, seed in calls[:3]] == [2_000_000, 2_000_001, 2_000_002]
    assert len(set(positions)) == 3
    for p in positions:
        assert len(p) == n_train // 2 == len(set(p)) and list(p) == sorted(p)
        assert min(p) >= 0 and max(p) < n_train
    oracle = ExactRetraining()
    assert oracle.subset_seed(999_999) < min(seed for _, seed in calls)  # a million subsets
    other_seed = RecordingTrainFn(member_model)
    method.score(replace(ctx, seed=ctx.seed + 1, train_fn=other_seed))
    assert [tuple(p) for p, _ in other_seed.calls] != positions  # subsets follow ctx.seed


def test_member_features_are_cached_per_member_whatever_the_ensemble_size(tmp_path, monkeypatch):
    ctx = make_ctx(TinyEps(hidden=2), N_TRAIN, N_QUERIES, dtype=torch.float32)
    ctx = replace(ctx, cache=ArtifactStore(tmp_path), train_fn=RecordingTrainFn(member_model))
    featurized: list[int] = []
    original = TRAKer.featurize

    def counting(self, batch, inds=None, num_samples=None):
        featurized.append(self.saver.current_model_id)
        return original(self, batch, inds=inds, num_samples=num_samples)

    monkeypatch.setattr(TRAKer, "featurize", counting)
    cfg = dict(proj_dim=16, damping=1e-3, projector="basic", batch_size=N_TRAIN)
    two = TRAKEnsemble(TRAKEnsembleConfig(n_models=2, **cfg)).score(ctx)
    assert featurized == [0, 1]
    featurized.clear()
    three = TRAKEnsemble(TRAKEnsembleConfig(n_models=3, **cfg)).score(ctx)
    assert featurized == [2]  # members 0 and 1 reused
    assert len(list((tmp_path / "_work" / "trak").iterdir())) == 3
    fresh = TRAKEnsemble(TRAKEnsembleConfig(n_models=3, **cfg)).score(replace(ctx, cache=None))
    np.testing.assert_array_equal(three, fresh)
    assert not np.allclose(two, three)


def test_unavailable_without_train_fn():
    ctx = make_ctx(TinyEps(hidden=2), N_TRAIN, N_QUERIES)
    with pytest.raises(MethodUnavailableError, match="train_fn"):
        create_method("trak-ensemble", projector="identity").score(ctx)


def test_config_validation_and_registry_entries():
    for bad in (
        {"n_models": 0},
        {"n_models": 2.0},
        {"n_models": True},
        {"subset_fraction": 0.0},
        {"subset_fraction": 1.5},
        {"subset_fraction": "half"},
        {"proj_dim": 0},
    ):
        with pytest.raises(ValueError):
            TRAKEnsembleConfig(**bad)
    trak, dtrak = get_method("trak-ensemble"), get_method("dtrak-ensemble")
    assert trak.load() is dtrak.load() is TRAKEnsemble
    assert (trak.display_name, dtrak.display_name) == ("TRAK ensemble", "D-TRAK ensemble")
    assert dtrak.config().output_function == "square-norm"
    assert trak.config().output_function == "loss"
    config = trak.config()
    assert (config.n_models, config.subset_fraction) == (4, 0.5)
    assert (config.proj_dim, config.damping) == (TRAKConfig().proj_dim, TRAKConfig().damping)
