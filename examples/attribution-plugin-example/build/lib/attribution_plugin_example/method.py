"""A minimal attribution method: closer training images are scored as more influential."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from methods import AttributionMethod, MethodContext


@dataclass(frozen=True)
class PixelDistanceConfig:
    """Options of the pixel-distance baseline.

    Attributes:
        batch_size: training images compared per step; does not change the scores.
    """

    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


class PixelDistance(AttributionMethod):
    """Score = minus the Euclidean distance between query and training image.

    Sign contract: larger = removing the training image raises the query's measurement more;
    the nearest training image (distance 0 for a memorised copy) scores highest.
    """

    Config = PixelDistanceConfig
    invariant_config_fields = {"batch_size": (1, 5)}

    def score(self, ctx: MethodContext) -> np.ndarray:
        queries = ctx.query_images.flatten(1).double()  # [n_queries, D]
        train = ctx.train_images.flatten(1).double()  # [n_train, D]
        chunks = [
            -torch.cdist(queries, train[start : start + self.config.batch_size])
            for start in range(0, ctx.n_train, self.config.batch_size)
        ]
        return torch.cat(chunks, dim=1).numpy()  # [n_queries, n_train]
