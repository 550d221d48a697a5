"""TRAK and D-TRAK over an ensemble of models trained on random subsets (the TRAK recipe).

**What is computed.** ``n_models`` members, member ``i`` trained by ``ctx.train_fn(positions_i,
seed_i)`` (the ground truth's subset recipe, stored by the runner under that key, so a member
is trained once and reused by every later run, by ``trak-ensemble`` and ``dtrak-ensemble``
alike): ``positions_i`` a random subset of ``round(subset_fraction * N)`` training positions
(default: random halves) drawn from :func:`methods.gradients.example_seed` ``(ctx.seed,
"trak-ensemble", i)``, and ``seed_i = 2_000_000 + i`` (:data:`MEMBER_SEED_OFFSET`). Each member
is scored by TRAK's own per-model path (:meth:`methods.trak.TRAK._model_scores`: features of
*every* training example and of the queries under the member, the same Monte Carlo draws as
TRAK) as traker checkpoint ``model_id = i``, which gives it its own random projection (traker
seeds checkpoint ``i``'s projection with ``projector_seed + 10^5 i``). The scores are the
members' mean::

    scores[q, j] = (1 / M) sum_i phi_{i,q}^T (Phi_i^T Phi_i + N lambda I_k)^{-1} phi_{i,j}

which is traker's ``finalize_scores`` over ``model_ids = 0..M-1``: it sums the per-model
score matrices, divides by M, and multiplies by the mean over models of the ``out_to_loss``
term (TRAK's ``Q``, 1 for every example here: :class:`methods.trak.DiffusionModelOutput`), i.e.
the TRAK paper's average of per-model scores. Here each member's scores come from traker's
``finalize_scores`` of that member alone (float32, as TRAK's) and the mean is accumulated in
float64 (traker accumulates in float32). With one member the scores are that member's TRAK
scores; with a member that *is* the base model, TRAK's (model id 0 shares TRAK's projection).

**Sign.** As TRAK's (:mod:`methods.trak`): a positive score predicts that the measurement
increases when the example is removed; the mean keeps it.

**Choices.** The base model (trained on the full set) is not a member: the TRAK recipe ensembles
independently trained models, and the random-subset models are what it averages over (the full
model is one fixed draw the subset models already vary around). Member seeds
``2_000_000 + i`` go through the same ``train_fn`` as the exact-retraining oracle, whose seeds
are ``seed_offset + subset`` (1_000_000 + subset by default): they never meet unless the oracle
has a million subsets or its ``seed_offset`` is moved up to 2_000_000. The ensemble size: the
TRAK paper's headline results average many models (up to 100 on CIFAR-10); the default, 4,
keeps the CPU quick preset affordable (each member costs one subset-model training and one TRAK
featurisation). The diffusion-influence paper (App. G.3-G.4) runs TRAK with a single model and
gives no ensemble recipe.

**Caching.** Each member's features live in their own traker work directory, keyed as TRAK's
(:meth:`methods.trak.TRAK._features_spec`: the member's weights are fingerprinted) plus its model
id, and not by ``n_models``: a larger ensemble reuses the members it shares with a smaller one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from methods.base import MethodUnavailableError
from methods.gradients import example_seed
from methods.trak import TRAK, TRAKConfig

if TYPE_CHECKING:
    from methods.context import MethodContext

__all__ = ["MEMBER_SEED_OFFSET", "MEMBER_STREAM", "TRAKEnsemble", "TRAKEnsembleConfig"]

MEMBER_STREAM = "trak-ensemble"
"""Seed stream of the members' subsets (:func:`methods.gradients.example_seed`, index = member)."""
MEMBER_SEED_OFFSET = 2_000_000
"""Member ``i`` is trained with seed ``MEMBER_SEED_OFFSET + i`` (the oracle's are 1_000_000 + k)."""


@dataclass(frozen=True)
class TRAKEnsembleConfig(TRAKConfig):
    """Options of the TRAK / D-TRAK ensembles: those of :class:`~methods.trak.TRAKConfig`, and two more.

    Attributes:
        n_models: ensemble size M (>= 1). Default 4, for the CPU presets; the TRAK paper
            averages up to 100 models.
        subset_fraction: fraction of the training set each member is trained on, in (0, 1]
            (``round(fraction * N)`` examples, at least 1). Default 0.5: random halves.
    """

    n_models: int = 4
    subset_fraction: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.n_models, int) or isinstance(self.n_models, bool):
            raise ValueError(f"n_models must be an int >= 1, got {self.n_models!r}")
        if self.n_models < 1:
            raise ValueError(f"n_models must be an int >= 1, got {self.n_models!r}")
        fraction = self.subset_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise ValueError(f"subset_fraction must be a float in (0, 1], got {fraction!r}")
        if not 0 < fraction <= 1:
            raise ValueError(f"subset_fraction must be a float in (0, 1], got {fraction!r}")


class TRAKEnsemble(TRAK):
    """TRAK / D-TRAK averaged over models trained on random subsets; see the module docstring.

    Registered as ``trak-ensemble`` and ``dtrak-ensemble`` (``output_function="square-norm"``).
    Needs ``ctx.train_fn``; raises :class:`MethodUnavailableError` without it.
    """

    Config: ClassVar[type] = TRAKEnsembleConfig
    features_independent_fields: ClassVar[tuple[str, ...]] = (
        *TRAK.features_independent_fields,
        "n_models",
    )

    def member_positions(self, seed: int, index: int, n_train: int) -> np.ndarray:
        """``# [n_kept]`` sorted training positions of member ``index`` (its random subset).

        Args:
            seed: the run's seed (``ctx.seed``).
            index: the member, ``0 <= index < n_models``.
            n_train: the training-set size N.

        Returns:
            ``round(subset_fraction * N)`` (at least 1) distinct positions, int64, ascending.
        """
        n_kept = max(1, round(self.config.subset_fraction * n_train))
        rng = np.random.default_rng(example_seed(seed, MEMBER_STREAM, index))
        return np.sort(rng.choice(n_train, size=n_kept, replace=False)).astype(np.int64)

    @staticmethod
    def member_seed(index: int) -> int:
        """The training seed of member ``index``: ``MEMBER_SEED_OFFSET + index``."""
        return MEMBER_SEED_OFFSET + int(index)

    def score(self, ctx: MethodContext) -> np.ndarray:
        """``# [n_queries, n_train]`` float64: the mean of the members' TRAK scores."""
        self._require_available()
        if ctx.train_fn is None:
            raise MethodUnavailableError(
                "a TRAK ensemble trains its members with ctx.train_fn (retrain on a subset); run "
                "it through the LDS runner, which provides it"
            )
        n_models = self.config.n_models
        total = np.zeros((ctx.n_queries, ctx.n_train), dtype=np.float64)
        for index in tqdm(range(n_models), desc="TRAK ensemble", disable=not ctx.progress):
            positions = torch.from_numpy(self.member_positions(ctx.seed, index, ctx.n_train))
            member = ctx.train_fn(positions, self.member_seed(index))
            total += self._model_scores(ctx, member, index)
        return total / n_models
