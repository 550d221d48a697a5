"""Attribution by unlearning the query (Wang et al., NeurIPS 2024).

"Data Attribution for Text-to-Image Models by Unlearning Synthesized Images"; their code:
github.com/PeterWang512/AttributeByUnlearning (commit 191b6bf), cited by file and line below.

Per query ``q``, on a copy of the base model:

1. **Unlearn the query.** ``steps`` updates of Fisher-preconditioned *ascent* on the query's
   measurement: ``theta <- theta + lr * grad m(theta, x_q) / (ewc_weight * F)`` with ``F`` the
   diagonal empirical Fisher of the training loss at the base model. This is their update
   (``mscoco/compute_influence.py`` L108-111, the same in ``custom_diffusion/
   compute_influence.py`` L183-186: ``p += unlearn_lr * p.grad / (fisher_info[n] *
   len_dataset)``): the Newton step of ``-m(theta, x_q) + (ewc_weight / 2) sum_i F_i (theta_i -
   theta0_i)^2``, the EWC regulariser that stands in for "keep the training loss" (their
   ``len_dataset`` = N is the EWC weight, since the summed training loss is about
   ``(N / 2) (theta - theta0)^T F (theta - theta0)``). As in their code each step takes a fresh
   gradient at the current parameters and no explicit gradient of the penalty.
2. **Measure the forgetting.** Every training example's diffusion loss before and after, on the
   *same* noise (common random numbers, their ``collect_loss`` with a fixed seed per batch,
   ``mscoco/compute_training_loss.py`` L12-66): the ``loss_timesteps`` evenly spaced timesteps
   ``t_s = floor(s T / S)`` (their ``torch.arange(0, T, T // S)``), one noise draw per (example,
   timestep), from :func:`methods.gradients.draw_examples` (stream :data:`LOSS_STREAM`).
   ``scores[q, j] = loss_after(x_j) - loss_before(x_j)``; with ``ctx.hflip`` both orientations
   are measured and the larger change is kept (their ``np.maximum(influence[:N],
   influence[N:])`` over the no-flip and flip copies, L129).

**Sign.** Their influence is ``loss_after - loss_before``, ranked descending (``np.argsort(
-influence)``): an example whose loss rises most when the query is forgotten is the most
influential. That is the harness's score contract as is, no flip: to first order the step is
``delta = (lr / N) F^-1 grad m_q`` and ``loss_after - loss_before = (lr / N) grad l_j^T F^-1
grad m_q``, ``lr`` times the influence-function prediction of how much ``m_q`` increases when
``j`` is removed (removal moves the optimum by ``+(1/N) H^-1 grad l_j``, :mod:`methods.kfac`),
with the diagonal Fisher for ``H``. The step *ascends* ``ctx.measurement`` whatever it is, so
the sign holds for a likelihood-type measurement (``trajectory-logprob``) too, where ascending
is "relearning" rather than unlearning.

**Fisher.** ``F_i = mean over training examples and draws of (d l(theta, x_j; t, eps) /
d theta_i)^2``, each draw's gradient squared on its own (their ``compute_fisher.py``: per-example
``vmap(grad)`` of the loss at one random timestep and noise, squared, averaged; 5 epochs, i.e.
``fit_samples = 5`` draws per example), random flips with ``ctx.hflip`` (their flipped copies).
Computed once per run by the one gradient engine (:mod:`methods.gradients`) and stored in
``ctx.cache`` under the training side only (``ctx.train_spec``, never the queries).

**Their hyper-parameters** (MSCOCO, ``mscoco/compute_influence.py`` argparse defaults, the
setting closest to an unconditional model trained from scratch; custom diffusion uses
``lr=0.1, steps=100``): ``--unlearn_lr 0.01`` (:attr:`UnlearnConfig.lr`), ``--unlearn_steps 1``
(``steps``), EWC weight ``len_dataset`` = N (``ewc_weight=None``), ``--loss_time_samples 20``
(``loss_timesteps``), Fisher over 5 epochs (``fit_samples``), no damping of the Fisher.

**Deviations** (their repository has no unconditional DDPM / CIFAR variant; the code base is
MSCOCO and custom diffusion, both text-to-image):

- *Parameters updated.* Theirs default to ``--weight_selection cross-attn-kv`` (the key and
  value projections of the text cross-attention, ``attn2.to_k/to_v``), which an unconditional
  model does not have; here every parameter (their ``"all"`` option) unless ``param_patterns``
  names a subset (their ``get_param_pattern_list``, as plain substrings, any of which matches).
- *Query gradient budget.* Theirs averages 80 x 625 = 50,000 draws (timesteps without
  replacement within each batch of 80, fresh noise) per step; here ``query_samples`` draws
  (default: the setting's ``ctx.query_samples``, the budget every method gets), i.i.d.
  timesteps, from the seeded stream ``"unlearn-query-<step>"``.
- *Captions.* No text conditioning, so no average over the 5 captions per image.
- *Fisher damping.* Theirs has none: the cross-attention key/value weights they update have no
  direction the loss ignores. Every parameter of a U-Net does: attention key biases (softmax
  is shift-invariant) and biases right before a GroupNorm have gradients that vanish up to
  rounding, so their Fisher entries are rounding noise (1e-38 on the tiny diffusers model of
  the tests) and the undamped step there is ~1e16, which turns the scores into rounding noise
  (measured: scores moved by 2 % between chunk sizes 5 and 11). Here ``fisher_damping`` times
  the mean Fisher entry is added to ``F`` (default 1e-8: it bounds those steps and moves the
  smallest other entries, about 5e-6 of the mean there, by 0.2 %). With ``fisher_damping=0``
  (theirs) a zero entry under a non-zero query gradient is refused with a message naming the
  fix.
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from diffusion.measurements import parse_measurement, per_draw
from diffusion.schedule import NoiseSchedule
from methods.base import AttributionMethod
from methods.fingerprint import tensor_fingerprint
from methods.gradients import (
    GRADIENT_BACKENDS,
    ParameterList,
    draw_examples,
    per_example_gradients,
)

if TYPE_CHECKING:
    from methods.context import MethodContext

__all__ = [
    "CACHE_KIND",
    "FISHER_STREAM",
    "LOSS_STREAM",
    "QUERY_STREAM",
    "Unlearn",
    "UnlearnConfig",
    "fisher_diagonal",
    "loss_timestep_grid",
    "select_parameters",
    "training_losses",
]

CACHE_KIND = "unlearn-fisher"
FISHER_STREAM = "unlearn-fisher"
"""Draw stream of the Fisher's per-draw training gradients."""
LOSS_STREAM = "unlearn-loss"
"""Draw stream of the noise of the before/after training losses (common random numbers)."""
QUERY_STREAM = "unlearn-query"
"""Prefix of the query-gradient streams: step ``k`` draws from ``f"{QUERY_STREAM}-{k}"``."""
_CACHE_VERSION = 1


