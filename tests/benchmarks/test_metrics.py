"""Tests of benchmarks.metrics against brute-force loops, scipy.stats and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from benchmarks import metrics
from benchmarks.metrics import (
    bootstrap_difference_interval,
    bootstrap_indices,
    bootstrap_interval,
    bootstrap_noise_ceiling_interval,
    cross_fitted_lds,
    fold_averaged_lds,
    in_sample_best,
    lds_from_scores,
    lds_per_query,
    noise_ceiling,
    overlaps_leader,
    paired_difference,
    predictions_from_scores,
    spearman_columns,
    subset_folds,
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


# ---------------------------------------------------------------- folds and cross-fitting


def test_subset_folds_are_balanced_deterministic_and_seeded():
    for n_subsets in (4, 7, 32):
        folds = subset_folds(n_subsets, seed=3)
        assert folds.shape == (n_subsets,) and folds.dtype == np.int64
        assert np.bincount(folds).tolist() == [n_subsets // 2, n_subsets - n_subsets // 2]
        np.testing.assert_array_equal(folds, subset_folds(n_subsets, seed=3))
    assert not np.array_equal(subset_folds(32, seed=0), subset_folds(32, seed=1))
    with pytest.raises(ValueError, match="n_subsets >= 4"):
        subset_folds(3, seed=0)


def _fold_lds(predictions: np.ndarray, targets: np.ndarray, folds: np.ndarray, fold: int):
    return lds_per_query(predictions[folds == fold], targets[folds == fold])


def test_cross_fitting_chooses_on_one_fold_and_reports_the_other():
    rng = np.random.default_rng(10)
    n_subsets, n_queries = 14, 5
    folds = np.arange(n_subsets) % 2  # interleaved: masks, not slices
    targets = rng.normal(size=(n_subsets, n_queries))
    noise = rng.normal(size=(n_subsets, n_queries))
    best_on_0 = np.where(folds[:, None] == 0, targets, noise)  # perfect on fold 0 only
    best_on_1 = np.where(folds[:, None] == 1, 2.0 * targets, -noise)  # perfect on fold 1 only
    weak = targets + 3.0 * rng.normal(size=(n_subsets, n_queries))
    candidates = {0.1: weak, 1.0: best_on_0, 10.0: best_on_1}

    fit = cross_fitted_lds(candidates, targets, folds)

    assert fit.chosen == (1.0, 10.0)
    assert fit.values == (0.1, 1.0, 10.0)
    held_0 = _fold_lds(best_on_0, targets, folds, 1)  # chosen on fold 0, scored on fold 1
    held_1 = _fold_lds(best_on_1, targets, folds, 0)
    np.testing.assert_array_equal(fit.held_out, np.stack([held_0, held_1]))
    np.testing.assert_allclose(fit.per_query, (held_0 + held_1) / 2.0, rtol=0, atol=1e-15)
    expected_table = np.array(
        [
            [_fold_lds(p, targets, folds, f).mean() for f in (0, 1)]
            for p in (weak, best_on_0, best_on_1)
        ]
    )
    np.testing.assert_allclose(fit.fold_means, expected_table, rtol=0, atol=1e-15)
    assert fit.fold_means[1, 0] == 1.0 and fit.fold_means[2, 1] == 1.0


def test_cross_fitting_with_one_value_best_everywhere_averages_its_fold_lds():
    rng = np.random.default_rng(11)
    n_subsets, n_queries = 20, 6
    folds = subset_folds(n_subsets, seed=0)
    targets = rng.normal(size=(n_subsets, n_queries))
    good = targets + 0.3 * rng.normal(size=(n_subsets, n_queries))
    candidates = {"random": rng.normal(size=(n_subsets, n_queries)), "good": good, "bad": -good}
    fit = cross_fitted_lds(candidates, targets, folds)
    assert fit.chosen == ("good", "good")
    expected = (_fold_lds(good, targets, folds, 0) + _fold_lds(good, targets, folds, 1)) / 2.0
    np.testing.assert_allclose(fit.per_query, expected, rtol=0, atol=1e-15)


def test_fold_averaged_lds_is_the_cross_fit_of_a_single_value():
    rng = np.random.default_rng(12)
    folds = subset_folds(20, seed=1)
    targets = rng.normal(size=(20, 5))
    predictions = targets + rng.normal(size=(20, 5))
    expected = (
        _fold_lds(predictions, targets, folds, 0) + _fold_lds(predictions, targets, folds, 1)
    ) / 2
    np.testing.assert_allclose(
        fold_averaged_lds(predictions, targets, folds), expected, rtol=0, atol=1e-15
    )
    only = cross_fitted_lds({"only": predictions}, targets, folds).per_query
    np.testing.assert_array_equal(fold_averaged_lds(predictions, targets, folds), only)


def test_cross_fitting_ties_go_to_the_first_value_in_the_given_order():
    rng = np.random.default_rng(12)
    targets = rng.normal(size=(8, 3))
    predictions = targets + rng.normal(size=(8, 3))
    folds = subset_folds(8, seed=1)
    assert cross_fitted_lds({"a": predictions, "b": predictions}, targets, folds).chosen == (
        "a",
        "a",
    )
    assert cross_fitted_lds({"b": predictions, "a": predictions}, targets, folds).chosen == (
        "b",
        "b",
    )
    assert in_sample_best({"b": predictions, "a": predictions}, targets).value == "b"


def test_cross_fitting_nan_keeps_the_defined_direction():
    rng = np.random.default_rng(13)
    n_subsets = 10
    folds = np.array([0] * 5 + [1] * 5)
    targets = rng.normal(size=(n_subsets, 3))
    targets[folds == 0, 1] = 4.0  # query 1: constant on fold 0 -> undefined there
    targets[:, 2] = -1.0  # query 2: constant everywhere -> undefined in both directions
    predictions = targets + rng.normal(size=(n_subsets, 3))
    fit = cross_fitted_lds({"only": predictions}, targets, folds)
    assert np.isnan(fit.held_out[1, 1])  # direction 1 is scored on fold 0
    assert fit.per_query[1] == fit.held_out[0, 1] == _fold_lds(predictions, targets, folds, 1)[1]
    assert np.isnan(fit.per_query[2])
    assert np.isfinite(fit.per_query[0])

    constant = np.ones((n_subsets, 3))  # every LDS undefined: no value can be chosen
    fit = cross_fitted_lds({"flat": constant}, targets, folds)
    assert fit.chosen == (None, None)
    assert np.all(np.isnan(fit.per_query))
    best = in_sample_best({"flat": constant}, targets)
    assert best.value is None and np.all(np.isnan(best.per_query))


def test_in_sample_best_is_the_full_data_maximum_and_optimistic_on_noise():
    rng = np.random.default_rng(14)
    targets = rng.normal(size=(12, 4))
    candidates = {k: targets + k * rng.normal(size=(12, 4)) for k in (0.5, 2.0, 8.0)}
    best = in_sample_best(candidates, targets)
    means = [lds_per_query(p, targets).mean() for p in candidates.values()]
    np.testing.assert_allclose(best.means, means, rtol=0, atol=1e-15)
    assert best.value == list(candidates)[int(np.argmax(means))]
    np.testing.assert_array_equal(best.per_query, lds_per_query(candidates[best.value], targets))

    # Pure noise: 10 useless candidates. The in-sample maximum is a selected noise peak; the
    # cross-fitted value is scored on other subsets, so its expectation is 0. Over 30 draws the
    # optimism (in-sample - cross-fitted) has mean ~0.2 and s.e. ~0.02. (Not every single draw:
    # the full-data and per-fold correlations differ, so the order is not a theorem.)
    optimism = []
    for _ in range(30):
        targets = rng.normal(size=(16, 4))
        candidates = {k: rng.normal(size=(16, 4)) for k in range(10)}
        folds = subset_folds(16, seed=int(rng.integers(1 << 30)))
        in_sample = summarize(in_sample_best(candidates, targets).per_query).mean
        crossed = summarize(cross_fitted_lds(candidates, targets, folds).per_query).mean
        optimism.append(in_sample - crossed)
    summary = summarize(np.array(optimism))
    assert summary.mean > 5.0 * summary.standard_error


def test_cross_fitting_rejects_bad_input():
    targets = np.zeros((6, 2))
    folds = np.array([0, 0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="empty"):
        cross_fitted_lds({}, targets, folds)
    with pytest.raises(ValueError, match="n_subsets, n_queries"):
        cross_fitted_lds({1.0: np.zeros((6, 3))}, targets, folds)
    with pytest.raises(ValueError, match="non-finite"):
        cross_fitted_lds({1.0: np.full((6, 2), np.nan)}, targets, folds)
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        cross_fitted_lds({1.0: targets}, targets, folds[:5])
    with pytest.raises(ValueError, match="0 and 1"):
        cross_fitted_lds({1.0: targets}, targets, folds + 1)
    with pytest.raises(ValueError, match="at least 2 subsets"):
        cross_fitted_lds({1.0: targets}, targets, np.array([0, 1, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match="2-D"):
        in_sample_best({1.0: targets}, np.zeros(6))


# ---------------------------------------------------------------- bootstrap


def _replicate_loop(predictions, targets, rows, cols) -> float:
    """One bootstrap replicate by brute force: scipy Spearman per resampled query, then mean."""
    values = [
        stats.spearmanr(predictions[rows, q], targets[rows, q]).statistic for q in cols.tolist()
    ]
    return float(np.nanmean(values))


def test_bootstrap_single_replicate_matches_a_brute_force_loop():
    rng = np.random.default_rng(20)
    targets = rng.normal(size=(9, 5))
    predictions = np.round(targets + rng.normal(size=(9, 5)))  # ties on top of duplicated rows
    other = rng.normal(size=(9, 5))
    for seed in range(5):
        (rows,), (cols,) = bootstrap_indices(9, 5, n_boot=1, seed=seed)
        expected = _replicate_loop(predictions, targets, rows, cols)
        low, high = bootstrap_interval(predictions, targets, n_boot=1, seed=seed)
        assert low == pytest.approx(expected, abs=1e-12) and high == pytest.approx(expected)
        expected_difference = float(
            np.mean(
                [
                    stats.spearmanr(predictions[rows, q], targets[rows, q]).statistic
                    - stats.spearmanr(other[rows, q], targets[rows, q]).statistic
                    for q in cols.tolist()
                ]
            )
        )
        low, high = bootstrap_difference_interval(predictions, other, targets, n_boot=1, seed=seed)
        assert low == pytest.approx(expected_difference, abs=1e-12) == high


def test_bootstrap_of_perfect_predictions_is_one_one():
    rng = np.random.default_rng(21)
    targets = rng.normal(size=(20, 8))
    low, high = bootstrap_interval(np.exp(targets), targets, n_boot=3000, seed=0)
    assert low == pytest.approx(1.0, abs=1e-12) and high == pytest.approx(1.0, abs=1e-12)


def test_bootstrap_interval_contains_the_estimate_is_reproducible_and_seeded():
    rng = np.random.default_rng(22)
    targets = rng.normal(size=(32, 32))
    predictions = targets + 1.5 * rng.normal(size=(32, 32))
    estimate = summarize(lds_per_query(predictions, targets)).mean
    interval = bootstrap_interval(predictions, targets, n_boot=1000, seed=5)
    assert interval.low < estimate < interval.high
    assert 0.0 < interval.high - interval.low < 0.5
    assert bootstrap_interval(predictions, targets, n_boot=1000, seed=5) == interval
    assert bootstrap_interval(predictions, targets, n_boot=1000, seed=6) != interval
    narrow = bootstrap_interval(predictions, targets, n_boot=1000, seed=5, level=0.5)
    assert interval.low < narrow.low < narrow.high < interval.high


def test_bootstrap_indices_are_common_random_numbers():
    rows, cols = bootstrap_indices(7, 4, n_boot=50, seed=9)
    assert rows.shape == (50, 7) and cols.shape == (50, 4)
    assert rows.min() >= 0 and rows.max() < 7 and cols.min() >= 0 and cols.max() < 4
    again = bootstrap_indices(7, 4, n_boot=50, seed=9)
    np.testing.assert_array_equal(rows, again[0])
    np.testing.assert_array_equal(cols, again[1])
    with pytest.raises(ValueError, match="n_boot >= 1"):
        bootstrap_indices(7, 4, n_boot=0)


def test_bootstrap_chunking_does_not_change_the_result(monkeypatch):
    rng = np.random.default_rng(23)
    targets = rng.normal(size=(10, 6))
    predictions = targets + rng.normal(size=(10, 6))
    per_seed = targets + rng.normal(size=(3, 10, 6))
    whole = bootstrap_interval(predictions, targets, n_boot=37, seed=1)
    whole_ceiling = bootstrap_noise_ceiling_interval(per_seed, n_boot=37, seed=1)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 130)  # chunks of 2 replicates
    assert bootstrap_interval(predictions, targets, n_boot=37, seed=1) == whole
    assert bootstrap_noise_ceiling_interval(per_seed, n_boot=37, seed=1) == whole_ceiling


def test_paired_bootstrap_of_a_method_against_itself_is_zero_and_detects_a_better_method():
    rng = np.random.default_rng(24)
    targets = rng.normal(size=(24, 16))
    good = targets + 0.5 * rng.normal(size=(24, 16))
    poor = targets + 3.0 * rng.normal(size=(24, 16))
    assert bootstrap_difference_interval(good, good, targets, n_boot=500) == (0.0, 0.0)
    low, high = bootstrap_difference_interval(good, poor, targets, n_boot=500)
    difference = paired_difference(lds_per_query(good, targets), lds_per_query(poor, targets))
    assert 0.0 < low < difference.mean < high


def test_bootstrap_noise_ceiling_interval():
    rng = np.random.default_rng(25)
    signal = rng.normal(size=(1, 16, 10))
    per_seed = signal + 0.7 * rng.normal(size=(4, 16, 10))
    (rows,), (cols,) = bootstrap_indices(16, 10, n_boot=1, seed=2)
    expected = float(np.nanmean(noise_ceiling(per_seed[:, rows])[cols]))
    low, high = bootstrap_noise_ceiling_interval(per_seed, n_boot=1, seed=2)
    assert low == pytest.approx(expected, abs=1e-12) and high == pytest.approx(expected, abs=1e-12)

    estimate = float(noise_ceiling(per_seed).mean())
    low, high = bootstrap_noise_ceiling_interval(per_seed, n_boot=500, seed=2)
    assert low < estimate < high
    same = np.repeat(signal, 3, axis=0)  # identical seeds: the ceiling is exactly 1
    assert bootstrap_noise_ceiling_interval(same, n_boot=200) == pytest.approx((1.0, 1.0))
    with pytest.raises(ValueError, match="at least 2 seeds"):
        bootstrap_noise_ceiling_interval(signal)


def test_bootstrap_nan_and_bad_input():
    rng = np.random.default_rng(26)
    targets = rng.normal(size=(12, 4))
    flat = np.ones((12, 4))  # every LDS undefined: no replicate is defined
    assert all(math.isnan(end) for end in bootstrap_interval(flat, targets, n_boot=50))
    assert all(
        math.isnan(end) for end in bootstrap_difference_interval(flat, targets, targets, n_boot=50)
    )
    predictions = targets.copy()
    predictions[:, 0] = 2.0  # one undefined query is dropped, as summarize drops it
    assert bootstrap_interval(predictions, targets, n_boot=200) == pytest.approx((1.0, 1.0))

    with pytest.raises(ValueError, match="n_subsets, n_queries"):
        bootstrap_interval(np.zeros((12, 3)), targets)
    with pytest.raises(ValueError, match="n_subsets, n_queries"):
        bootstrap_difference_interval(targets, np.zeros((12, 3)), targets)
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap_interval(np.full((12, 4), np.inf), targets)
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval(targets, targets, level=1.0)
    with pytest.raises(ValueError, match="n_subsets >= 2"):
        bootstrap_interval(np.zeros((1, 4)), np.zeros((1, 4)))


# ---------------------------------------------------------------- leaderboard


def test_overlaps_leader_marks_intervals_overlapping_the_highest_mean():
    means = {"a": 0.5, "b": 0.6, "c": 0.3, "d": float("nan"), "e": 0.4}
    intervals = {
        "a": (0.45, 0.55),  # overlaps b's (0.52, 0.70)
        "b": (0.52, 0.70),
        "c": (0.20, 0.40),
        "d": (float("nan"), float("nan")),
        "e": (0.30, 0.52),  # touches b's low end: closed intervals overlap
    }
    got = overlaps_leader(intervals, means)
    assert list(got) == ["b", "a", "e", "c", "d"]
    assert got == {"b": True, "a": True, "e": True, "c": False, "d": False}


def test_overlaps_leader_ties_nan_and_bad_input():
    got = overlaps_leader({"x": (0.0, 0.1), "y": (0.5, 0.6)}, {"x": 0.3, "y": 0.3})
    assert list(got) == ["x", "y"] and got == {"x": True, "y": False}  # tie: first given leads
    nan = float("nan")
    assert overlaps_leader({"x": (nan, nan)}, {"x": 0.2}) == {"x": True}  # the leader itself
    assert overlaps_leader({"x": (0.0, 1.0)}, {"x": nan}) == {"x": False}  # no leader
    with pytest.raises(ValueError, match="same methods"):
        overlaps_leader({"x": (0.0, 1.0)}, {"y": 0.5})
    with pytest.raises(ValueError, match="low"):
        overlaps_leader({"x": (1.0, 0.0)}, {"x": 0.5})
