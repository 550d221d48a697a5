"""DAS: the Diffusion Attribution Score (Lin et al., ICLR 2025), on the TRAK machinery.

From the authors' code (github.com/Jinxu-Lin/DAS, ``CIFAR2/03_grad.py``, ``04_eval.py`` and
``07_score.py``, method ``DAS1``):

1. **Gradients of the model output.** For every example (training and query alike) the
   gradient of their ``"mean"`` output function, the mean over pixels of ``eps_theta(x_t, t)``
   (our ``mean-output`` measurement), *each draw's gradient normalised to unit L2 norm* before
   the mean over the draws (``normalized_ft_per_sample_grads`` in ``03_grad.py``), then
   projected. Computed by the one engine (:mod:`methods.gradients`, ``normalize_draws=True``)
   and projected and solved as in TRAK (:mod:`methods.trak`):
   ``tau[q, j] = phi_q^T (Phi^T Phi + N lambda I)^{-1} phi_j``.
2. **Training-error weights.** Each training example's score is multiplied by its normalised
   training error (``load_error`` in ``07_score.py``): with ``e_s = sqrt(loss at draw s)`` the
   per-draw root mean-square denoising error, ``w_j = mean_s(e_s) / (||e||_2 + 1e-8)``. The
   authors evaluate ``e`` on a grid of 1000 timesteps with their own noise; here ``e`` is taken
   at the example's training-gradient draws (the authors' error and gradient noise share their
   seeds too). ``scores[q, j] = tau[q, j] * w_j``. (Their ``DAS1`` line multiplies by
   ``error_train.unsqueeze(1)``, a ``[N, 1]`` column against ``[n_gen, N]`` scores, which only
   broadcasts when the two counts are equal; the intent, one weight per training example, is
   what is implemented.)

**Sign.** The authors predict a subset's loss as ``sum over kept j of -scores[q, j]``, so removing
``j`` changes the measurement by ``+scores[q, j]``: the harness's score contract as is, no flip
(as for TRAK).

**Differences from their code, by design of the harness.** Monte Carlo draws ``(t, eps)``
(``grad_samples`` / ``query_samples``) instead of their fixed grid of 10 timesteps; damping in
the harness's normalisation (:mod:`methods.trak`; they pick lambda from a grid by LDS, which is
what the harness's damping selection does) and no rescaling of the inverse by its mean absolute
entry (a uniform factor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from diffusion.measurements import per_draw
from methods.gradients import draw_examples
from methods.trak import TRAIN_STREAM, TRAK, TRAKConfig

if TYPE_CHECKING:
    from methods.context import MethodContext

__all__ = ["DAS", "DASConfig", "training_error_weights"]


@dataclass(frozen=True)
class DASConfig(TRAKConfig):
    """Options of DAS: TRAK's (:class:`~methods.trak.TRAKConfig`) with DAS's defaults.

    Attributes:
        output_function: ``"mean-output"`` (their ``"mean"``); ``"square-norm"`` gives their
            D-TRAK ablation with DAS's weighting.
        proj_dim: projection size (their ``07_score.py`` default: 4096).
        normalize_draws: normalise each draw's gradient to unit norm before the mean over draws
            (their ``03_grad.py``).
        error_weighting: multiply each training example's scores by its normalised training
            error (their ``DAS1``); False gives the unweighted scores.
    """

    output_function: str = "mean-output"
    proj_dim: int = 4096
    normalize_draws: bool = True
    error_weighting: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.output_function == "loss":
            raise ValueError(
                "DAS attributes the model output: output_function must be 'mean-output' or "
                "'square-norm' (use the 'trak' method for the training loss)"
            )
        for name in ("normalize_draws", "error_weighting"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")


def training_error_weights(
    model: torch.nn.Module,
    ctx: MethodContext,
    n_samples: int,
    batch_size: int,
) -> torch.Tensor:
    """DAS's normalised training error of every training example: ``# [n_train]`` float64.

    ``w_j = mean_s(e_s) / (||e||_2 + 1e-8)`` with ``e_s = sqrt(loss_s)`` the root mean-square
    denoising error at draw ``s`` of the example's training-gradient draws (stream
    ``"trak-train"``, flips as in training).

    Args:
        model: the eps-model, on the compute device, eval mode.
        ctx: the method context (training images, schedule, seed, hflip).
        n_samples: draws per example (the training-gradient count).
        batch_size: examples per forward pass.

    Returns:
        The weights, on the CPU.
    """
    first = next(iter(model.parameters()))
    weights = torch.empty(ctx.n_train, dtype=torch.float64)
    shape = tuple(ctx.train_images.shape[1:])
    for start in range(0, ctx.n_train, batch_size):
        stop = min(start + batch_size, ctx.n_train)
        draws = draw_examples(
            range(start, stop),
            n_samples,
            shape,
            ctx.schedule.num_timesteps,
            seed=ctx.seed,
            stream=TRAIN_STREAM,
            hflip=ctx.hflip,
        )
        x0 = ctx.train_images[start:stop].to(first.device, first.dtype)
        x0 = x0.unsqueeze(1).expand(stop - start, n_samples, *shape)
        if draws.flip is not None:
            x0 = torch.where(draws.flip.to(first.device)[..., None, None, None], x0.flip(-1), x0)
        rows = (stop - start) * n_samples
        with torch.no_grad():
            loss = per_draw(
                "loss",
                model,
                ctx.schedule,
                x0.reshape(rows, *shape),
                draws.t.reshape(rows, 1).to(first.device),
                draws.eps.reshape(rows, 1, *shape).to(first.device, first.dtype),
            ).reshape(stop - start, n_samples)  # [b, S]
        errors = loss.to("cpu", torch.float64).sqrt()
        weights[start:stop] = (errors / (errors.norm(dim=1, keepdim=True) + 1e-8)).mean(dim=1)
    return weights


class DAS(TRAK):
    """Diffusion Attribution Score (Lin et al. 2025); see the module docstring."""

    Config: ClassVar[type] = DASConfig
    invariant_config_fields: ClassVar[dict[str, tuple[Any, Any]]] = {"batch_size": (1, 7)}

    def _engine_options(self) -> dict[str, Any]:
        """TRAK's gradient options plus the per-draw normalisation."""
        return {**super()._engine_options(), "normalize_draws": self.config.normalize_draws}

    def score(self, ctx: MethodContext) -> np.ndarray:
        """``# [n_queries, n_train]`` float64 DAS scores (module docstring)."""
        scores = super().score(ctx)  # [n_queries, n_train]
        if not self.config.error_weighting:
            return scores
        weights = training_error_weights(  # on the model's own device (forward passes only)
            ctx.model, ctx, ctx.sample_counts(self.config).grad, self.config.batch_size
        )
        return scores * weights.numpy()[None, :]
