"""Journey-TRAK (Georgiev et al. 2023): TRAK at each step of the query's sampling trajectory.

"The Journey, Not the Destination: How Data Guides Diffusion Models" attributes a generated
image *step by step*: at sampling step t, which training examples steer the distribution of
final samples given the current state x_t. Their code (github.com/MadryLab/journey-TRAK,
``diffusion_trak/modelout_functions.py``, ``gradient_computers.py``, ``examples/``):

- **Query output at step t** (``_get_output_scoring``): ``x0_hat = x_0_hats[t]``, the sampler's
  prediction of x_0 at step t (diffusers' ``DDPMScheduler.step(...).pred_original_sample``,
  clipped to [-1, 1] by that scheduler's default ``clip_sample=True``), is re-noised with *fresh*
  noise at the same timestep, ``x = add_noise(x0_hat, eps, t)``, and the output is the denoising
  loss ``mse(eps_theta(x, t), eps)``; its gradient is summed over ``num_resamplings = 20`` noise
  draws (``_compute_per_sample_grad_scoring``; the demo notebook ``demo_CIFAR10.ipynb``).
- **Training output** (``_get_output_featurizing``, ``featurize_cifar10_parallel.py``): the
  diffusion loss of the training image, summed over ``num_timesteps = 20`` timesteps drawn
  uniformly from [0, 1000) with one fresh noise each (5 in ``featurize_cifar10.py``). These
  features do **not** depend on the step: one featurisation, one projector (``proj_dim`` 2048),
  scored against the queries' features at every step.
- **Steps and aggregation.** Scores are computed for one timestep at a time (the demo: t = 100
  and t = 300 of 1000, kept in a dict ``{t: scores}``); neither the code nor the paper combines
  steps into one score: the paper reports attributions per step.
- **Models.** traker's multi-checkpoint average (their sbatch script featurises 50 checkpoints,
  ``--array=0-49``); the x0-predictions come from one model.

**Here.** For each of ``n_steps`` code timesteps ``t`` evenly spaced over ``[0, T - 1]``
(:meth:`JourneyTRAK.timesteps`, in sampling order: largest t first), the query's prediction of
x_0 from its own stored trajectory state ``x = ctx.query_trajectories[:, T - 1 - t]`` (the state
the sampler denoised at code timestep t; :mod:`diffusion.sampling`)::

    x0_hat_t = clip((x - sqrt(1 - abar_t) eps_theta(x, t)) / sqrt(abar_t), -1, 1)

under the scored model, not differentiated (their ``x_0_hats`` are stored data), and its
gradient of ``timestep-loss:<t>`` (:mod:`diffusion.measurements`: the loss at timestep t with
fresh noise; ``query_samples`` draws, default their 20, from the stream
``journey-trak-query:<t>``) is scored against TRAK's training features
(:class:`methods.trak.TRAK`: the same featurisation code, projector, damping and cache)::

    per_step[s, q, j] = phi_q(t_s)^T (Phi^T Phi + N lambda I_k)^{-1} phi_j          # TRAK

and the score is their mean over steps (``aggregate="mean"``; ``"sum"`` differs by the factor
n_steps only). With ``train_features="per-step"`` the training features are those of the loss at
the step's own timestep (``timestep-loss:<t>``, ``grad_samples`` fresh noises each; one
featurisation per step), ``per_step[s] = phi_q(t_s)^T (Phi(t_s)^T Phi(t_s) + N lambda I)^{-1}
phi_j(t_s)``: the variant the issue describes; not what their code does.

**Sign.** As TRAK's: the output is a loss (larger = the step's prediction is less likely), so a
positive score predicts that removing j increases it: the harness's contract as is, no flip.
``ctx.measurement`` is not used (the output function is the method's, as for D-TRAK).

**Per-step attributions** are kept: :meth:`JourneyTRAK.per_step_scores` returns them
``# [n_steps, n_queries, n_train]``, and ``per_step_output`` (a path) saves them as ``.npy`` when
:meth:`JourneyTRAK.score` runs (the timesteps alongside, ``<stem>.timesteps.npy``).

**Deviations, by design of the harness.** The training side uses the setting's ``grad_samples``
(``ctx.grad_samples``; theirs: 20 random timesteps, one noise each) and a mean over draws (their
sum: a uniform factor); the training features are TRAK's own cache entry, shared with ``trak``
whenever the two configs agree. One model (the base model), not a 50-checkpoint ensemble. The
query noise is drawn per query and step from its own seed stream (theirs: global RNG). Steps
default to 10 (cheap on the CPU presets: the training side is featurised once; each step costs
``n_queries * query_samples`` gradients); the paper shows single steps of T = 1000.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from diffusion.schedule import NoiseSchedule
from methods.trak import _MODEL_ID, TRAK, TRAKConfig

if TYPE_CHECKING:
    from methods.context import MethodContext

__all__ = ["AGGREGATES", "TRAIN_FEATURES", "JourneyTRAK", "JourneyTRAKConfig", "predicted_x0"]

AGGREGATES: tuple[str, ...] = ("mean", "sum")
"""How per-step scores combine into one score per (query, training example)."""
TRAIN_FEATURES: tuple[str, ...] = ("shared", "per-step")
"""``shared``: TRAK's training features, one featurisation (their code). ``per-step``: the loss
at each step's timestep, one featurisation per step."""


