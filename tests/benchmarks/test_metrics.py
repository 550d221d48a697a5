"""Tests of benchmarks.metrics against brute-force loops, scipy.stats and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from benchmarks.metrics import (
    lds_from_scores,
    lds_per_query,
    noise_ceiling,
    paired_difference,
    predictions_from_scores,
    spearman_columns,
    summarize,
)


def _random_masks(rng: np.random.Generator, n_subsets: int, n_train: int) -> np.ndarray:
    return rng.random((n_subsets, n_train)) < 0.5  # [n_subsets, n_train] bool


def _gaussian_spearman(r: float) -> float:
    """Population Spearman rho of a bivariate normal with Pearson correlation r."""
    return 6.0 / math.pi * math.asin(r / 2.0)


# ---------------------------------------------------------------- predictions_from_scores


def test_predictions_from_scores_equals_explicit_loop():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4, 9)).astype(np.float32)  # [n_queries, n_train]
    masks = _random_masks(rng, 6, 9)  # [n_subsets, n_train]
    got = predictions_from_scores(scores, masks)
    assert got.shape == (6, 4) and got.dtype == np.float64
    expected = np.zeros((6, 4))
    for s in range(6):
        for q in range(4):
            for j in range(9):
                if not masks[s, j]:
                    expected[s, q] += float(scores[q, j])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_predictions_from_scores_full_subset_predicts_zero():
    scores = np.arange(6.0).reshape(2, 3)
    masks = np.array([[True, True, True], [False, False, False]])
    got = predictions_from_scores(scores, masks)
    np.testing.assert_array_equal(got, [[0.0, 0.0], [3.0, 12.0]])


@pytest.mark.parametrize(
    ("scores", "masks", "match"),
    [
        (np.zeros((2, 3)), np.zeros((4, 3), dtype=int), "boolean"),
        (np.zeros((2, 3)), np.zeros((4, 5), dtype=bool), "same training set"),
        (np.zeros(3), np.zeros((4, 3), dtype=bool), "2-D"),
        (np.array([[0.0, np.nan, 1.0]]), np.zeros((4, 3), dtype=bool), "non-finite"),
    ],
)
def test_predictions_from_scores_rejects_bad_input(scores, masks, match):
    with pytest.raises(ValueError, match=match):
        predictions_from_scores(scores, masks)


# ---------------------------------------------------------------- lds_per_query


def test_lds_is_one_for_true_scores_of_a_linear_target_and_zero_for_random_scores():
    rng = np.random.default_rng(1)
    n_train, n_subsets, n_queries = 40, 60, 200
    true_scores = rng.normal(size=(n_queries, n_train))
    masks = _random_masks(rng, n_subsets, n_train)
    offset = rng.normal(size=(1, n_queries)) * 10.0
    targets = (1.0 - masks) @ true_scores.T + offset  # [n_subsets, n_queries], exactly linear

    lds_true = lds_from_scores(true_scores, masks, targets)
    np.testing.assert_allclose(lds_true, 1.0, rtol=0, atol=1e-12)

    random_scores = rng.normal(size=(n_queries, n_train))
    lds_random = lds_from_scores(random_scores, masks, targets)
    # Per-query s.d. ~ 1/sqrt(59) ~ 0.13, mean over 200 queries: s.e. ~ 0.009 -> 5 s.e. = 0.05.
    assert abs(float(np.mean(lds_random))) < 0.05
    assert float(np.std(lds_random)) > 0.05  # genuinely random, not all zeros

    # Negated scores predict the opposite ordering.
    np.testing.assert_allclose(lds_from_scores(-true_scores, masks, targets), -1.0, atol=1e-12)


def test_lds_of_noisy_linear_target_matches_gaussian_closed_form():
    # Predictions sum_j (1 - m_j) s_j with m_j ~ Bernoulli(1/2) have variance sum_j s_j^2 / 4
    # across subsets (close to Gaussian for 400 examples). Adding N(0, sigma^2) noise to the
    # target gives Pearson r = sqrt(v / (v + sigma^2)) and Spearman 6/pi asin(r/2).
    rng = np.random.default_rng(2)
    n_train, n_subsets, n_queries = 400, 100, 300
    scores = rng.normal(size=(n_queries, n_train)) / math.sqrt(n_train)  # sum s^2 ~ 1 per query
    masks = _random_masks(rng, n_subsets, n_train)
    variance = np.sum(scores**2, axis=1) / 4.0  # [n_queries]
    sigma = 0.5
    targets = (1.0 - masks) @ scores.T + sigma * rng.normal(size=(n_subsets, n_queries))
    lds = lds_from_scores(scores, masks, targets)
    expected = np.array([_gaussian_spearman(math.sqrt(v / (v + sigma**2))) for v in variance])
    # s.e. of the mean over 300 queries ~ 0.004; the small-sample bias of Spearman is < 0.01.
    assert abs(float(lds.mean() - expected.mean())) < 0.025
    assert 0.5 < float(expected.mean()) < 0.8  # the case is informative, not near 0 or 1


def test_lds_equals_scipy_spearmanr_on_stored_arrays(tmp_path):
    rng = np.random.default_rng(3)
    n_subsets, n_queries = 25, 12
    predictions = rng.normal(size=(n_subsets, n_queries))
    predictions[:, 3] = np.round(predictions[:, 3])  # ties in predictions
    targets = predictions * 0.3 + rng.normal(size=(n_subsets, n_queries))
    targets[:, 5] = rng.integers(0, 4, size=n_subsets)  # heavy ties in targets
    np.save(tmp_path / "predictions.npy", predictions)
    np.save(tmp_path / "targets.npy", targets)

    got = lds_per_query(predictions, targets)

    p = np.load(tmp_path / "predictions.npy")
    t = np.load(tmp_path / "targets.npy")
    expected = np.array([stats.spearmanr(p[:, q], t[:, q]).statistic for q in range(n_queries)])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_lds_is_nan_for_constant_predictions_or_targets():
    rng = np.random.default_rng(4)
    predictions = rng.normal(size=(10, 3))
    targets = rng.normal(size=(10, 3))
    predictions[:, 0] = 2.5  # e.g. a method whose scores are all equal
    targets[:, 2] = -1.0  # a target that never changes
    lds = lds_per_query(predictions, targets)
    assert np.isnan(lds[0]) and np.isnan(lds[2])
    assert np.isfinite(lds[1])


def test_lds_rejects_mismatched_shapes_and_non_finite_values():
    with pytest.raises(ValueError, match="n_subsets, n_queries"):
        lds_per_query(np.zeros((5, 2)), np.zeros((5, 3)))
    bad = np.ones((5, 2))
    bad[1, 1] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        lds_per_query(bad, np.ones((5, 2)))
    with pytest.raises(ValueError, match="at least 2"):
        spearman_columns(np.ones((1, 2)), np.ones((1, 2)))


# ---------------------------------------------------------------- summarize / paired difference


def test_summarize_ignores_nan_and_counts():
    mean, se, n = summarize(np.array([1.0, np.nan, 2.0, 4.0]))
    assert n == 3
    assert mean == pytest.approx(7.0 / 3.0)
    # sample variance: ((1-7/3)^2 + (2-7/3)^2 + (4-7/3)^2) / 2 = 7/3
    assert se == pytest.approx(math.sqrt((7.0 / 3.0) / 3.0))


def test_summarize_degenerate_cases():
    m, se, n = summarize(np.array([0.3]))
    assert (m, n) == (0.3, 1) and math.isnan(se)
    m, se, n = summarize(np.array([np.nan, np.nan]))
    assert n == 0 and math.isnan(m) and math.isnan(se)
    with pytest.raises(ValueError, match="1-D"):
        summarize(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="inf"):
        summarize(np.array([1.0, np.inf]))


def test_paired_difference_arithmetic():
    a = np.array([0.5, 0.4, np.nan, 0.9])
    b = np.array([0.1, 0.3, 0.2, 0.2])
    mean, se = paired_difference(a, b)
    d = np.array([0.4, 0.1, 0.7])  # the NaN pair is dropped
    assert mean == pytest.approx(d.mean())
    assert se == pytest.approx(d.std(ddof=1) / math.sqrt(3))
    # Correlated methods: the paired s.e. is far below the separate ones.
    rng = np.random.default_rng(5)
    base = rng.normal(size=500)
    a2, b2 = base + 0.1, base + 0.01 * rng.normal(size=500)
    _, paired_se = paired_difference(a2, b2)
    assert paired_se < 0.1 * summarize(a2).standard_error
    with pytest.raises(ValueError, match="same queries"):
        paired_difference(np.zeros(3), np.zeros(4))


# ---------------------------------------------------------------- noise ceiling


def _noise_ceiling_loop(targets_per_seed: np.ndarray) -> np.ndarray:
    k_seeds, _, n_queries = targets_per_seed.shape
    out = np.zeros(n_queries)
    for q in range(n_queries):
        values = []
        for k in range(k_seeds):
            others = np.mean(np.delete(targets_per_seed[:, :, q], k, axis=0), axis=0)
            values.append(stats.spearmanr(targets_per_seed[k, :, q], others).statistic)
        out[q] = np.mean(values)
    return out


def test_noise_ceiling_matches_loop_and_closed_form_and_decreases_with_noise():
    rng = np.random.default_rng(6)
    n_seeds, n_subsets, n_queries = 4, 80, 150
    signal = rng.normal(size=(1, n_subsets, n_queries))
    ceilings = []
    for sigma in (0.3, 1.0, 3.0):
        targets = signal + sigma * rng.normal(size=(n_seeds, n_subsets, n_queries))
        got = noise_ceiling(targets)
        assert got.shape == (n_queries,)
        np.testing.assert_allclose(got, _noise_ceiling_loop(targets), rtol=0, atol=1e-12)
        # Pearson r between X + e_k and X + mean of (K-1) other noises, then Gaussian Spearman.
        s2, n2 = 1.0, sigma**2
        r = s2 / math.sqrt((s2 + n2) * (s2 + n2 / (n_seeds - 1)))
        assert abs(float(got.mean()) - _gaussian_spearman(r)) < 0.03
        ceilings.append(float(got.mean()))
    assert ceilings[0] > ceilings[1] > ceilings[2]


def test_noise_ceiling_needs_two_seeds_and_3d_input():
    with pytest.raises(ValueError, match="at least 2 seeds"):
        noise_ceiling(np.zeros((1, 5, 3)))
    with pytest.raises(ValueError, match="n_seeds, n_subsets, n_queries"):
        noise_ceiling(np.zeros((5, 3)))


def test_noise_ceiling_drops_undefined_seeds():
    rng = np.random.default_rng(7)
    targets = rng.normal(size=(3, 10, 2))
    targets[0, :, 0] = 1.0  # seed 0 constant on query 0: its correlation is undefined
    got = noise_ceiling(targets)
    expected_q0 = np.mean(
        [
            stats.spearmanr(targets[k, :, 0], np.delete(targets[:, :, 0], k, 0).mean(0)).statistic
            for k in (1, 2)
        ]
    )
    assert got[0] == pytest.approx(expected_q0)
    assert np.isfinite(got[1])
