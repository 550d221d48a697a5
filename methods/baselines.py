"""Model-free reference baselines: seeded random scores and pixel-space similarities.

None looks at the diffusion model or the measurement. They bound the benchmark from below:
``random`` has an LDS of zero in expectation; ``pixel`` (cosine, reported by D-TRAK, Zheng et
al. 2024) and ``pixel-l2`` (minus the Euclidean distance: the nearest-neighbour baseline) are the
naive "similar-looking training images are influential" heuristic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from methods.base import AttributionMethod, NoConfig

if TYPE_CHECKING:
    from methods.context import MethodContext

__all__ = [
    "PixelCosine",
    "PixelL2",
    "RandomScores",
    "cosine_similarity_matrix",
    "l2_distance_matrix",
]

_RANDOM_STREAM = 0x52414E44  # "RAND": keeps these draws apart from other uses of ctx.seed


def cosine_similarity_matrix(queries: torch.Tensor, train: torch.Tensor) -> np.ndarray:
    """Cosine similarity of every query row with every training row, in float64.

    Args:
        queries: ``# [n_queries, D]`` (any shape ``[n_queries, ...]``; flattened).
        train: ``# [n_train, D]`` (any shape ``[n_train, ...]``; flattened).

    Returns:
        ``# [n_queries, n_train]`` float64, ``<q, x> / max(|q| |x|, 1e-12)`` (a zero vector has
        similarity 0 with everything).
    """
    q = queries.detach().reshape(queries.shape[0], -1).to("cpu", torch.float64)  # [Q, D]
    x = train.detach().reshape(train.shape[0], -1).to("cpu", torch.float64)  # [N, D]
    if q.shape[1] != x.shape[1]:
        raise ValueError(
            f"queries have {q.shape[1]} features per row but train rows have {x.shape[1]}"
        )
    norms = q.norm(dim=1)[:, None] * x.norm(dim=1)[None, :]  # [Q, N]
    return ((q @ x.T) / norms.clamp_min(1e-12)).numpy()


def l2_distance_matrix(queries: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of every query row to every training row, in float64 on the CPU.

    Args:
        queries: ``# [n_queries, D]`` (any shape ``[n_queries, ...]``; flattened).
        train: ``# [n_train, D]`` (any shape ``[n_train, ...]``; flattened).

    Returns:
        ``# [n_queries, n_train]`` float64 ``|q - x|``, by ``torch.cdist`` (its matrix-product
        form: exact to about 1e-6 absolute, so an exact copy is at ~1e-6, not 0).
    """
    q = queries.detach().reshape(queries.shape[0], -1).to("cpu", torch.float64)  # [Q, D]
    x = train.detach().reshape(train.shape[0], -1).to("cpu", torch.float64)  # [N, D]
    if q.shape[1] != x.shape[1]:
        raise ValueError(
            f"queries have {q.shape[1]} features per row but train rows have {x.shape[1]}"
        )
    return torch.cdist(q, x)


class PixelCosine(AttributionMethod):
    """Cosine similarity in pixel space between each query and each training image.

    ``scores[q, j] = <x_q, x_j> / (|x_q| |x_j|)`` on the flattened images as the harness stores
    them (``[-1, 1]``, so mid-grey is the origin). Higher similarity = more influential: a
    heuristic (D-TRAK's "pixel" baseline), not a prediction of the measurement's change; it
    ignores the model and the measurement. Scale-free, so only its rankings are meaningful.
    """

    Config: ClassVar[type] = NoConfig

    def score(self, ctx: MethodContext) -> np.ndarray:
        """``# [n_queries, n_train]`` float64 cosine similarities."""
        return cosine_similarity_matrix(ctx.query_images, ctx.train_images)


class PixelL2(AttributionMethod):
    """Minus the Euclidean distance in pixel space: the nearest-neighbour baseline.

    ``scores[q, j] = -|x_q - x_j|`` on the flattened images as the harness stores them
    (``[-1, 1]``), so the nearest training image (a memorised copy: distance 0) scores highest.
    Like ``pixel``, a heuristic that ignores the model and the measurement; unlike the cosine it
    is not scale-free (a faint and a bold copy of one digit are far apart).
    """

    Config: ClassVar[type] = NoConfig

    def score(self, ctx: MethodContext) -> np.ndarray:
        """``# [n_queries, n_train]`` float64 minus the pixel-space L2 distances."""
        return -l2_distance_matrix(ctx.query_images, ctx.train_images).numpy()


class RandomScores(AttributionMethod):
    """Independent standard-normal scores, seeded by ``ctx.seed``: the chance-level baseline.

    ``scores = default_rng(SeedSequence([ctx.seed, 0x52414E44])).standard_normal((Q, N))``, so a
    fixed seed gives the same scores and the draws are independent of any other use of the seed.
    """

    Config: ClassVar[type] = NoConfig
    knows_self_influence: ClassVar[bool] = False

    def score(self, ctx: MethodContext) -> np.ndarray:
        """``# [n_queries, n_train]`` float64 standard-normal draws."""
        if ctx.seed < 0:
            raise ValueError(f"ctx.seed must be >= 0 for the random baseline, got {ctx.seed}")
        rng = np.random.default_rng(np.random.SeedSequence([ctx.seed, _RANDOM_STREAM]))
        return rng.standard_normal((ctx.n_queries, ctx.n_train))
