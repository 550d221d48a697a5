"""TracIn-CP: learning-rate-weighted gradient dot products summed over training checkpoints.

Pruthi et al., NeurIPS 2020, "Estimating Training Data Influence by Tracing Gradient Descent".

**What is computed.** With the base model's K evenly spaced training checkpoints ``w_k`` and the
learning rate ``eta_k`` of the step that produced each (``ctx.checkpoints_fn``, the runner's
:func:`benchmarks.pipeline.get_base_checkpoints`; the last checkpoint is the trained model)::

    scores[q, j] = sum_k eta_k <grad m(w_k, x_q), grad l(w_k, x_j)>

with ``m`` the measurement (``ctx.measurement`` or the config's) on query ``q`` and ``l`` the
training loss on example ``j`` (their TracInCP, with the loss of the test point replaced by
the measurement). Each term is the gradient dot product of ``grad-dot``
(:class:`methods.kfac.KFACInfluence` with the identity curvature, float query gradients) at
checkpoint ``k``: the one gradient engine (:mod:`methods.gradients`) with its Monte Carlo draws
(the same (t, eps) draws at every checkpoint: common random numbers, from ``ctx.seed``), the
training gradients averaged over flips when training flipped. ``grad-dot`` divides by N; that
factor is undone here, and the sum over checkpoints is accumulated in float64.

**Sign.** Their influence is positive for a *proponent*: a step on ``x_j`` at ``w_k`` moves the
weights by ``-eta_k grad l(w_k, x_j)`` (times its weight in the minibatch) and changes the test
loss by ``-eta_k <grad m, grad l>`` to first order, so training on a proponent lowers the test
loss, and removing it raises the measurement by the same amount. That is the harness's score
contract as is (a positive score predicts that the measurement increases when the example is
removed), the sign of ``grad-dot`` and of influence functions; no flip. It holds for any
measurement (the same argument with ``m`` for the test loss).

**Scale.** TracInCP's formula, as the paper states it: each checkpoint stands for the
``S / K`` steps of its stretch of training, in each of which ``x_j`` weighs ``1 / N`` of the
mean loss in expectation, so the expected first-order change is these scores times ``S / (K
N)`` (``S`` steps): a constant, which leaves every ranking and the LDS unchanged.

**Choices.** Checkpoint ``k`` is taken after ``(k + 1) S // K`` steps (their checkpoints at the
end of each epoch: the final model is the last one) and ``eta_k`` is the learning rate of that
step (warmup and cosine decay included: under a cosine schedule the final model's weight is
nearly 0). The base model is trained with Adam; TracIn's first-order argument is for SGD
(the paper applies it to "SGD or a variant of it"), and here, as in the formula, the learning
rate stands for the step size and Adam's per-parameter scaling is ignored. The paper fixes no
checkpoint count (it uses the checkpoints standard training saves); the default, 4, keeps the
CPU quick preset affordable (each checkpoint costs one ``grad-dot`` pass, and the checkpoints
one rerun of the base model's training, stored and reused).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from tqdm.auto import tqdm

from diffusion.measurements import parse_measurement
from methods.base import AttributionMethod, MethodUnavailableError
from methods.gradients import GRADIENT_BACKENDS
from methods.kfac import KFACInfluence

if TYPE_CHECKING:
    from methods.context import MethodContext

__all__ = ["TracIn", "TracInConfig"]


def _positive_int(name: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        kind = "a positive int or None" if optional else "a positive int"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


@dataclass(frozen=True)
class TracInConfig:
    """TracIn-CP options.

    Attributes:
        n_checkpoints: K, the base model's evenly spaced training checkpoints summed over (the
            last one is the trained model). The paper fixes no count; default 4 for the CPU
            presets.
        grad_samples: Monte Carlo draws per training example for the training-loss gradients;
            None = ``ctx.grad_samples``.
        query_samples: draws per query for the measurement gradients; None =
            ``ctx.query_samples``.
        measurement: the measurement whose gradient meets the training gradients; None =
            ``ctx.measurement``.
        batch_size: examples per gradient chunk; bounds memory, scores do not depend on it.
        sample_chunk: draws per forward pass inside a chunk; None = all. Memory only.
        backend: per-example gradient backend (:data:`methods.gradients.GRADIENT_BACKENDS`).
    """

    n_checkpoints: int = 4
    grad_samples: int | None = None
    query_samples: int | None = None
    measurement: str | None = None
    batch_size: int = 16
    sample_chunk: int | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        _positive_int("n_checkpoints", self.n_checkpoints)
        _positive_int("batch_size", self.batch_size)
        for name in ("grad_samples", "query_samples", "sample_chunk"):
            _positive_int(name, getattr(self, name), optional=True)
        if self.measurement is not None:
            parse_measurement(self.measurement)  # raises ValueError listing valid names
        if self.backend not in GRADIENT_BACKENDS:
            raise ValueError(f"backend must be one of {GRADIENT_BACKENDS}, got {self.backend!r}")


class TracIn(AttributionMethod):
    """TracIn-CP: learning-rate-weighted gradient dot products over checkpoints (module docstring).

    Needs ``ctx.checkpoints_fn``; raises :class:`MethodUnavailableError` without it.
    """

    Config: ClassVar[type] = TracInConfig
    invariant_config_fields: ClassVar[dict[str, tuple[Any, Any]]] = {"batch_size": (5, 11)}
    # A sum of plain gradient dot products: like grad-dot, dominated by the examples with the
    # largest gradients rather than by the query's own example, so it does not claim it.
    knows_self_influence: ClassVar[bool] = False
    deterministic: ClassVar[bool] = True

    config: TracInConfig

    def score(self, ctx: MethodContext) -> np.ndarray:
        """``# [n_queries, n_train]`` float64 ``sum_k eta_k <grad m(w_k, x_q), grad l(w_k, x_j)>``."""
        if ctx.checkpoints_fn is None:
            raise MethodUnavailableError(
                "TracIn-CP needs the base model's training checkpoints (ctx.checkpoints_fn); "
                "run it through the LDS runner, which stores and offers them"
            )
        checkpoints = ctx.checkpoints_fn(self.config.n_checkpoints)
        if len(checkpoints) != self.config.n_checkpoints:
            raise RuntimeError(
                f"ctx.checkpoints_fn({self.config.n_checkpoints}) returned {len(checkpoints)} "
                "checkpoints"
            )
        grad_dot = self.grad_dot(ctx)
        scores = np.zeros((ctx.n_queries, ctx.n_train), dtype=np.float64)
        bar = tqdm(checkpoints, desc="TracIn checkpoints", disable=not ctx.progress)
        for learning_rate, model in bar:
            dots = grad_dot.score(replace(ctx, model=model)) * ctx.n_train  # [Q, N]
            scores += float(learning_rate) * dots
        return scores

    def grad_dot(self, ctx: MethodContext) -> KFACInfluence:
        """The ``grad-dot`` scorer of one checkpoint: identity curvature, float query gradients.

        Args:
            ctx: the method context (its sample counts fill the config's unset ones).

        Returns:
            A :class:`methods.kfac.KFACInfluence` whose ``score`` is ``<grad m, grad l> / N``.
        """
        cfg = self.config
        counts = ctx.sample_counts(cfg)
        return KFACInfluence(
            KFACInfluence.Config(
                curvature="identity",
                quantize=None,
                grad_samples=counts.grad,
                query_samples=counts.query,
                measurement=cfg.measurement,
                batch_size=cfg.batch_size,
                sample_chunk=cfg.sample_chunk,
                backend=cfg.backend,
            )
        )