def _check_positive_int(name: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        expected = "a positive int or None" if optional else "a positive int"
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _check_float(name: str, value: Any, *, allow_zero: bool) -> None:
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not valid or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite float {bound}, got {value!r}")


@dataclass(frozen=True)
class UnlearnConfig:
    """Options of attribution by unlearning (defaults: Wang et al.'s MSCOCO settings).

    Attributes:
        steps: Fisher-preconditioned ascent steps on the query (their ``--unlearn_steps``,
            default 1).
        lr: step size (their ``--unlearn_lr``, default 0.01).
        ewc_weight: weight ``w`` of the EWC penalty ``(w / 2) sum_i F_i (theta_i - theta0_i)^2``;
            the step divides by ``w * F``. None = ``ctx.n_train`` (theirs: ``len_dataset``).
        fisher_damping: added to every Fisher entry before dividing, relative to the mean
            entry: ``F + fisher_damping * mean(F)`` (theirs: none; see the module docstring).
        fit_samples: draws per training example for the diagonal Fisher (theirs: 5 epochs of
            one draw each); None = ``ctx.fit_samples``.
        query_samples: draws per ascent step for the query's measurement gradient; None =
            ``ctx.query_samples`` (theirs: 50,000, see the module docstring).
        loss_timesteps: evenly spaced timesteps at which each training loss is evaluated, one
            noise draw each, the same before and after (their ``--loss_time_samples``, 20).
        param_patterns: parameters updated: those whose qualified name contains any of these
            substrings; empty = every parameter (their ``"all"``; their default
            ``cross-attn-kv`` needs text cross-attention).
        batch_size: training examples per gradient / loss chunk. Bounds memory; scores do not
            depend on it.
        backend: per-example gradient backend (:func:`methods.gradients.per_example_gradients`);
            scores do not depend on it beyond rounding.
    """

    steps: int = 1
    lr: float = 0.01
    ewc_weight: float | None = None
    fisher_damping: float = 1e-8
    fit_samples: int | None = 5
    query_samples: int | None = None
    loss_timesteps: int = 20
    param_patterns: tuple[str, ...] = ()
    batch_size: int = 16
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("steps", "loss_timesteps", "batch_size"):
            _check_positive_int(name, getattr(self, name))
        for name in ("fit_samples", "query_samples"):
            _check_positive_int(name, getattr(self, name), optional=True)
        _check_float("lr", self.lr, allow_zero=False)
        if self.ewc_weight is not None:
            _check_float("ewc_weight", self.ewc_weight, allow_zero=False)
        _check_float("fisher_damping", self.fisher_damping, allow_zero=True)
        if isinstance(self.param_patterns, str) or not all(
            isinstance(p, str) and p for p in self.param_patterns
        ):
            raise ValueError(
                "param_patterns must be a tuple of non-empty substrings of parameter names, "
                f"e.g. ('attn',), got {self.param_patterns!r}"
            )
        if self.backend not in GRADIENT_BACKENDS:
            raise ValueError(f"backend must be one of {GRADIENT_BACKENDS}, got {self.backend!r}")


def select_parameters(model: nn.Module, patterns: tuple[str, ...] = ()) -> ParameterList:
    """The parameters unlearning updates, in ``named_parameters`` order.

    Args:
        model: the eps-model.
        patterns: substrings of qualified names, any of which selects a parameter; empty =
            every parameter.

    Returns:
        A :class:`~methods.gradients.ParameterList` of the selected parameters.
    """
    named = [
        (name, p)
        for name, p in model.named_parameters()
        if not patterns or any(pattern in name for pattern in patterns)
    ]
    if not named:
        raise ValueError(
            f"param_patterns {patterns!r} select no parameter of the model; its parameters "
            f"include {[n for n, _ in model.named_parameters()][:5]}"
        )
    return ParameterList(
        names=tuple(n for n, _ in named),
        shapes=tuple(tuple(p.shape) for _, p in named),
        n_params=sum(p.numel() for _, p in named),
    )


def loss_timestep_grid(n_timesteps: int, num_timesteps: int) -> torch.Tensor:
    """``# [n_timesteps]`` int64 ``floor(s T / S)``: their ``arange(0, T, T // S)`` when S | T."""
    return torch.arange(n_timesteps, dtype=torch.long) * num_timesteps // n_timesteps


def fisher_diagonal(
    model: nn.Module,
    schedule: NoiseSchedule,
    images: torch.Tensor,
    layout: ParameterList,
    *,
    n_samples: int,
    seed: int,
    hflip: bool = False,
    batch_size: int = 16,
    backend: str = "auto",
    progress: bool = False,
) -> torch.Tensor:
    """Diagonal empirical Fisher of the training loss: mean of squared per-draw gradients.

    ``F = (1 / (N S)) sum_j sum_s (grad l(theta, x_j; t_js, eps_js))^2``, each draw's gradient
    squared on its own; draws from :func:`~methods.gradients.draw_examples` (stream
    :data:`FISHER_STREAM`), so ``F`` does not depend on ``batch_size``.

    Args:
        model: the eps-model.
        schedule: its noise schedule.
        images: ``# [N, C, H, W]`` the training set.
        layout: the parameters (:func:`select_parameters`).
        n_samples: draws per example (S).
        seed: the run's seed.
        hflip: flip each draw's image with probability 1/2 (training's augmentation).
        batch_size: examples per gradient chunk.
        backend: the per-example gradient backend.
        progress: show a progress bar.

    Returns:
        ``# [n_params]`` float64 on CPU, in ``layout`` order.
    """
    n = int(images.shape[0])
    total = torch.zeros(layout.n_params, dtype=torch.float64)
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc="unlearn Fisher", disable=not progress):
        stop = min(start + batch_size, n)
        draws = draw_examples(
            range(start, stop),
            n_samples,
            images.shape[1:],
            schedule.num_timesteps,
            seed=seed,
            stream=FISHER_STREAM,
            hflip=hflip,
        )
        for s in range(n_samples):
            grads = per_example_gradients(
                model,
                schedule,
                images[start:stop],
                draws.samples(s, s + 1),
                measurement="loss",
                layout=layout,
                backend=backend,
            )  # [b, P]
            total += grads.to("cpu", torch.float64).square().sum(dim=0)
    return total / (n * n_samples)


