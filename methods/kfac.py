"""K-FAC influence functions for diffusion models (the paper's method, Sec. 3) and variants.

``score[q, j] = grad m(x_q)^T (H + lambda I)^-1 grad l(x_j) / N``: the first-order change of
measurement ``m`` on query ``q`` when training example ``j`` is removed (removal = up-weighting
``j`` by ``-1/N`` in ``L_D = (1/N) sum_n l(theta, x_n)``, which moves the optimum by
``+(1/N) H^-1 grad l(x_j)``). Positive = removing ``j`` increases the measurement, the harness's
score contract. ``H`` is a K-FAC/EK-FAC approximation of GGN^model (MC-Fisher, default) or
GGN^loss (empirical Fisher) fitted with curvlinops (:mod:`methods.kfac_curvature`), damped
exactly in the Kronecker eigenbasis.

Scoring follows Sec. 3.2: the (few) query measurement gradients are preconditioned once and
optionally quantised (int8 per query, App. C); then each training gradient is computed once, in
chunks of ``batch_size`` examples (:mod:`methods.gradients`), and scored against all queries
with one matrix product.

Registry variants (``methods.registry``): ``kfac``, ``kfac-reduce``, ``kfac-empirical``,
``kfac-empirical-reduce``, ``kfac-mloss`` (the loss as measurement: the paper's "m. loss"),
``ekfac``, ``grad-dot`` (identity curvature).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from diffusion.measurements import parse_measurement
from methods.base import AttributionMethod
from methods.fingerprint import tensor_fingerprint
from methods.gradients import GRADIENT_BACKENDS, ParameterLayout, iter_gradient_chunks
from methods.kfac_curvature import (
    HESSIANS,
    KFAC_APPROXES,
    DenseCurvature,
    EigenCurvature,
    fit_dense,
    fit_kfac,
)

if TYPE_CHECKING:
    from methods.context import MethodContext

__all__ = [
    "CACHE_KIND",
    "CURVATURES",
    "QUANTIZATIONS",
    "QUERY_STREAM",
    "TRAIN_STREAM",
    "KFACInfluence",
    "quantize_rows",
]

CURVATURES: tuple[str, ...] = ("kfac", "ekfac", "identity", "dense")
QUANTIZATIONS: tuple[str | None, ...] = (None, "int8", "int16")
_QMAX = {"int8": 127, "int16": 32767}
_QDTYPE = {"int8": torch.int8, "int16": torch.int16}
CACHE_KIND = "kfac-curvature"
TRAIN_STREAM = "train"
"""Draw stream of the training-loss gradients (:func:`methods.gradients.example_generator`)."""
QUERY_STREAM = "query"
"""Draw stream of the query measurement gradients."""
_CACHE_VERSION = 3
"""Bumped when the fitted curvature changes numerically or its key's layout changes (2: grouped
float32 input-factor Grams; 3: keyed by ``ctx.train_spec``, no longer by the queries)."""


def _optional_positive_int(name: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def quantize_rows(
    matrix: torch.Tensor, kind: str, groups: Sequence[tuple[int, int]] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantisation with one scale per row and column group.

    Args:
        matrix: ``# [Q, P]`` floating.
        kind: ``"int8"`` or ``"int16"``.
        groups: ``G`` column ranges ``(start, stop)`` covering ``[0, P)`` that get their own
            scale (e.g. one per layer); None = one group, the whole row.

    Returns:
        ``(values # [Q, P] int8/int16, scales # [Q, G] float64)`` with
        ``matrix[:, a:b] ~= values[:, a:b] * scales[:, g, None]`` for group ``g = (a, b)``;
        ``scale = max |entries| / qmax`` (1 for an all-zero group).
    """
    if kind not in _QMAX:
        raise ValueError(f"kind must be one of {sorted(_QMAX)}, got {kind!r}")
    qmax = _QMAX[kind]
    m = matrix.to(torch.float64)
    groups = [(0, m.shape[1])] if groups is None else list(groups)
    values = torch.empty(m.shape, dtype=_QDTYPE[kind], device=m.device)
    scales = torch.empty(m.shape[0], len(groups), dtype=torch.float64, device=m.device)
    for g, (start, stop) in enumerate(groups):
        part = m[:, start:stop]
        scale = part.abs().amax(dim=1) / qmax  # [Q]
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        values[:, start:stop] = torch.round(part / scale[:, None]).clamp_(-qmax, qmax)
        scales[:, g] = scale
    return values, scales


