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
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "PairedDifference",
    "Summary",
    "lds_from_scores",
    "lds_per_query",
    "noise_ceiling",
    "paired_difference",
    "predictions_from_scores",
    "spearman_columns",
    "summarize",
]


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
    ra = rankdata(a, axis=0, method="average")  # [n_rows, n_cols]
    rb = rankdata(b, axis=0, method="average")
    ra -= ra.mean(axis=0, keepdims=True)  # average ranks are exact: a constant column -> 0.0
    rb -= rb.mean(axis=0, keepdims=True)
    ssa = np.einsum("ij,ij->j", ra, ra)  # [n_cols]
    ssb = np.einsum("ij,ij->j", rb, rb)
    cross = np.einsum("ij,ij->j", ra, rb)
    out = np.full(a.shape[1], np.nan)
    defined = (ssa > 0) & (ssb > 0)
    out[defined] = cross[defined] / np.sqrt(ssa[defined] * ssb[defined])
    return np.clip(out, -1.0, 1.0)


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
    """``lds_per_query(predictions_from_scores(scores, masks), targets)``: ``[n_queries]``."""
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
    total = t.sum(axis=0)  # [n_subsets, n_queries]
    per_seed = np.stack(
        [spearman_columns(t[k], (total - t[k]) / (n_seeds - 1)) for k in range(n_seeds)]
    )  # [n_seeds, n_queries]
    counts = np.sum(~np.isnan(per_seed), axis=0)
    sums = np.nansum(per_seed, axis=0)
    out = np.full(t.shape[2], np.nan)
    np.divide(sums, counts, out=out, where=counts > 0)
    return out