def training_losses(
    model: nn.Module,
    schedule: NoiseSchedule,
    images: torch.Tensor,
    *,
    n_timesteps: int,
    seed: int,
    hflip: bool = False,
    batch_size: int = 16,
) -> torch.Tensor:
    """Each example's diffusion loss on fixed noise at evenly spaced timesteps.

    Example ``j`` at timestep ``t_s`` (:func:`loss_timestep_grid`) gets the noise of draw ``s``
    of :func:`~methods.gradients.draw_examples` ``(seed, LOSS_STREAM, j)``, so two models are
    compared on the same noise (common random numbers), whatever ``batch_size``.

    Args:
        model: the eps-model.
        schedule: its noise schedule.
        images: ``# [N, C, H, W]``.
        n_timesteps: number of timesteps S.
        seed: the run's seed.
        hflip: also measure every image flipped left-right (same noise).
        batch_size: examples per forward chunk.

    Returns:
        ``# [N, V]`` float64 on CPU, the mean over the S timesteps; ``V`` = 2 (original,
        flipped) with ``hflip``, else 1.
    """
    first = next(iter(model.parameters()))
    grid = loss_timestep_grid(n_timesteps, schedule.num_timesteps)
    n = int(images.shape[0])
    out = torch.empty(n, 2 if hflip else 1, dtype=torch.float64)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        eps = draw_examples(
            range(start, stop),
            n_timesteps,
            images.shape[1:],
            schedule.num_timesteps,
            seed=seed,
            stream=LOSS_STREAM,
        ).eps.to(device=first.device, dtype=first.dtype)  # [b, S, C, H, W]
        t = grid.to(first.device).expand(stop - start, n_timesteps)  # [b, S]
        x0 = images[start:stop].to(device=first.device, dtype=first.dtype)
        views = (x0, x0.flip(-1)) if hflip else (x0,)
        with torch.no_grad():
            for v, x in enumerate(views):
                values = per_draw("loss", model, schedule, x, t, eps)  # [b, S]
                out[start:stop, v] = values.mean(dim=1).to("cpu", torch.float64)
    return out


