"""The regime diagnostic (issue 16, item 2) against an independent numpy computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.pipeline import load_held_out_set, load_train_set
from benchmarks.regime import (
    HELD_OUT,
    LEAVE_ONE_OUT,
    footer_text,
    nearest_two,
    regime_diagnostic,
)
from benchmarks.settings import get_preset


def _images(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 4, 4, generator=gen) * 2 - 1  # [n, 1, 4, 4]


def _numpy_distances(points: torch.Tensor, train: torch.Tensor) -> np.ndarray:
    p = points.double().numpy().reshape(points.shape[0], -1)
    x = train.double().numpy().reshape(train.shape[0], -1)
    return np.sqrt(((p[:, None, :] - x[None, :, :]) ** 2).sum(axis=2))  # [P, N]


def test_diagnostic_equals_an_independent_numpy_computation():
    queries, train, held = _images(6, 0), _images(30, 1), _images(9, 2)
    diag = regime_diagnostic(queries, train, held)
    dist = np.sort(_numpy_distances(queries, train), axis=1)
    np.testing.assert_allclose(diag.nearest, dist[:, 0], rtol=1e-12)
    np.testing.assert_allclose(diag.second, dist[:, 1], rtol=1e-12)
    np.testing.assert_allclose(diag.ratio, dist[:, 0] / dist[:, 1], rtol=1e-12)
    np.testing.assert_array_equal(
        diag.nearest_index, _numpy_distances(queries, train).argmin(axis=1)
    )
    held_nearest = _numpy_distances(held, train).min(axis=1)
    np.testing.assert_allclose(diag.reference_nearest, held_nearest, rtol=1e-12)
    summary = diag.summary()
    assert summary["reference_kind"] == HELD_OUT and summary["n_reference"] == 9
    assert summary["query_nearest_mean"] == pytest.approx(dist[:, 0].mean(), rel=1e-12)
    assert summary["reference_nearest_mean"] == pytest.approx(held_nearest.mean(), rel=1e-12)
    assert summary["ratio_median"] == pytest.approx(np.median(dist[:, 0] / dist[:, 1]))


def test_an_exact_copy_has_ratio_zero_and_counts_as_near_copy():
    train = _images(20, 3)
    queries = torch.cat([train[[5, 11]], _images(2, 4)])  # two exact copies, two fresh images
    diag = regime_diagnostic(queries, train, _images(3, 5))
    assert diag.ratio[0] == 0.0 and diag.ratio[1] == 0.0 and diag.nearest[:2].tolist() == [0, 0]
    assert diag.nearest_index[:2].tolist() == [5, 11]
    assert (diag.ratio[2:] > 1 / 3).all()  # random 16-pixel images are not near copies
    assert diag.near_copy_fraction == 0.5


def test_a_near_copy_is_under_a_third_and_a_duplicated_source_gives_zero():
    train = _images(10, 6)
    train[3] = train[4]  # a duplicated training image: nearest and second both 0 for its copy
    near = train[7] + 0.01  # a near copy: nearest 0.04, second ~ the random spread
    queries = torch.stack([train[4], near])
    diag = regime_diagnostic(queries, train)
    assert diag.ratio[0] == 0.0 and diag.second[0] == 0.0
    assert 0 < diag.ratio[1] < 1 / 3


def test_without_held_out_images_the_reference_is_training_leave_one_out():
    queries, train = _images(4, 7), _images(12, 8)
    for empty in (None, train[:0]):
        diag = regime_diagnostic(queries, train, empty)
        dist = _numpy_distances(train, train)
        np.fill_diagonal(dist, np.inf)
        assert diag.reference_kind == LEAVE_ONE_OUT
        np.testing.assert_allclose(diag.reference_nearest, dist.min(axis=1), rtol=1e-12)


def test_reference_is_capped_by_a_seeded_draw():
    queries, train, held = _images(2, 9), _images(15, 10), _images(40, 11)
    a = regime_diagnostic(queries, train, held, max_reference=7, seed=3)
    b = regime_diagnostic(queries, train, held, max_reference=7, seed=3)
    assert a.reference_nearest.size == 7
    np.testing.assert_array_equal(a.reference_nearest, b.reference_nearest)
    chosen = np.sort(np.random.default_rng(3).choice(40, size=7, replace=False))
    expected = _numpy_distances(held[chosen], train).min(axis=1)
    np.testing.assert_allclose(a.reference_nearest, expected, rtol=1e-12)


def test_leave_one_out_with_two_training_images_has_no_second_neighbour():
    train = _images(2, 12)
    nearest, second, index = nearest_two(train, train, exclude=np.array([0, 1]))
    assert index.tolist() == [1, 0] and np.isnan(second).all()
    np.testing.assert_allclose(nearest, _numpy_distances(train[:1], train[1:])[0, 0])


def test_footer_names_every_number():
    text = footer_text(
        {
            "ratio_median": 0.8125,
            "near_copy_fraction": 0.0625,
            "n_queries": 32,
            "query_nearest_mean": 4.21,
            "reference_nearest_mean": 4.87,
            "reference_kind": HELD_OUT,
            "n_reference": 293,
        }
    )
    assert text == (
        "regime: nearest/second-nearest L2 ratio median 0.812, fraction < 1/3: 0.062 (2 of 32 "
        "queries); mean nearest-train L2 distance: queries 4.210 vs held-out real images "
        "4.870 (n=293)"
    )


def test_held_out_set_is_the_complement_of_the_capped_training_set():
    smoke = get_preset("smoke")  # digits2 (357 images), n_train 64
    train, held = load_train_set(smoke), load_held_out_set(smoke)
    assert len(train) == 64 and len(held) == 357 - 64
    assert set(train.indices.tolist()).isdisjoint(held.indices.tolist())
    assert len(load_held_out_set(get_preset("quick"))) == 0  # quick trains on all of digits2
