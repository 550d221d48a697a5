"""Exact retraining: the oracle that predicts a subset's measurement by training on it once.

The paper's ceiling (Sec. 4, App. G.3): for each training subset, train one model from scratch
on it with a seed that no ground-truth model uses, and report that model's measurement of every
query. Its LDS is below 100% only because of training noise (the ground truth averages K seeds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from methods.base import AttributionMethod, MethodUnavailableError

if TYPE_CHECKING:
    from methods.context import MethodContext

__all__ = ["ExactRetraining", "ExactRetrainingConfig"]


@dataclass(frozen=True)
class ExactRetrainingConfig:
    """Options of the exact-retraining oracle.

    Attributes:
        seed_offset: subset ``i`` (its row in ``masks``) is trained with seed
            ``seed_offset + i``. The ground truth must use seeds below ``seed_offset`` so that
            the oracle's models are never the ground truth's own (the paper retrains "with a
            different seed"). Default 1_000_000, far above any ground-truth seed
            (``subset * K + k`` with M * K in the hundreds). Must be >= 0.
    """

    seed_offset: int = 1_000_000

    def __post_init__(self) -> None:
        if (
            not isinstance(self.seed_offset, int)
            or isinstance(self.seed_offset, bool)
            or self.seed_offset < 0
        ):
            raise ValueError(f"seed_offset must be an int >= 0, got {self.seed_offset!r}")


class ExactRetraining(AttributionMethod):
    """Retrain one model per subset (unseen seed) and measure the queries with it.

    Needs ``ctx.train_fn`` (``(kept positions, seed) -> model``) and ``ctx.measure_fn``
    (``model -> # [n_queries]``, the ground truth's measurement protocol); raises
    :class:`MethodUnavailableError` when the runner does not provide them. The subsets are
    retrained through ``ctx.retrain_many`` when the runner offers it (its executor: every core,
    or Ray), else one after another here.
    """

    Config: ClassVar[type] = ExactRetrainingConfig
    kind: ClassVar[str] = "subset-predictions"

    def subset_seed(self, subset_index: int) -> int:
        """The training seed of subset ``subset_index``: ``seed_offset + subset_index``."""
        return self.config.seed_offset + int(subset_index)

    def predict_subsets(self, ctx: MethodContext, masks: np.ndarray) -> np.ndarray:
        """Measured values of the models retrained on each subset.

        Args:
            ctx: needs ``train_fn`` and ``measure_fn``.
            masks: ``# [n_subsets, n_train]`` bool, True where the example is kept.

        Returns:
            ``# [n_subsets, n_queries]`` float64: ``measure_fn(train_fn(kept_i, seed_i))``.
        """
        if ctx.train_fn is None or ctx.measure_fn is None:
            missing = [n for n in ("train_fn", "measure_fn") if getattr(ctx, n) is None]
            raise MethodUnavailableError(
                f"exact retraining needs ctx.{' and ctx.'.join(missing)} (retrain on a subset, "
                "measure like the ground truth); run it through the LDS runner, which provides "
                "both"
            )
        masks = np.asarray(masks)
        if masks.dtype != np.bool_ or masks.ndim != 2 or masks.shape[1] != ctx.n_train:
            raise ValueError(
                f"masks must be a bool array [n_subsets, n_train={ctx.n_train}], got "
                f"{masks.dtype} {masks.shape}"
            )
        tasks = [
            (torch.from_numpy(np.flatnonzero(masks[i])).long(), self.subset_seed(i))  # [n_kept]
            for i in range(masks.shape[0])
        ]
        if not tasks:
            return np.empty((0, ctx.n_queries), dtype=np.float64)
        if ctx.retrain_many is not None:
            out = np.asarray(ctx.retrain_many(tasks), dtype=np.float64)
        else:
            out = np.stack(
                [
                    _retrain_and_measure(ctx, kept, seed)
                    for kept, seed in tqdm(tasks, desc="retrain subsets", disable=not ctx.progress)
                ]
            )
        if out.shape != (masks.shape[0], ctx.n_queries):
            raise ValueError(
                f"the retrained models' measurements have shape {out.shape}, expected "
                f"[n_subsets, n_queries] = [{masks.shape[0]}, {ctx.n_queries}]"
            )
        return out


def _retrain_and_measure(ctx: MethodContext, kept: torch.Tensor, seed: int) -> np.ndarray:
    """``# [n_queries]`` ``ctx.measure_fn(ctx.train_fn(kept, seed))`` as float64."""
    values = torch.as_tensor(ctx.measure_fn(ctx.train_fn(kept, seed)))
    values = values.detach().to("cpu", torch.float64)
    if values.shape != (ctx.n_queries,):
        raise ValueError(
            f"measure_fn returned shape {tuple(values.shape)}, expected "
            f"[n_queries] = [{ctx.n_queries}]"
        )
    return values.numpy()