class KFACInfluence(AttributionMethod):
    """K-FAC influence functions (Mlodozeniec et al. 2024), default: GGN^model, K-FAC expand."""

    @dataclass(frozen=True)
    class Config:
        """K-FAC influence options (defaults: the paper's method).

        Attributes:
            hessian: the Hessian approximation. ``"ggn-model"``: GGN^model estimated with the
                MC-Fisher (targets sampled from the model's output distribution; Eq. 10, the
                paper's choice). ``"ggn-loss"``: the empirical Fisher GGN^loss (Eq. 11).
                ``"ggn-model-exact"``: GGN^model with the exact output Hessian (one backward pass
                per output pixel; small images and tests).
            kfac_approx: K-FAC for weight-sharing layers (convolutions, attention projections):
                ``"expand"`` (the paper's choice) or ``"reduce"`` (Eschenhagen et al. 2023).
            curvature: ``"kfac"``, ``"ekfac"`` (eigenvalue-corrected K-FAC), ``"identity"``
                (no preconditioner: the gradient dot product ``grad m^T grad l / N``) or
                ``"dense"`` (the full GGN, tiny models only; for checking the Kronecker path).
            damping: lambda > 0 added to every eigenvalue of the curvature (exact damping of the
                Kronecker product), for the loss averaged over N (App. G.4). Unused by
                ``"identity"``.
            fit_samples: Monte Carlo (t, eps) draws per training example for fitting the curvature;
                None = ``ctx.fit_samples``.
            grad_samples: draws per training example for the training-loss gradients;
                None = ``ctx.grad_samples``.
            query_samples: draws per query for the measurement gradients;
                None = ``ctx.query_samples``.
            measurement: measurement whose change is predicted; None = ``ctx.measurement``.
                ``"loss"`` with an ELBO target gives the paper's "m. loss" variant.
            quantize: compression of the preconditioned query gradients (App. C): ``"int8"``
                (the paper's setting for all K-FAC results), ``"int16"`` or None (float).
                Symmetric, one scale per query.
            batch_size: examples per gradient chunk (and per curvature-fitting batch). Bounds memory
                (``batch_size * samples`` forward rows); scores do not depend on it.
            sample_chunk: draws per forward pass inside a chunk; None = all draws of the chunk at
                once. Bounds memory further; scores do not depend on it.
            backend: per-example gradient backend (:func:`methods.gradients.per_example_gradients`:
                ``"auto"``, ``"hooks"``, ``"vmap"``, ``"loop"``); scores do not depend on it
                beyond rounding.
        """

        hessian: str = "ggn-model"
        kfac_approx: str = "expand"
        curvature: str = "kfac"
        damping: float = 1e-8
        fit_samples: int | None = None
        grad_samples: int | None = None
        query_samples: int | None = None
        measurement: str | None = None
        quantize: str | None = "int8"
        batch_size: int = 16
        sample_chunk: int | None = None
        backend: str = "auto"

        def __post_init__(self) -> None:
            if self.hessian not in HESSIANS:
                raise ValueError(f"hessian must be one of {HESSIANS}, got {self.hessian!r}")
            if self.kfac_approx not in KFAC_APPROXES:
                raise ValueError(
                    f"kfac_approx must be one of {KFAC_APPROXES}, got {self.kfac_approx!r}"
                )
            if self.curvature not in CURVATURES:
                raise ValueError(f"curvature must be one of {CURVATURES}, got {self.curvature!r}")
            if (
                not isinstance(self.damping, (int, float))
                or isinstance(self.damping, bool)
                or not math.isfinite(self.damping)
                or self.damping <= 0
            ):
                raise ValueError(f"damping must be a finite float > 0, got {self.damping!r}")
            for name in ("fit_samples", "grad_samples", "query_samples", "sample_chunk"):
                _optional_positive_int(name, getattr(self, name))
            if self.measurement is not None:
                parse_measurement(self.measurement)  # raises ValueError listing valid names
            if self.backend not in GRADIENT_BACKENDS:
                raise ValueError(
                    f"backend must be one of {GRADIENT_BACKENDS}, got {self.backend!r}"
                )
            if self.quantize not in QUANTIZATIONS:
                raise ValueError(f"quantize must be one of {QUANTIZATIONS}, got {self.quantize!r}")
            if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool):
                raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
            if self.batch_size < 1:
                raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")

    invariant_config_fields: ClassVar[dict[str, tuple[Any, Any]]] = {"batch_size": (5, 11)}
    knows_self_influence: ClassVar[bool] = True
    deterministic: ClassVar[bool] = True

    config: Config

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config)
        # The plain gradient dot product (identity curvature) is dominated by the examples
        # with the largest gradients, not by the query's own example: it does not claim it.
        self.knows_self_influence = self.config.curvature != "identity"

    # ------------------------------------------------------------------ public

    def score(self, ctx: MethodContext) -> np.ndarray:
        """Predicted increase of the measurement on each query when each example is removed.

        Returns:
            ``# [n_queries, n_train]`` float64 scores.
        """
        cfg = self.config
        model = self._model_on_device(ctx)
        layout = ParameterLayout.from_model(model)
        measurement = cfg.measurement if cfg.measurement is not None else ctx.measurement
        base, _ = parse_measurement(measurement, ctx.schedule.num_timesteps)
        if base == "trajectory-logprob" and ctx.query_trajectories is None:
            raise ValueError(
                "measurement 'trajectory-logprob' needs ctx.query_trajectories (the sampling "
                "chains of the queries); the runner provides them for that measurement"
            )
        curvature = self._curvature(ctx, model, layout)
        dtype = next(iter(model.parameters())).dtype  # the gradients' dtype

        # Precondition (and compress) the query gradients once, a chunk at a time, so that
        # only the compressed [Q, P] matrix is ever held in full.
        values: torch.Tensor | None = None
        scales: torch.Tensor | None = None
        for start, stop, grads in iter_gradient_chunks(
            model,
            ctx.schedule,
            ctx.query_images,
            n_samples=ctx.sample_counts(cfg).query,
            seed=ctx.seed,
            stream=QUERY_STREAM,
            batch_size=cfg.batch_size,
            measurement=measurement,
            hflip=False,  # the measurement is on the query as it appeared (App. G.8)
            layout=layout,
            trajectories=ctx.query_trajectories if base == "trajectory-logprob" else None,
            sample_chunk=cfg.sample_chunk,
            backend=cfg.backend,
            progress=ctx.progress,
            desc="query gradients",
        ):
            if curvature is None:
                preconditioned = grads.to(torch.float64)
            else:
                preconditioned = curvature.precondition(grads, cfg.damping)  # [b, P]
            chunk_values, chunk_scales = self._compress(preconditioned, layout, dtype)
            if values is None:
                values = chunk_values.new_empty(ctx.n_queries, layout.n_params)
                if chunk_scales is not None:
                    scales = chunk_scales.new_empty(ctx.n_queries, chunk_scales.shape[1])
            values[start:stop] = chunk_values
            if scales is not None:
                scales[start:stop] = chunk_scales
        if values is None:  # pragma: no cover - MethodContext has >= 1 query
            raise ValueError("no queries to score")
        return self._score_training_set(ctx, model, layout, values, scales)

    def _compress(
        self, preconditioned: torch.Tensor, layout: ParameterLayout, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Quantise preconditioned query gradients per query and layer, or cast them to ``dtype``.

        Returns:
            ``(values # [b, P], scales # [b, n_layers] | None)``: int8/int16 with one scale per
            query and layer, or the gradients' float dtype without compression.
        """
        if self.config.quantize is None:
            return preconditioned.to(dtype), None
        groups = [(b.offset, b.offset + b.size) for b in layout.blocks]
        return quantize_rows(preconditioned, self.config.quantize, groups)

    # ------------------------------------------------------------------ steps

    def _model_on_device(self, ctx: MethodContext) -> nn.Module:
        """ctx.model on ctx.device (a copy if it has to move: the context is not mutated)."""
        device = torch.device(ctx.device)
        first = next(ctx.model.parameters())
        if first.device == device or (device.type == first.device.type and device.index is None):
            return ctx.model
        return copy.deepcopy(ctx.model).to(device)

    def _curvature_spec(self, ctx: MethodContext, model: nn.Module) -> dict[str, Any]:
        """The curvature's cache key: training side only (never the queries or the damping).

        The base model and training set (``ctx.train_spec`` and their tensor fingerprints), the
        schedule, hflip, seed, the fit sample count after the config's override and the
        curvature config.
        """
        cfg = self.config
        params = [p for _, p in sorted(model.named_parameters())]
        return {
            "version": _CACHE_VERSION,
            "train": dict(ctx.train_spec),
            "model_sha256": tensor_fingerprint(params, named=False),
            "train_sha256": tensor_fingerprint(ctx.train_images, named=False),
            "schedule": asdict(ctx.schedule),
            "curvature": cfg.curvature,
            "hessian": cfg.hessian,
            "kfac_approx": cfg.kfac_approx if cfg.curvature != "dense" else None,
            "fit_samples": ctx.sample_counts(cfg).fit,
            "seed": ctx.seed,
            "hflip": ctx.hflip,
            "dtype": str(params[0].dtype),
        }

    def _curvature(
        self, ctx: MethodContext, model: nn.Module, layout: ParameterLayout
    ) -> EigenCurvature | DenseCurvature | None:
        """The eigendecomposed curvature, from ``ctx.cache`` when present (None: identity)."""
        cfg = self.config
        if cfg.curvature == "identity":
            return None
        kind = DenseCurvature if cfg.curvature == "dense" else EigenCurvature

        def compute() -> dict[str, torch.Tensor]:
            common = {
                "hessian": cfg.hessian,
                "n_samples": ctx.sample_counts(cfg).fit,
                "seed": ctx.seed,
                "hflip": ctx.hflip,
                "batch_size": cfg.batch_size,
                "layout": layout,
                "progress": ctx.progress,
            }
            if cfg.curvature == "dense":
                fitted = fit_dense(model, ctx.schedule, ctx.train_images, **common)
            else:
                fitted = fit_kfac(
                    model,
                    ctx.schedule,
                    ctx.train_images,
                    kfac_approx=cfg.kfac_approx,
                    ekfac=cfg.curvature == "ekfac",
                    **common,
                )
            return {k: v.to("cpu", torch.float64) for k, v in fitted.to_tensors().items()}

        if ctx.cache is None:
            tensors = compute()
        else:
            spec = self._curvature_spec(ctx, model)
            tensors = ctx.cache.get_or_compute(CACHE_KIND, spec, compute, fmt="tensors")
        device = next(iter(model.parameters())).device
        return kind.from_tensors(layout, dict(tensors)).to(device)

    def _score_training_set(
        self,
        ctx: MethodContext,
        model: nn.Module,
        layout: ParameterLayout,
        values: torch.Tensor,
        scales: torch.Tensor | None,
    ) -> np.ndarray:
        """Each training gradient once, against all (preconditioned) queries: ``# [Q, N]``.

        Args:
            ctx: the method context (training images, schedule, sample counts, seed).
            model: the base model, on the compute device.
            layout: the parameter layout of ``model`` (blocks of the flat gradient).
            values: ``# [Q, P]`` preconditioned query gradients (int8/int16 when quantised).
            scales: ``# [Q, n_layers]`` per-layer quantisation scales, or None.

        Returns:
            ``# [Q, N]`` float64 scores of every query against every training example.
        """
        cfg = self.config
        n_train = ctx.n_train
        if scales is None:
            groups = [(0, layout.n_params)]
        else:
            groups = [(b.offset, b.offset + b.size) for b in layout.blocks]
            scales = scales.to("cpu")
        scores = torch.zeros(values.shape[0], n_train, dtype=torch.float64)
        for start, stop, grads in iter_gradient_chunks(
            model,
            ctx.schedule,
            ctx.train_images,
            n_samples=ctx.sample_counts(cfg).grad,
            seed=ctx.seed,
            stream=TRAIN_STREAM,
            batch_size=cfg.batch_size,
            measurement="loss",
            hflip=ctx.hflip,
            layout=layout,
            sample_chunk=cfg.sample_chunk,
            backend=cfg.backend,
            progress=ctx.progress,
            desc="training gradients",
        ):
            # one product per group (layer) when quantised: its own scale, no dequantised copy
            for g, (c0, c1) in enumerate(groups):
                queries = values[:, c0:c1].to(device=grads.device, dtype=grads.dtype)
                products = (queries @ grads[:, c0:c1].T).to("cpu", torch.float64)  # [Q, b]
                if scales is not None:
                    products *= scales[:, g, None]
                scores[:, start:stop] += products
        scores /= n_train
        return scores.numpy()
