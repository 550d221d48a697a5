"""The one contract every attribution method implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

if TYPE_CHECKING:
    from methods.context import MethodContext


class MethodUnavailableError(RuntimeError):
    """A method cannot run here (missing weights, missing optional dependency, ...).

    Runners report it as an unavailable cell with this message and carry on.
    """


@dataclass(frozen=True)
class NoConfig:
    """Configuration of a method that has no options."""


class AttributionMethod:
    """Base class of attribution methods.

    Subclasses set ``Config`` (a frozen dataclass whose defaults are the paper's defaults) and
    implement ``score`` (``kind = "scores"``) or ``predict_subsets``
    (``kind = "subset-predictions"``, for methods such as exact retraining that cannot give
    per-example scores).

    **Score contract.** ``score(ctx)[q, j]`` predicts how much the measurement
    ``m(theta, x_q)`` would *increase* if training example ``j`` were removed from the
    training set. The runner predicts a subset's measurement change by summing the scores of
    the examples that are *not* in the subset. Each method converts its library's sign and
    scale convention at its own boundary.

    Class attributes a method may set for the shared contract test suite:
        invariant_config_fields: config fields that must not change the scores (batch or
            chunk sizes), each with two values to compare, e.g. ``{"batch_size": (1, 7)}``.
        knows_self_influence: True when, for a query that is itself a training example, the
            method ranks that example among the most positive (influence methods,
            similarity baselines); False for ``random``.
        deterministic: True when a fixed ``ctx.seed`` gives identical scores.
        needs_query_trajectories: True when the method reads ``ctx.query_trajectories`` whatever
            the measurement (Journey-TRAK); the LDS runner then stores the queries with their
            sampling trajectories (:attr:`methods.registry.MethodEntry.needs_query_trajectories`).
    """

    Config: ClassVar[type] = NoConfig
    kind: ClassVar[Literal["scores", "subset-predictions"]] = "scores"
    invariant_config_fields: ClassVar[dict[str, tuple[Any, Any]]] = {}
    knows_self_influence: ClassVar[bool] = True
    deterministic: ClassVar[bool] = True
    needs_query_trajectories: ClassVar[bool] = False

    def __init__(self, config: Any | None = None) -> None:
        if config is None:
            config = self.Config()
        if not isinstance(config, self.Config):
            raise TypeError(
                f"{type(self).__name__} expects a {self.Config.__name__} config, "
                f"got {type(config).__name__}"
            )
        self.config = config

    def availability(self) -> tuple[bool, str]:
        """(available, reason): whether the method can run here, and why not."""
        return True, ""

    def score(self, ctx: MethodContext) -> np.ndarray:
        """Attribution scores, ``# [n_queries, n_train]`` float64 (see the score contract)."""
        raise NotImplementedError(f"{type(self).__name__} does not produce per-example scores")

    def predict_subsets(self, ctx: MethodContext, masks: np.ndarray) -> np.ndarray:
        """Predicted measurements for training subsets.

        Args:
            ctx: the method context.
            masks: ``# [n_subsets, n_train]`` bool, True where the example is kept.

        Returns:
            ``# [n_subsets, n_queries]`` predicted measurement (any affine scale: LDS is a
            rank correlation across subsets).
        """
        raise NotImplementedError(f"{type(self).__name__} does not predict subset measurements")
