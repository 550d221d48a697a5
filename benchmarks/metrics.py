"""The linear data-modelling score (LDS) and the statistics reported next to it.

Pure NumPy/SciPy functions on arrays; nothing here knows about models or files.

Contract (DESIGN.md, "Contract: the score sign and shape"): ``scores[q, j]`` predicts how
much measurement ``m(theta, x_q)`` would *increase* if training example ``j`` were removed. The
prediction for a training subset ``S`` is the sum of ``scores[q, j]`` over the examples ``j``
*not* in ``S`` (the removed ones); the LDS of query ``q`` is the Spearman rank correlation, across
subsets, between these predictions and the measured targets (paper Eq. 13).

Undefined correlations. Spearman's rho is undefined when either side is constant across subsets
(for example a method that gives every training example the same score, or a target that never
changes). Such a query gets ``NaN`` (never a silent 0); :func:`summarize` and
:func:`paired_difference` drop NaN and report how many values they kept, so a method that
produces undefined correlations shows up as a smaller ``n``.

Hyper-parameters (a damping). :func:`cross_fitted_lds` chooses the value on one fold of the
subsets and reports the LDS on the other fold, both directions averaged (the headline);
:func:`in_sample_best` is the optimistic maximum over values scored on all subsets.

Uncertainty. Beside the standard error over queries, :func:`bootstrap_interval` resamples queries
and subsets together. The resampling indices depend only on ``(seed, n_subsets, n_queries,
n_boot)`` (:func:`bootstrap_indices`), so methods scored with the same seed share the same
resamples (common random numbers) and their intervals are comparable;
:func:`bootstrap_difference_interval` uses them for the difference of two methods.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import NamedTuple

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "CrossFit",
    "InSampleBest",
    "Interval",
    "PairedDifference",
    "Summary",
    "bootstrap_difference_interval",
    "bootstrap_indices",
    "bootstrap_interval",
    "bootstrap_noise_ceiling_interval",
    "cross_fitted_lds",
    "in_sample_best",
    "lds_from_scores",
    "lds_per_query",
    "noise_ceiling",
    "overlaps_leader",
    "paired_difference",
    "predictions_from_scores",
    "spearman_columns",
    "subset_folds",
    "summarize",
]

_FOLD_STREAM = 0x464F4C44
"""Stream of the fold assignment's generator (ASCII "FOLD"), see :func:`subset_folds`."""
_BOOTSTRAP_STREAM = 0x424F4F54
"""Stream of the bootstrap's generator (ASCII "BOOT"), see :func:`bootstrap_indices`."""
_CHUNK_ELEMENTS = 1 << 22
"""Bootstrap replicates are processed in chunks of about this many ``[subset, query]`` cells."""


class Summary(NamedTuple):
    """Mean, standard error of the mean and count of the finite values of a sample."""

    mean: float
    """Mean of the finite values (NaN when there are none)."""
    standard_error: float
    """``std(ddof=1) / sqrt(n)`` of the finite values (NaN when ``n < 2``)."""
    n: int
    """Number of finite values used."""


class PairedDifference(NamedTuple):
    """Mean and standard error of per-query differences ``a - b``."""

    mean: float
    """Mean of ``a[q] - b[q]`` over queries where both are finite (NaN when there are none)."""
    standard_error: float
    """Standard error of that mean (NaN when fewer than two pairs are finite)."""


class Interval(NamedTuple):
    """A percentile bootstrap interval."""

    low: float
    """Lower end (NaN when no bootstrap replicate is defined)."""
    high: float
    """Upper end (NaN when no bootstrap replicate is defined)."""