def query_stream(timestep: int) -> str:
    """Seed stream of the query noise at code timestep ``timestep``."""
    return f"journey-trak-query:{int(timestep)}"


@dataclass(frozen=True)
class JourneyTRAKConfig(TRAKConfig):
    """Options of Journey-TRAK: TRAK's (:class:`~methods.trak.TRAKConfig`) and four more.

    Attributes:
        proj_dim: projection size k (their ``featurize_cifar10.py`` default: 2048).
        query_samples: fresh noise draws per query and step (their ``num_resamplings``: 20);
            None uses ``ctx.query_samples``.
        n_steps: number of sampling steps attributed, code timesteps evenly spaced over
            ``[0, T - 1]`` (rounded, duplicates dropped). Default 10; their demo scores t = 100
            and t = 300 of T = 1000.
        aggregate: ``"mean"`` or ``"sum"`` of the per-step scores (the paper keeps steps apart;
            a benchmark score needs one number per pair: the mean keeps a per-step scale).
        train_features: ``"shared"`` (their code: TRAK's training features, step-independent)
            or ``"per-step"`` (the loss at each step's timestep).
        clip_x0: clip the predicted x_0 to [-1, 1] (diffusers' ``DDPMScheduler`` default, which
            their trajectories went through).
        per_step_output: a ``.npy`` path where :meth:`JourneyTRAK.score` saves the per-step
            scores ``# [n_steps, n_queries, n_train]`` float64, or None.
    """

    proj_dim: int = 2048
    query_samples: int | None = 20
    n_steps: int = 10
    aggregate: str = "mean"
    train_features: str = "shared"
    clip_x0: bool = True
    per_step_output: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.output_function != "loss":
            raise ValueError(
                "Journey-TRAK differentiates the denoising loss: output_function must be 'loss', "
                f"got {self.output_function!r}"
            )
        if not isinstance(self.n_steps, int) or isinstance(self.n_steps, bool) or self.n_steps < 1:
            raise ValueError(f"n_steps must be an int >= 1, got {self.n_steps!r}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        if self.train_features not in TRAIN_FEATURES:
            raise ValueError(
                f"train_features must be one of {TRAIN_FEATURES}, got {self.train_features!r}"
            )
        if not isinstance(self.clip_x0, bool):
            raise ValueError(f"clip_x0 must be a bool, got {self.clip_x0!r}")
        if self.per_step_output is not None and not isinstance(self.per_step_output, str):
            raise ValueError(
                f"per_step_output must be a path string or None, got {self.per_step_output!r}"
            )


def predicted_x0(
    model: nn.Module,
    schedule: NoiseSchedule,
    trajectories: torch.Tensor,
    timestep: int,
    *,
    clip: bool = True,
    batch_size: int = 64,
) -> torch.Tensor:
    """The sampler's prediction of x_0 at code timestep ``timestep``, from stored trajectories.

    ``x = trajectories[:, T - 1 - timestep]`` is the state the sampler denoised at that timestep
    (:func:`diffusion.sampling.sample`), and ``x0_hat = (x - sqrt(1 - abar_t) eps_theta(x, t)) /
    sqrt(abar_t)``, clipped to [-1, 1] with ``clip``. No gradient; on the model's device.

    Args:
        model: the eps-model ``model(x_t [B, C, H, W], t [B]) -> [B, C, H, W]``, in eval mode.
        schedule: its noise schedule (T steps).
        trajectories: ``# [n, T + 1, C, H, W]``, ``trajectories[:, 0] = x_T``.
        timestep: 0-indexed code timestep, ``0 <= timestep < T``.
        clip: clip the prediction to [-1, 1].
        batch_size: states per forward pass.

    Returns:
        ``# [n, C, H, W]`` on the CPU, in the model's dtype.
    """
    num_t = schedule.num_timesteps
    if not 0 <= timestep < num_t:
        raise ValueError(f"timestep must lie in [0, {num_t}), got {timestep}")
    param = next(iter(model.parameters()))
    states = trajectories[:, num_t - 1 - timestep]  # [n, C, H, W]
    abar = float(schedule.alpha_bars[timestep])
    out = []
    with torch.no_grad():
        for start in range(0, states.shape[0], batch_size):
            x = states[start : start + batch_size].to(param.device, param.dtype)
            t = torch.full((x.shape[0],), timestep, dtype=torch.long, device=param.device)
            x0 = (x - (1.0 - abar) ** 0.5 * model(x, t)) / abar**0.5
            out.append((x0.clamp(-1.0, 1.0) if clip else x0).cpu())
    return torch.cat(out)


class JourneyTRAK(TRAK):
    """Journey-TRAK (Georgiev et al. 2023): TRAK per sampling step; see the module docstring.

    Needs ``ctx.query_trajectories`` (the LDS runner stores them for it:
    :attr:`needs_query_trajectories`).
    """

    Config: ClassVar[type] = JourneyTRAKConfig
    needs_query_trajectories: ClassVar[bool] = True
    invariant_config_fields: ClassVar[dict[str, tuple[Any, Any]]] = {"batch_size": (1, 7)}
    features_independent_fields: ClassVar[tuple[str, ...]] = (
        *TRAK.features_independent_fields,
        "n_steps",
        "aggregate",
        "train_features",
        "clip_x0",
        "per_step_output",
    )

    def timesteps(self, num_timesteps: int) -> list[int]:
        """The code timesteps attributed, in sampling order (largest first).

        Args:
            num_timesteps: T of the noise schedule.

        Returns:
            ``min(n_steps, T)`` distinct timesteps evenly spaced over ``[0, T - 1]``, descending.
        """
        grid = np.linspace(0, num_timesteps - 1, self.config.n_steps).round().astype(int)
        return sorted({int(t) for t in grid}, reverse=True)

    def _features_spec(self, ctx, state, proj_dim, device, model_id=_MODEL_ID, **kwargs):
        """TRAK's key, under TRAK's name: the features are TRAK's when the configs agree."""
        spec = super()._features_spec(ctx, state, proj_dim, device, model_id, **kwargs)
        spec["method"] = TRAK.__name__.lower()
        return spec

    def _check_trajectories(self, ctx: MethodContext) -> torch.Tensor:
        """``ctx.query_trajectories``, checked; ValueError naming the fix when absent or wrong."""
        trajectories = ctx.query_trajectories
        if trajectories is None:
            raise ValueError(
                "journey-trak attributes each step of the queries' sampling trajectories, but "
                "ctx.query_trajectories is None: run it through benchmarks.lds (which stores the "
                "queries with their trajectories for it) or pass the trajectories "
                "[n_queries, T + 1, C, H, W] (diffusion.sampling.sample(..., "
                "return_trajectory=True).trajectory)"
            )
        expected = (ctx.n_queries, ctx.schedule.num_timesteps + 1, *ctx.query_images.shape[1:])
        if tuple(trajectories.shape) != expected:
            raise ValueError(
                f"ctx.query_trajectories must be [n_queries, T + 1, C, H, W] = {expected}, got "
                f"{tuple(trajectories.shape)}"
            )
        return trajectories

    def per_step_scores(self, ctx: MethodContext) -> np.ndarray:
        """``# [n_steps, n_queries, n_train]`` float64 TRAK scores of each step.

        Step ``s`` is code timestep ``self.timesteps(T)[s]`` (module docstring).

        Args:
            ctx: the method context, with ``query_trajectories``.

        Returns:
            The per-step scores, finite.
        """
        self._require_available()
        trajectories = self._check_trajectories(ctx)
        steps = self.timesteps(ctx.schedule.num_timesteps)
        model = ctx.model
        shared = self.config.train_features == "shared"
        groups = [steps] if shared else [[t] for t in steps]
        out = []
        bar = tqdm(total=len(steps), desc="Journey-TRAK steps", disable=not ctx.progress)
        for group in groups:
            train_function = "loss" if shared else f"timestep-loss:{group[0]}"
            with self._featurized(ctx, model, _MODEL_ID, train_function) as session:
                for t in group:
                    x0_hat = predicted_x0(
                        model,
                        ctx.schedule,
                        trajectories,
                        t,
                        clip=self.config.clip_x0,
                        batch_size=self.config.batch_size,
                    )
                    scores = self._session_scores(
                        session, ctx, f"timestep-loss:{t}", images=x0_hat, stream=query_stream(t)
                    )
                    out.append(scores)
                    bar.update()
        bar.close()
        return np.stack(out)  # [n_steps, n_queries, n_train]

    def score(self, ctx: MethodContext) -> np.ndarray:
        """``# [n_queries, n_train]`` float64: the per-step scores aggregated over steps.

        Saves the per-step scores to ``per_step_output`` when set.
        """
        per_step = self.per_step_scores(ctx)  # [n_steps, n_queries, n_train]
        path = self.config.per_step_output
        if path is not None:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            np.save(target, per_step)
            steps = np.asarray(self.timesteps(ctx.schedule.num_timesteps), dtype=np.int64)
            np.save(target.with_name(target.stem + ".timesteps.npy"), steps)
        if self.config.aggregate == "sum":
            return per_step.sum(axis=0)
        return per_step.mean(axis=0)
