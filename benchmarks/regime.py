"""Regime diagnostic of an LDS run: are the queries near-copies of training images?

Attribution in a memorising model is a different problem from attribution in a generalising one
(a near-copy's "influence" is its source image, which a nearest-neighbour search finds). So every
LDS run reports, in pixel space (L2 on the flattened images in ``[-1, 1]``):

- per query, the ratio of its distance to the nearest training image over that to the second
  nearest: a near-copy test in the spirit of Carlini et al. (2023, "Extracting Training Data
  from Diffusion Models"), whose test divides by the mean distance to the closest training
  images instead; a ratio under :data:`NEAR_COPY_RATIO` marks a near copy (an exact copy has
  ratio 0);
- the fraction of queries under that threshold;
- the queries' mean nearest-training-image distance against that of real images the model did
  not train on (``benchmarks.pipeline.load_held_out_set``). A generalising model's samples are
  about as far from the training set as unseen real images; a memorising model's are closer.
  When the data set has no unused image (the whole set is trained on: ``quick``, ``cifar2``),
  the reference is each training image's distance to its nearest *other* training image
  (leave-one-out), labelled so: it is what a fresh real image would get against ``n - 1``
  training images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from methods.baselines import l2_distance_matrix

__all__ = [
    "HELD_OUT",
    "LEAVE_ONE_OUT",
    "NEAR_COPY_RATIO",
    "RegimeDiagnostic",
    "footer_text",
    "nearest_two",
    "regime_diagnostic",
]

NEAR_COPY_RATIO = 1 / 3
"""A query whose nearest/second-nearest distance ratio is under this is a near copy."""

HELD_OUT = "held-out real images"
"""``reference_kind`` when the reference images are real images outside the training set."""

LEAVE_ONE_OUT = "training images, leave-one-out"
"""``reference_kind`` when there is no held-out image: training images against the others."""

_CANDIDATES = 4  # nearest candidates by cdist's fast form, re-measured exactly
_CHUNK_ROWS = 256  # rows of the distance matrix held at once


@dataclass(frozen=True)
class RegimeDiagnostic:
    """The regime of one run's queries (see the module docstring).

    Attributes:
        nearest: ``# [n_queries]`` L2 distance of each query to its nearest training image.
        second: ``# [n_queries]`` to its second-nearest training image.
        nearest_index: ``# [n_queries]`` position of that nearest training image.
        ratio: ``# [n_queries]`` ``nearest / second`` (0 when both are 0).
        reference_nearest: ``# [n_reference]`` nearest-training-image distance of each
            reference image (held-out real images, else training images leave-one-out).
        reference_kind: :data:`HELD_OUT` or :data:`LEAVE_ONE_OUT`.
    """

    nearest: np.ndarray
    second: np.ndarray
    nearest_index: np.ndarray
    ratio: np.ndarray
    reference_nearest: np.ndarray
    reference_kind: str

    @property
    def near_copy_fraction(self) -> float:
        """Fraction of queries whose ratio is under :data:`NEAR_COPY_RATIO`."""
        return float(np.mean(self.ratio < NEAR_COPY_RATIO))

    def summary(self) -> dict[str, Any]:
        """The run record's scalars: ratio median, near-copy fraction, mean distances, sizes."""
        return {
            "ratio_median": float(np.median(self.ratio)),
            "near_copy_threshold": NEAR_COPY_RATIO,
            "near_copy_fraction": self.near_copy_fraction,
            "n_queries": int(self.ratio.size),
            "query_nearest_mean": float(np.mean(self.nearest)),
            "reference_nearest_mean": float(np.mean(self.reference_nearest)),
            "reference_kind": self.reference_kind,
            "n_reference": int(self.reference_nearest.size),
        }

    def per_query(self) -> pd.DataFrame:
        """One row per query: ``query, nearest, second, ratio, nearest_index, near_copy``."""
        return pd.DataFrame(
            {
                "query": np.arange(self.ratio.size, dtype=np.int64),
                "nearest": self.nearest,
                "second": self.second,
                "ratio": self.ratio,
                "nearest_index": self.nearest_index,
                "near_copy": self.ratio < NEAR_COPY_RATIO,
            }
        )

    def footer(self) -> str:
        """The one-line table footer (see :func:`footer_text`)."""
        return footer_text(self.summary())