class CrossFit(NamedTuple):
    """LDS with a hyper-parameter chosen on one fold of subsets and scored on the other.

    Direction ``d`` (0 or 1) chooses the value on fold ``d`` and scores it on fold ``1 - d``.
    """

    per_query: np.ndarray
    """``[n_queries]`` mean over the two directions of the held-out LDS (see
    :func:`cross_fitted_lds` for NaN)."""
    chosen: tuple[Hashable | None, Hashable | None]
    """``chosen[d]``: the value chosen on fold ``d`` (None when no value has a defined LDS)."""
    held_out: np.ndarray
    """``[2, n_queries]``: ``held_out[d]`` is the LDS on fold ``1 - d`` of ``chosen[d]``."""
    values: tuple[Hashable, ...]
    """The candidate values, in the given order (the rows of ``fold_means``)."""
    fold_means: np.ndarray
    """``[n_values, 2]`` mean over queries (finite ones) of each value's LDS on each fold."""


class InSampleBest(NamedTuple):
    """The value with the highest LDS scored on all subsets: optimistic, for display only."""

    value: Hashable | None
    """The best value (None when no value has a defined LDS)."""
    per_query: np.ndarray
    """``[n_queries]`` LDS of that value on all subsets (all NaN when ``value`` is None)."""
    values: tuple[Hashable, ...]
    """The candidate values, in the given order (the entries of ``means``)."""
    means: np.ndarray
    """``[n_values]`` mean over queries (finite ones) of each value's LDS on all subsets."""


def _as_2d_float(name: str, array: np.ndarray) -> np.ndarray:
    out = np.asarray(array, dtype=np.float64)
    if out.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {out.shape}.")
    if not np.all(np.isfinite(out)):
        bad = int(np.size(out) - np.count_nonzero(np.isfinite(out)))
        raise ValueError(
            f"{name} contains {bad} non-finite value(s) (NaN or inf); the LDS is only defined "
            "for finite numbers. Fix the method or measurement that produced them."
        )
    return out


