"""Exact retraining oracle with a fake train_fn / measure_fn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion.schedule import NoiseSchedule
from methods import MethodContext, MethodUnavailableError, create_method
from methods.retrain import ExactRetraining, ExactRetrainingConfig


def make_ctx(train_fn=None, measure_fn=None) -> MethodContext:
    return MethodContext(
        model=torch.nn.Identity(),
        schedule=NoiseSchedule(num_timesteps=10),
        train_images=torch.zeros(6, 1, 2, 2),
        query_images=torch.zeros(2, 1, 2, 2),
        train_fn=train_fn,
        measure_fn=measure_fn,
    )


def test_predict_subsets_trains_on_kept_positions_with_unseen_seeds():
    calls = []

    class Fake(torch.nn.Module):
        def __init__(self, kept, seed):
            super().__init__()
            self.kept, self.seed = kept, seed

    def train_fn(kept, seed):
        calls.append((kept.tolist(), seed))
        return Fake(kept, seed)

    def measure_fn(model):  # [n_queries]: a value that encodes the model
        return torch.tensor([float(sum(model.kept.tolist())), float(model.seed)])

    masks = np.array([[1, 0, 1, 0, 1, 0], [0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=bool)
    method = create_method("retrain", seed_offset=500)
    assert method.kind == "subset-predictions"
    out = method.predict_subsets(make_ctx(train_fn, measure_fn), masks)
    assert calls == [([0, 2, 4], 500), ([1, 2, 3], 501), ([0, 1, 2, 3, 4, 5], 502)]
    np.testing.assert_array_equal(out, [[6.0, 500.0], [6.0, 501.0], [15.0, 502.0]])
    assert out.dtype == np.float64 and out.shape == (3, 2)
    default = ExactRetraining()
    assert default.subset_seed(0) == 1_000_000  # far above ground-truth seeds


def test_unavailable_without_train_or_measure_fn():
    masks = np.ones((1, 6), dtype=bool)
    with pytest.raises(MethodUnavailableError, match="train_fn and ctx.measure_fn"):
        ExactRetraining().predict_subsets(make_ctx(), masks)
    with pytest.raises(MethodUnavailableError, match="measure_fn"):
        ExactRetraining().predict_subsets(make_ctx(train_fn=lambda k, s: None), masks)


def test_bad_masks_and_measure_shape():
    ctx = make_ctx(lambda k, s: torch.nn.Identity(), lambda m: torch.zeros(3))
    with pytest.raises(ValueError, match="bool array"):
        ExactRetraining().predict_subsets(ctx, np.ones((1, 5), dtype=bool))
    with pytest.raises(ValueError, match="measure_fn returned shape"):
        ExactRetraining().predict_subsets(ctx, np.ones((1, 6), dtype=bool))
    with pytest.raises(ValueError):
        ExactRetrainingConfig(seed_offset=-1)