def footer_text(summary: dict[str, Any]) -> str:
    """The table footer of a :meth:`RegimeDiagnostic.summary` (also read back from run.json).

    ``regime: nearest/second-nearest L2 ratio median 0.812, fraction < 1/3: 0.000 (0 of 32
    queries); mean nearest-train L2 distance: queries 4.210 vs held-out real images 4.870
    (n=293)``.
    """
    n = summary["n_queries"]
    near = round(summary["near_copy_fraction"] * n)
    return (
        f"regime: nearest/second-nearest L2 ratio median {summary['ratio_median']:.3f}, "
        f"fraction < 1/3: {summary['near_copy_fraction']:.3f} ({near} of {n} queries); "
        f"mean nearest-train L2 distance: queries {summary['query_nearest_mean']:.3f} vs "
        f"{summary['reference_kind']} {summary['reference_nearest_mean']:.3f} "
        f"(n={summary['n_reference']})"
    )


def nearest_two(
    points: torch.Tensor, train: torch.Tensor, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distance of each point to its nearest and second-nearest training image.

    The candidates come from ``methods.baselines.l2_distance_matrix`` (cdist's fast
    matrix-product form) and are re-measured exactly, so an exact copy is at distance 0.

    Args:
        points: ``# [n_points, C, H, W]`` (any ``[n_points, ...]``).
        train: ``# [n_train, C, H, W]``, ``n_train >= 2``.
        exclude: ``# [n_points]`` a training position each point must not match (itself, for
            leave-one-out), or None.

    Returns:
        ``(nearest, second, nearest_index)``, each ``# [n_points]`` (float64, float64, int64);
        ``second`` is NaN where only one training image is left (``n_train = 2`` with
        ``exclude``).
    """
    x = train.detach().reshape(train.shape[0], -1).to("cpu", torch.float64)  # [N, D]
    p = points.detach().reshape(points.shape[0], -1).to("cpu", torch.float64)  # [P, D]
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 training images, got {x.shape[0]}")
    k = min(_CANDIDATES, x.shape[0] - (exclude is not None))
    nearest, second, index = [], [], []
    for start in range(0, p.shape[0], _CHUNK_ROWS):
        rows = p[start : start + _CHUNK_ROWS]  # [B, D]
        dist = l2_distance_matrix(rows, x)  # [B, N]
        if exclude is not None:
            own = torch.as_tensor(exclude[start : start + _CHUNK_ROWS], dtype=torch.int64)
            dist[torch.arange(rows.shape[0]), own] = math.inf
        candidates = dist.topk(k, dim=1, largest=False).indices  # [B, k]
        exact = (rows[:, None, :] - x[candidates]).norm(dim=2)  # [B, k]
        order = exact.argsort(dim=1, stable=True)
        exact = exact.gather(1, order)
        nearest.append(exact[:, 0])
        second.append(exact[:, 1] if k >= 2 else torch.full_like(exact[:, 0], math.nan))
        index.append(candidates.gather(1, order)[:, 0])
    return (
        torch.cat(nearest).numpy(),
        torch.cat(second).numpy(),
        torch.cat(index).numpy().astype(np.int64),
    )


def regime_diagnostic(
    queries: torch.Tensor,
    train: torch.Tensor,
    held_out: torch.Tensor | None = None,
    *,
    max_reference: int = 1000,
    seed: int = 0,
) -> RegimeDiagnostic:
    """The regime diagnostic of ``queries`` against their training set (module docstring).

    Args:
        queries: ``# [n_queries, C, H, W]`` the generated queries.
        train: ``# [n_train, C, H, W]`` the base model's training images.
        held_out: ``# [n_held, C, H, W]`` real images of the data set the model did not train
            on; None or empty: the training images leave-one-out are the reference instead.
        max_reference: at most this many reference images, drawn without replacement (seeded)
            when there are more (CIFAR-10's 50000 training images).
        seed: the seed of that draw.

    Returns:
        The :class:`RegimeDiagnostic`.
    """
    if max_reference < 1:
        raise ValueError(f"max_reference must be >= 1, got {max_reference}")
    nearest, second, index = nearest_two(queries, train)
    ratio = np.divide(nearest, second, out=np.zeros_like(nearest), where=second > 0)
    rng = np.random.default_rng(seed)
    if held_out is not None and held_out.shape[0] > 0:
        kind, pool = HELD_OUT, held_out.shape[0]
    else:
        kind, pool = LEAVE_ONE_OUT, train.shape[0]
    chosen = np.arange(pool)
    if pool > max_reference:
        chosen = np.sort(rng.choice(pool, size=max_reference, replace=False))
    if kind == HELD_OUT:
        reference, _, _ = nearest_two(held_out[chosen], train)
    else:
        reference, _, _ = nearest_two(train[chosen], train, exclude=chosen)
    return RegimeDiagnostic(nearest, second, index, ratio, reference, kind)