def _add_flat(model: nn.Module, layout: ParameterList, delta: torch.Tensor) -> None:
    """``param += delta[slice]`` for every parameter of ``layout`` (flat ``# [n_params]``)."""
    params = dict(model.named_parameters())
    offset = 0
    with torch.no_grad():
        for name, shape in zip(layout.names, layout.shapes, strict=True):
            param = params[name]
            size = param.numel()
            part = delta[offset : offset + size].reshape(shape)
            param.add_(part.to(device=param.device, dtype=param.dtype))
            offset += size


class Unlearn(AttributionMethod):
    """Attribution by unlearning the query (Wang et al. 2024): training-loss increase."""

    Config = UnlearnConfig
    display_name: ClassVar[str] = "Unlearning (Wang et al.)"
    invariant_config_fields: ClassVar[dict[str, tuple[Any, Any]]] = {"batch_size": (5, 11)}
    knows_self_influence: ClassVar[bool] = True
    deterministic: ClassVar[bool] = True

    config: UnlearnConfig

    def score(self, ctx: MethodContext) -> np.ndarray:
        """Each training example's loss increase when each query is unlearned.

        Returns:
            ``# [n_queries, n_train]`` float64 scores (score contract: positive = removing the
            example increases the query's measurement).
        """
        cfg = self.config
        base, _ = parse_measurement(ctx.measurement, ctx.schedule.num_timesteps)
        if base == "trajectory-logprob" and ctx.query_trajectories is None:
            raise ValueError(
                "measurement 'trajectory-logprob' needs ctx.query_trajectories (the sampling "
                "chains of the queries); the runner provides them for that measurement"
            )
        model = copy.deepcopy(ctx.model).to(torch.device(ctx.device)).eval()
        layout = select_parameters(model, cfg.param_patterns)
        fisher = self._fisher(ctx, model, layout)  # [P]
        precision = fisher + cfg.fisher_damping * fisher.mean()
        weight = float(ctx.n_train if cfg.ewc_weight is None else cfg.ewc_weight)
        before = self._losses(ctx, model)  # [N, V]
        scores = np.empty((ctx.n_queries, ctx.n_train), dtype=np.float64)
        queries = range(ctx.n_queries)
        for q in tqdm(queries, desc="unlearn queries", disable=not ctx.progress):
            unlearned = self._unlearn(ctx, model, layout, precision * weight, q)
            change = self._losses(ctx, unlearned) - before  # [N, V]
            scores[q] = change.max(dim=1).values.numpy()
        return scores

    # ------------------------------------------------------------------ steps

    def _losses(self, ctx: MethodContext, model: nn.Module) -> torch.Tensor:
        """``# [N, V]`` training losses of ``model`` on the run's fixed noise."""
        return training_losses(
            model,
            ctx.schedule,
            ctx.train_images,
            n_timesteps=self.config.loss_timesteps,
            seed=ctx.seed,
            hflip=ctx.hflip,
            batch_size=self.config.batch_size,
        )

    def _unlearn(
        self,
        ctx: MethodContext,
        model: nn.Module,
        layout: ParameterList,
        metric: torch.Tensor,
        q: int,
    ) -> nn.Module:
        """A copy of ``model`` after ``steps`` ascent steps ``lr * grad m_q / metric``.

        Args:
            ctx: the method context (query, measurement, seed, sample counts).
            model: the base model (not modified).
            layout: the updated parameters.
            metric: ``# [n_params]`` float64 ``ewc_weight * (F + fisher_damping * mean(F))``.
            q: the query's index.

        Returns:
            The unlearned copy.
        """
        cfg = self.config
        unlearned = copy.deepcopy(model)
        image = ctx.query_images[q : q + 1]
        base, _ = parse_measurement(ctx.measurement)
        trajectory = None
        if base == "trajectory-logprob" and ctx.query_trajectories is not None:
            trajectory = ctx.query_trajectories[q : q + 1]
        for step in range(cfg.steps):
            draws = draw_examples(
                [q],
                ctx.sample_counts(cfg).query,
                image.shape[1:],
                ctx.schedule.num_timesteps,
                seed=ctx.seed,
                stream=f"{QUERY_STREAM}-{step}",
            )
            grad = per_example_gradients(
                unlearned,
                ctx.schedule,
                image,
                draws,
                measurement=ctx.measurement,
                layout=layout,
                trajectories=trajectory,
                backend=cfg.backend,
            )[0].to("cpu", torch.float64)  # [P]
            if bool(((metric == 0) & (grad != 0)).any()):
                raise ValueError(
                    "the Fisher is zero for parameters the query's gradient moves (the training "
                    "loss never moves them): set fisher_damping > 0 or exclude them with "
                    "param_patterns"
                )
            delta = torch.where(metric > 0, grad / metric, torch.zeros_like(grad))
            _add_flat(unlearned, layout, cfg.lr * delta)
        return unlearned

    def _fisher_spec(self, ctx: MethodContext, model: nn.Module, layout: ParameterList) -> dict:
        """The Fisher's cache key: training side only (never the queries, lr or steps)."""
        params = [p for _, p in sorted(model.named_parameters())]
        names = hashlib.sha256("\n".join(layout.names).encode()).hexdigest()
        return {
            "version": _CACHE_VERSION,
            "train": dict(ctx.train_spec),
            "model_sha256": tensor_fingerprint(params, named=False),
            "train_sha256": tensor_fingerprint(ctx.train_images, named=False),
            "schedule": asdict(ctx.schedule),
            "params_sha256": names,
            "fit_samples": ctx.sample_counts(self.config).fit,
            "seed": ctx.seed,
            "hflip": ctx.hflip,
            "dtype": str(params[0].dtype),
        }

    def _fisher(self, ctx: MethodContext, model: nn.Module, layout: ParameterList) -> torch.Tensor:
        """``# [n_params]`` float64 CPU diagonal Fisher, from ``ctx.cache`` when stored."""
        cfg = self.config

        def compute() -> dict[str, torch.Tensor]:
            fisher = fisher_diagonal(
                model,
                ctx.schedule,
                ctx.train_images,
                layout,
                n_samples=ctx.sample_counts(cfg).fit,
                seed=ctx.seed,
                hflip=ctx.hflip,
                batch_size=cfg.batch_size,
                backend=cfg.backend,
                progress=ctx.progress,
            )
            return {"fisher": fisher}

        if ctx.cache is None:
            return compute()["fisher"]
        spec = self._fisher_spec(ctx, model, layout)
        stored = ctx.cache.get_or_compute(CACHE_KIND, spec, compute, fmt="tensors")
        return stored["fisher"].to("cpu", torch.float64)