def predictions_from_scores(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Predicted measurement changes of every subset from per-example scores.

    Args:
        scores: ``[n_queries, n_train]`` attribution scores (any real dtype; used in float64).
        masks: ``[n_subsets, n_train]`` boolean, ``masks[s, j]`` is True when training example
            ``j`` is *kept* in subset ``s``.

    Returns:
        ``[n_subsets, n_queries]`` float64, ``out[s, q] = sum_{j : not masks[s, j]} scores[q, j]``
        (the removed examples' scores; one matrix product).
    """
    scores = _as_2d_float("scores", scores)  # [n_queries, n_train]
    masks = np.asarray(masks)
    if masks.ndim != 2:
        raise ValueError(f"masks must be a 2-D array [n_subsets, n_train], got {masks.shape}.")
    if masks.dtype != np.bool_:
        raise ValueError(
            f"masks must be boolean (True = example kept in the subset), got dtype "
            f"{masks.dtype}; convert with masks.astype(bool) if it holds 0/1."
        )
    if masks.shape[1] != scores.shape[1]:
        raise ValueError(
            f"scores has {scores.shape[1]} training examples but masks has {masks.shape[1]}: "
            "both must index the same training set."
        )
    removed = (~masks).astype(np.float64)  # [n_subsets, n_train]
    return removed @ scores.T  # [n_subsets, n_queries]


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation between matching columns of two arrays.

    Ranks each column (average ranks for ties, as ``scipy.stats.spearmanr``), then takes the
    Pearson correlation of the ranks column by column.

    Args:
        a: ``[n_rows, n_cols]`` finite values.
        b: ``[n_rows, n_cols]`` finite values.

    Returns:
        ``[n_cols]`` float64 in [-1, 1]; NaN for a column that is constant in ``a`` or ``b``.
    """
    a = _as_2d_float("a", a)
    b = _as_2d_float("b", b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}.")
    if a.shape[0] < 2:
        raise ValueError(f"need at least 2 rows (subsets) to rank, got {a.shape[0]}.")
    return _spearman_along_rows(a, b)


def _spearman_along_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation along axis -2 of matching finite arrays ``[..., n_rows, n_cols]``.

    Returns ``[..., n_cols]``; NaN where a column is constant. Average ranks and their centred
    values are multiples of 1/2, so the sums below are exact whatever their order.
    """
    ra = rankdata(a, axis=-2, method="average")  # [..., n_rows, n_cols]
    rb = rankdata(b, axis=-2, method="average")
    ra -= ra.mean(axis=-2, keepdims=True)  # average ranks are exact: a constant column -> 0.0
    rb -= rb.mean(axis=-2, keepdims=True)
    ssa = np.einsum("...ij,...ij->...j", ra, ra)  # [..., n_cols]
    ssb = np.einsum("...ij,...ij->...j", rb, rb)
    cross = np.einsum("...ij,...ij->...j", ra, rb)
    out = np.full(cross.shape, np.nan)
    defined = (ssa > 0) & (ssb > 0)
    out[defined] = cross[defined] / np.sqrt(ssa[defined] * ssb[defined])
    return np.clip(out, -1.0, 1.0)


def _mean_finite(values: np.ndarray, axis: int) -> np.ndarray:
    """Mean over ``axis`` of the non-NaN entries; NaN where all are NaN (no warning)."""
    counts = np.sum(~np.isnan(values), axis=axis)
    sums = np.nansum(values, axis=axis)
    out = np.full(np.shape(sums), np.nan)
    np.divide(sums, counts, out=out, where=counts > 0)
    return out


def lds_per_query(predictions: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """LDS of every query: Spearman correlation across subsets of predictions and targets.

    Args:
        predictions: ``[n_subsets, n_queries]`` predicted measurements (or changes; Spearman is
            invariant to adding a per-query constant).
        targets: ``[n_subsets, n_queries]`` measured (seed-averaged) targets.

    Returns:
        ``[n_queries]`` float64; NaN where predictions or targets are constant across subsets.
    """
    predictions = _as_2d_float("predictions", predictions)
    targets = _as_2d_float("targets", targets)
    if predictions.shape != targets.shape:
        raise ValueError(
            f"predictions {predictions.shape} and targets {targets.shape} must both be "
            "[n_subsets, n_queries]."
        )
    return spearman_columns(predictions, targets)


def lds_from_scores(scores: np.ndarray, masks: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The per-query LDS of attribution scores: ``lds_per_query(predictions_from_scores(...))``.

    Args:
        scores: ``[n_queries, n_train]`` attribution scores.
        masks: ``[n_subsets, n_train]`` boolean, True where the example is kept.
        targets: ``[n_subsets, n_queries]`` measured (seed-averaged) targets.

    Returns:
        ``[n_queries]`` float64; NaN where predictions or targets are constant across subsets.
    """
    return lds_per_query(predictions_from_scores(scores, masks), targets)


def summarize(values: np.ndarray) -> Summary:
    """Mean, standard error and count of a 1-D sample, ignoring NaN.

    Args:
        values: ``[n]`` per-query values (e.g. LDS); NaN entries are dropped.

    Returns:
        :class:`Summary` ``(mean, standard_error, n)``; ``standard_error = std(ddof=1)/sqrt(n)``.
        ``mean`` is NaN when ``n == 0`` and ``standard_error`` is NaN when ``n < 2``.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D [n_queries], got shape {values.shape}.")
    if np.any(np.isinf(values)):
        raise ValueError("values contains inf; only NaN (undefined) entries may be dropped.")
    kept = values[~np.isnan(values)]
    n = int(kept.size)
    mean = float(kept.mean()) if n > 0 else float("nan")
    se = float(kept.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return Summary(mean, se, n)


def paired_difference(lds_a: np.ndarray, lds_b: np.ndarray) -> PairedDifference:
    """Mean and standard error of per-query differences ``lds_a - lds_b``.

    The standard error of paired differences is smaller than the two separate standard errors
    when the two methods' per-query LDS are correlated, which is why comparisons use it.

    Args:
        lds_a: ``[n_queries]`` per-query values of method A.
        lds_b: ``[n_queries]`` per-query values of method B on the *same* queries, same order.

    Returns:
        :class:`PairedDifference` ``(mean, standard_error)`` over queries where both are finite.
    """
    a = np.asarray(lds_a, dtype=np.float64)
    b = np.asarray(lds_b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(
            f"lds_a {a.shape} and lds_b {b.shape} must be 1-D arrays over the same queries."
        )
    s = summarize(a - b)  # NaN in either -> NaN difference -> dropped
    return PairedDifference(s.mean, s.standard_error)


def noise_ceiling(targets_per_seed: np.ndarray) -> np.ndarray:
    """Seed-to-seed agreement of the ground truth: the LDS a perfect single-model oracle gets.

    For every held-out seed ``k``, the Spearman correlation across subsets (per query) between
    the measurement of the models trained with seed ``k`` and the mean measurement over the
    other ``n_seeds - 1`` seeds; the result is the average over ``k`` of these correlations
    (leave-one-out, NaN ones dropped; NaN when all are NaN).

    This is the LDS that exact retraining with one fresh seed would reach against a
    ``(n_seeds - 1)``-seed target, so it is reported next to "exact retraining" as the ceiling
    that training noise alone allows (slightly pessimistic: the real target averages ``n_seeds``).

    Args:
        targets_per_seed: ``[n_seeds, n_subsets, n_queries]`` measurements, one slice per seed.

    Returns:
        ``[n_queries]`` float64.
    """
    return _leave_one_seed_out(_checked_targets_per_seed(targets_per_seed))


def _checked_targets_per_seed(targets_per_seed: np.ndarray) -> np.ndarray:
    """Finite float64 ``[n_seeds, n_subsets, n_queries]`` with ``n_seeds, n_subsets >= 2``."""
    t = np.asarray(targets_per_seed, dtype=np.float64)
    if t.ndim != 3:
        raise ValueError(
            f"targets_per_seed must be [n_seeds, n_subsets, n_queries], got shape {t.shape}."
        )
    n_seeds = t.shape[0]
    if n_seeds < 2:
        raise ValueError(
            f"noise_ceiling needs measurements from at least 2 seeds per subset, got {n_seeds}; "
            "retrain every subset with more seeds (K >= 2) to estimate it."
        )
    for k in range(n_seeds):
        _as_2d_float(f"targets_per_seed[{k}]", t[k])  # finite check
    if t.shape[1] < 2:
        raise ValueError(f"need at least 2 subsets to rank, got {t.shape[1]}.")
    return t


def _leave_one_seed_out(targets_per_seed: np.ndarray) -> np.ndarray:
    """Noise ceiling of finite ``[n_seeds, ..., n_subsets, n_queries]``: ``[..., n_queries]``."""
    n_seeds = targets_per_seed.shape[0]
    total = targets_per_seed.sum(axis=0)  # [..., n_subsets, n_queries]
    per_seed = np.stack(
        [
            _spearman_along_rows(seed_k, (total - seed_k) / (n_seeds - 1))
            for seed_k in targets_per_seed
        ]
    )  # [n_seeds, ..., n_queries]
    return _mean_finite(per_seed, axis=0)


# ---------------------------------------------------------------- cross-fitting


def subset_folds(n_subsets: int, seed: int) -> np.ndarray:
    """Balanced random split of the subsets into two folds, deterministic from ``seed``.

    A random permutation (generator ``SeedSequence([seed, "FOLD"])``) puts its first
    ``n_subsets // 2`` subsets in fold 0 and the rest in fold 1.

    Args:
        n_subsets: number of subsets ``M``; at least 4 (two per fold, to rank).
        seed: any non-negative integer.

    Returns:
        ``[n_subsets]`` int64 fold ids, ``n_subsets // 2`` zeros and ``n_subsets - n_subsets // 2``
        ones.
    """
    if n_subsets < 4:
        raise ValueError(f"two folds of at least 2 subsets need n_subsets >= 4, got {n_subsets}.")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _FOLD_STREAM]))
    folds = np.zeros(n_subsets, dtype=np.int64)
    folds[rng.permutation(n_subsets)[n_subsets // 2 :]] = 1
    return folds


def _checked_folds(folds: np.ndarray, n_subsets: int) -> np.ndarray:
    """``folds`` as a ``[n_subsets]`` int64 array of 0/1 with at least 2 subsets per fold."""
    out = np.asarray(folds)
    if out.shape != (n_subsets,):
        raise ValueError(f"folds must have shape ({n_subsets},) [n_subsets], got {out.shape}.")
    if not np.all((out == 0) | (out == 1)):
        raise ValueError("folds must hold only fold ids 0 and 1.")
    out = out.astype(np.int64)
    sizes = np.bincount(out, minlength=2)
    if np.any(sizes < 2):
        raise ValueError(f"each fold needs at least 2 subsets to rank, got sizes {sizes.tolist()}.")
    return out


def _stacked_predictions(
    predictions_by_value: Mapping[Hashable, np.ndarray], targets: np.ndarray
) -> tuple[tuple[Hashable, ...], np.ndarray]:
    """The values in order and their predictions ``[n_values, n_subsets, n_queries]``."""
    if len(predictions_by_value) == 0:
        raise ValueError("predictions_by_value is empty: give at least one candidate value.")
    values = tuple(predictions_by_value)
    stacked = []
    for value in values:
        predictions = _as_2d_float(f"predictions[{value!r}]", predictions_by_value[value])
        if predictions.shape != targets.shape:
            raise ValueError(
                f"predictions[{value!r}] {predictions.shape} and targets {targets.shape} must "
                "both be [n_subsets, n_queries]."
            )
        stacked.append(predictions)
    return values, np.stack(stacked)


def _best_index(means: np.ndarray) -> int | None:
    """Index of the highest finite mean (the first on ties); None when none is finite."""
    finite = np.isfinite(means)
    if not np.any(finite):
        return None
    return int(np.argmax(np.where(finite, means, -np.inf)))


def cross_fitted_lds(
    predictions_by_value: Mapping[Hashable, np.ndarray],
    targets: np.ndarray,
    folds: np.ndarray,
) -> CrossFit:
    """LDS with the hyper-parameter chosen on held-out subsets (two-fold cross-fitting).

    Direction ``d`` chooses the value whose mean LDS over queries (finite ones, as
    :func:`summarize`), computed on fold ``d``'s subsets only, is highest (ties: the first value
    in the given order) and scores its per-query LDS on fold ``1 - d``'s subsets. The reported
    per-query LDS is the mean of the two directions. NaN: a query undefined in one direction
    (e.g. a target constant on one fold) keeps the other direction's value; it is NaN only when
    both are undefined. A direction where no value has a defined LDS contributes NaN.

    Args:
        predictions_by_value: candidate value (e.g. a damping) -> ``[n_subsets, n_queries]``
            predictions with that value; the mapping's order breaks ties.
        targets: ``[n_subsets, n_queries]`` measured (seed-averaged) targets.
        folds: ``[n_subsets]`` fold id 0/1 of every subset (:func:`subset_folds`), at least 2
            subsets per fold.

    Returns:
        :class:`CrossFit` with ``per_query`` ``[n_queries]``, the chosen values, the per-direction
        held-out LDS ``[2, n_queries]`` and the ``[n_values, 2]`` table of fold means.
    """
    targets = _as_2d_float("targets", targets)
    values, stacked = _stacked_predictions(predictions_by_value, targets)
    folds = _checked_folds(folds, targets.shape[0])
    fold_lds = np.stack(
        [
            [lds_per_query(predictions[folds == f], targets[folds == f]) for f in (0, 1)]
            for predictions in stacked
        ]
    )  # [n_values, 2, n_queries]
    fold_means = _mean_finite(fold_lds, axis=2)  # [n_values, 2]
    held_out = np.full((2, targets.shape[1]), np.nan)
    chosen: list[Hashable | None] = [None, None]
    for direction in (0, 1):
        index = _best_index(fold_means[:, direction])
        if index is not None:
            chosen[direction] = values[index]
            held_out[direction] = fold_lds[index, 1 - direction]
    per_query = _mean_finite(held_out, axis=0)
    return CrossFit(per_query, (chosen[0], chosen[1]), held_out, values, fold_means)


def fold_averaged_lds(
    predictions: np.ndarray, targets: np.ndarray, folds: np.ndarray
) -> np.ndarray:
    """Per-query LDS on each fold's subsets alone, averaged over the two folds.

    What :func:`cross_fitted_lds` reports for one fixed value: the like-for-like baseline of a
    held-out-tuned LDS (the Spearman correlation over M/2 subsets is not that over M, so
    "tuned minus default" compares both on the same folds). NaN rule as cross-fitting: a query
    undefined on one fold keeps the other fold's value.

    Args:
        predictions: ``[n_subsets, n_queries]`` predictions of one value (e.g. one damping).
        targets: ``[n_subsets, n_queries]`` measured (seed-averaged) targets.
        folds: ``[n_subsets]`` fold id 0/1 of every subset (:func:`subset_folds`).

    Returns:
        ``[n_queries]`` fold-averaged LDS.
    """
    predictions, targets = _checked_pair(predictions, targets)
    folds = _checked_folds(folds, targets.shape[0])
    per_fold = np.stack(
        [lds_per_query(predictions[folds == f], targets[folds == f]) for f in (0, 1)]
    )  # [2, n_queries]
    return _mean_finite(per_fold, axis=0)


def in_sample_best(
    predictions_by_value: Mapping[Hashable, np.ndarray], targets: np.ndarray
) -> InSampleBest:
    """The value with the highest mean LDS on all subsets: an optimistic number, for display.

    The value is chosen on the subsets it is scored on, so its mean is biased upwards; report it
    labelled "optimistic" next to :func:`cross_fitted_lds`. Ties: the first value in the given
    order; the mean is over finite queries, as :func:`summarize`.

    Args:
        predictions_by_value: candidate value -> ``[n_subsets, n_queries]`` predictions.
        targets: ``[n_subsets, n_queries]`` measured (seed-averaged) targets.

    Returns:
        :class:`InSampleBest` with the best value, its per-query LDS ``[n_queries]`` and the
        ``[n_values]`` means.
    """
    targets = _as_2d_float("targets", targets)
    values, stacked = _stacked_predictions(predictions_by_value, targets)
    lds = np.stack([lds_per_query(predictions, targets) for predictions in stacked])
    means = _mean_finite(lds, axis=1)  # [n_values]
    index = _best_index(means)
    if index is None:
        return InSampleBest(None, np.full(targets.shape[1], np.nan), values, means)
    return InSampleBest(values[index], lds[index], values, means)


# ---------------------------------------------------------------- bootstrap over queries and subsets


def bootstrap_indices(
    n_subsets: int, n_queries: int, *, n_boot: int = 1000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Resampling indices of subsets and queries, drawn with replacement, shared by all methods.

    They depend only on the arguments (generator ``SeedSequence([seed, "BOOT"])``: subsets first,
    then queries), so every method of a run scored with the same seed sees the same resamples
    (common random numbers).

    Args:
        n_subsets: number of subsets ``M``.
        n_queries: number of queries ``Q``.
        n_boot: number of bootstrap replicates ``B``.
        seed: any non-negative integer.

    Returns:
        ``(rows, cols)``: ``[n_boot, n_subsets]`` and ``[n_boot, n_queries]`` int64 indices.
    """
    if n_subsets < 2 or n_queries < 1 or n_boot < 1:
        raise ValueError(
            f"need n_subsets >= 2, n_queries >= 1 and n_boot >= 1, got {n_subsets}, "
            f"{n_queries} and {n_boot}."
        )
    rng = np.random.default_rng(np.random.SeedSequence([seed, _BOOTSTRAP_STREAM]))
    rows = rng.integers(0, n_subsets, size=(n_boot, n_subsets))
    cols = rng.integers(0, n_queries, size=(n_boot, n_queries))
    return rows, cols


def _resampled_lds(predictions: np.ndarray, targets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per-query LDS on every resample of the subsets: ``[n_boot, n_queries]``.

    ``predictions`` and ``targets`` are finite ``[n_subsets, n_queries]``, ``rows`` is
    ``[n_boot, n_subsets]``; duplicated subsets tie in the ranks (average ranks).
    """
    n_boot = rows.shape[0]
    out = np.empty((n_boot, targets.shape[1]))
    chunk = max(1, _CHUNK_ELEMENTS // targets.size)
    for start in range(0, n_boot, chunk):
        picked = rows[start : start + chunk]  # [chunk, n_subsets]
        out[start : start + chunk] = _spearman_along_rows(predictions[picked], targets[picked])
    return out


def _replicate_means(per_query: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Mean of ``per_query[b]`` ``[n_boot, n_queries]`` over the resampled queries ``cols[b]``.

    Finite values only, as :func:`summarize`; NaN for a replicate with none. Returns ``[n_boot]``.
    """
    return _mean_finite(np.take_along_axis(per_query, cols, axis=1), axis=1)


def _percentile_interval(replicates: np.ndarray, level: float) -> Interval:
    """Percentile interval of the finite replicates ``[n_boot]`` (NaN ends when none is)."""
    kept = replicates[np.isfinite(replicates)]
    if kept.size == 0:
        return Interval(float("nan"), float("nan"))
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(kept, [tail, 1.0 - tail])
    return Interval(float(low), float(high))


def _checked_level(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95, got {level}.")
    return float(level)


def _checked_pair(predictions: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Finite float64 ``[n_subsets, n_queries]`` predictions and targets of the same shape."""
    predictions = _as_2d_float("predictions", predictions)
    targets = _as_2d_float("targets", targets)
    if predictions.shape != targets.shape:
        raise ValueError(
            f"predictions {predictions.shape} and targets {targets.shape} must both be "
            "[n_subsets, n_queries]."
        )
    return predictions, targets


def bootstrap_interval(
    predictions: np.ndarray,
    targets: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """Bootstrap interval of the mean LDS, resampling queries and subsets together.

    Replicate ``b`` takes the subsets ``rows[b]`` and the queries ``cols[b]`` of
    :func:`bootstrap_indices` (common random numbers: the same seed gives every method the same
    resamples), computes the per-query LDS on the resampled subsets (duplicated subsets tie) and
    averages it over the resampled queries (finite values only, as :func:`summarize`). The
    interval is the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the replicates;
    replicates with no finite value are dropped, and both ends are NaN when all are.

    Args:
        predictions: ``[n_subsets, n_queries]`` predictions of one method.
        targets: ``[n_subsets, n_queries]`` measured (seed-averaged) targets.
        n_boot: number of bootstrap replicates.
        seed: seed of :func:`bootstrap_indices`.
        level: coverage of the interval, in (0, 1).

    Returns:
        :class:`Interval` ``(low, high)``.
    """
    predictions, targets = _checked_pair(predictions, targets)
    level = _checked_level(level)
    rows, cols = bootstrap_indices(*targets.shape, n_boot=n_boot, seed=seed)
    replicates = _replicate_means(_resampled_lds(predictions, targets, rows), cols)
    return _percentile_interval(replicates, level)


def bootstrap_difference_interval(
    predictions_a: np.ndarray,
    predictions_b: np.ndarray,
    targets: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """Bootstrap interval of the mean per-query difference ``LDS_a - LDS_b`` (paired).

    Both methods are scored on the same resamples (:func:`bootstrap_indices`); each replicate
    averages ``LDS_a[q] - LDS_b[q]`` over the resampled queries where both are finite (as
    :func:`paired_difference`). Quantiles and NaN as :func:`bootstrap_interval`.

    Args:
        predictions_a: ``[n_subsets, n_queries]`` predictions of method A.
        predictions_b: ``[n_subsets, n_queries]`` predictions of method B.
        targets: ``[n_subsets, n_queries]`` measured (seed-averaged) targets.
        n_boot: number of bootstrap replicates.
        seed: seed of :func:`bootstrap_indices`.
        level: coverage of the interval, in (0, 1).

    Returns:
        :class:`Interval` ``(low, high)`` of the difference A - B.
    """
    predictions_a, targets = _checked_pair(predictions_a, targets)
    predictions_b, _ = _checked_pair(predictions_b, targets)
    level = _checked_level(level)
    rows, cols = bootstrap_indices(*targets.shape, n_boot=n_boot, seed=seed)
    difference = _resampled_lds(predictions_a, targets, rows) - _resampled_lds(
        predictions_b, targets, rows
    )  # [n_boot, n_queries], NaN where either is undefined
    return _percentile_interval(_replicate_means(difference, cols), level)


def bootstrap_noise_ceiling_interval(
    targets_per_seed: np.ndarray, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> Interval:
    """Bootstrap interval of the mean :func:`noise_ceiling`, resampling queries and subsets.

    Same resamples as :func:`bootstrap_interval` for the same seed (the subsets of every seed's
    slice are resampled together); each replicate is the mean over the resampled queries of the
    leave-one-seed-out ceiling computed on the resampled subsets. Quantiles and NaN as
    :func:`bootstrap_interval`.

    Args:
        targets_per_seed: ``[n_seeds, n_subsets, n_queries]`` finite measurements, ``n_seeds >= 2``.
        n_boot: number of bootstrap replicates.
        seed: seed of :func:`bootstrap_indices`.
        level: coverage of the interval, in (0, 1).

    Returns:
        :class:`Interval` ``(low, high)``.
    """
    t = _checked_targets_per_seed(targets_per_seed)
    level = _checked_level(level)
    n_seeds, n_subsets, n_queries = t.shape
    rows, cols = bootstrap_indices(n_subsets, n_queries, n_boot=n_boot, seed=seed)
    per_query = np.empty((n_boot, n_queries))
    chunk = max(1, _CHUNK_ELEMENTS // t.size)
    for start in range(0, n_boot, chunk):
        picked = rows[start : start + chunk]  # [chunk, n_subsets]
        per_query[start : start + chunk] = _leave_one_seed_out(t[:, picked])
    return _percentile_interval(_replicate_means(per_query, cols), level)


def overlaps_leader(
    intervals: Mapping[str, tuple[float, float]], means: Mapping[str, float]
) -> dict[str, bool]:
    """Which methods' intervals overlap the leader's (the method with the highest mean).

    Args:
        intervals: method name -> ``(low, high)`` interval (e.g. :func:`bootstrap_interval`).
        means: method name -> mean LDS; the same names as ``intervals``.

    Returns:
        Method name -> True when its interval overlaps the leader's (closed intervals; the leader
        itself is True), ordered by mean, highest first (ties keep the given order; NaN means
        last). A NaN interval overlaps nothing; when every mean is NaN there is no leader and all
        are False.
    """
    if set(intervals) != set(means):
        raise ValueError(
            f"intervals and means must name the same methods, got {sorted(intervals)} and "
            f"{sorted(means)}."
        )
    for name, (low, high) in intervals.items():
        if low > high:
            raise ValueError(f"interval of {name!r} has low {low} > high {high}.")
    order = sorted(means, key=lambda name: -means[name] if np.isfinite(means[name]) else np.inf)
    leader = order[0]
    if not np.isfinite(means[leader]):
        return dict.fromkeys(order, False)
    leader_low, leader_high = intervals[leader]
    return {
        name: name == leader
        or bool(intervals[name][0] <= leader_high and leader_low <= intervals[name][1])
        for name in order
    }
