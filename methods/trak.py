"""TRAK and D-TRAK for diffusion models, on top of MadryLab's ``traker`` package (v0.3).

**What is computed.** For every training example ``x_j`` the gradient ``g_j`` (``[p]``, p =
number of model parameters) of its *output function* (TRAK: the diffusion training loss
``l(theta, x_j)``; D-TRAK: the square norm ``mean ||eps_theta(x_t, t)||^2``), each a Monte
Carlo mean over S draws of ``(t, eps)`` (and of a horizontal flip when ``ctx.hflip``). For
every query the gradient ``g_q`` of the measurement ``m(theta, x_q)`` (``ctx.measurement``; the
square norm for D-TRAK). traker projects them, ``phi = P g / sqrt(p)`` with a random
``P`` (``[k, p]``: N(0, 1) entries with the CPU ``BasicProjector``, Rademacher with the CUDA
``fast_jl`` projector; the ``1/sqrt(p)`` is traker's own normalisation), and the scores are::

    scores[q, j] = phi_q^T (Phi^T Phi + N * lambda * I_k)^{-1} phi_j        # [n_queries, n_train]
                 = (1/N) phi_q^T ((1/N) Phi^T Phi + lambda I_k)^{-1} phi_j

with ``Phi`` (``[N, k]``) the stacked training features. The second line is the influence
function of the paper (Eq. 6 with GGN^loss, Eq. 11, in the projected space, App. G.4): removing
``x_j`` changes ``m(x_q)`` by ``+(1/N) grad m^T (H + lambda I)^{-1} grad l_j``, so a positive score
predicts that the measurement *increases* when ``j`` is removed, which is our score contract as
is (no sign flip). With the identity projection (``projector="identity"``, ``phi = g / sqrt(p)``)
this is exactly ``g_q^T (G^T G + N * p * lambda * I_p)^{-1} g_j``.

**Damping.** ``damping`` = lambda is given in the paper's normalisation: added to the GGN of the
loss *averaged* over the N training examples, in traker's projected space. traker adds its
``lambda_reg`` to ``Phi^T Phi`` (the unnormalised sum), so ``lambda_reg = N * damping`` (App. G.4:
values quoted for traker / Zheng et al. are N times ours). Default 1e-9, the paper's TRAK default
("the lowest numerically stable value"; Park et al. recommend none).

**Where traker is neutralised.** (1) Its ``Q`` term (``get_out_to_loss_grad``, the logistic
reweighting of classification) is 1 for this regression-type output. (2) It stores in float16
by default; we use float32 throughout (the paper: float16 ruins TRAK for diffusion models).
(3) Its ``BasicScoreComputer`` rescales ``(X^T X)^{-1}`` by its mean absolute entry (a
float16 safeguard) and inverts in float32; ours solves the damped system in float64 without
rescaling, so the scores have the absolute scale above. When ``N < k`` it uses the identical
push-through form ``(Phi Phi^T + N lambda I_N)^{-1} Phi`` (an N x N system).

**Caching and resumption.** traker's save directory (memory-mapped features, one flag per
featurised example) is the artifact cache's work directory ``cache.work_dir("trak", key)``
(``<root>/_work/trak/<key>/`` in ``benchmarks.store.ArtifactStore``), the key
hashing everything that determines the training features (config except batch sizes and
damping, seed, S, hflip, model and training-set fingerprints, ``ctx.train_spec``; never the
queries: their scoring experiment is removed after scoring). A killed
featurisation resumes with the examples not yet flagged. The finalised features depend on the
damping: a different damping re-finalises from the stored projected gradients. Without a cache,
a temporary directory is used and removed.

**Per-example gradients** come from the one engine, :mod:`methods.gradients` (every parameter,
:class:`~methods.gradients.ParameterList`, in traker's vectorisation order); the traker gradient
computer here only adapts its batches. **Monte Carlo draws** depend only on ``(ctx.seed, stream,
example index)`` (:func:`methods.gradients.draw_examples`, streams ``"trak-train"`` and
``"trak-query"``), so scores do not depend on batch sizes. Sample counts: ``grad_samples`` per
training example, ``query_samples`` per query (:meth:`MethodContext.sample_counts`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from trak import TRAKer
from trak import __version__ as TRAK_VERSION
from trak.gradient_computers import FunctionalGradientComputer
from trak.modelout_functions import AbstractModelOutput
from trak.projectors import BasicProjector, NoOpProjector, ProjectionType
from trak.score_computers import BasicScoreComputer

from diffusion.measurements import parse_measurement
from diffusion.schedule import NoiseSchedule
from methods.base import AttributionMethod, MethodUnavailableError
from methods.fingerprint import tensor_fingerprint
from methods.gradients import (
    ExampleDraws,
    ParameterList,
    draw_examples,
    example_seed,
    per_example_gradients,
)

if TYPE_CHECKING:
    from methods.context import ArtifactCache, MethodContext

__all__ = [
    "BACKENDS",
    "OUTPUT_FUNCTIONS",
    "PROJECTORS",
    "QUERY_STREAM",
    "TRAIN_STREAM",
    "TRAK",
    "TRAKConfig",
    "DiffusionModelOutput",
]

OUTPUT_FUNCTIONS: tuple[str, ...] = ("loss", "square-norm", "mean-output")
"""``loss``: TRAK (training loss; queries use ``ctx.measurement``). ``square-norm``: D-TRAK
(``mean ||eps_theta(x_t, t)||^2`` for both the training side and the queries).
``mean-output``: DAS (the mean of ``eps_theta(x_t, t)`` on both sides; ``methods.das``)."""

PROJECTORS: tuple[str, ...] = ("auto", "basic", "cuda", "identity")
BACKENDS: tuple[str, ...] = ("auto", "loop", "vmap")
"""Gradient backends that apply to every parameter (:func:`methods.gradients.per_example_gradients`)."""

TRAIN_STREAM = "trak-train"
"""Draw stream of the training gradients (:func:`methods.gradients.example_seed`)."""
QUERY_STREAM = "trak-query"
"""Draw stream of the query gradients."""
PROJECTION_STREAM = "trak-projection"
"""Seed stream of the random projection."""

_MODEL_ID = 0  # TRAK's one checkpoint (the base model); an ensemble's members are 0, 1, ...
_FINALIZED_FILE = "finalized_lambda.json"


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TRAKConfig:
    """Options of TRAK / D-TRAK (defaults: the paper's, App. G.3-G.4).

    Attributes:
        output_function: ``"loss"`` (TRAK: gradients of the training loss; queries use
            ``ctx.measurement``), ``"mean-output"`` (DAS: the mean of ``eps_theta(x_t)``, both
            sides) or ``"square-norm"`` (D-TRAK: ``mean ||eps_theta(x_t)||^2``
            replaces both the training loss and the measurement).
        proj_dim: k, dimension of the random projection (paper: 32768). Capped, with a
            warning, at the number of parameters p (a projection to k >= p dimensions
            compresses nothing; use ``projector="identity"`` for the exact computation).
        damping: lambda >= 0 in the paper's normalisation (GGN of the loss averaged over N, in
            the projected space); passed to traker as ``lambda_reg = N * damping``. Default
            1e-9 (the paper's default for TRAK). 0 only works when the system is non-singular.
        grad_samples: Monte Carlo (t, eps) draws per training example, or None to use
            ``ctx.grad_samples`` (the setting's value; paper: 250).
        query_samples: draws per query, or None to use ``ctx.query_samples``.
        batch_size: examples per vectorised gradient computation (memory knob; scores do not
            depend on it). With the CUDA projector it is capped at ``proj_max_batch_size``.
        sample_chunk: draws per gradient pass inside a batch (memory knob: the gradient
            is accumulated over chunks of the S draws), or None for all S at once.
        backend: per-example gradients by ``"vmap"`` (``torch.func.vmap`` over the batch),
            ``"loop"`` (one autograd pass per example: ~2x faster on CPU for the U-Net, less
            memory) or ``"auto"`` (loop on CPU, vmap on GPU); see :mod:`methods.gradients`.
        projector: ``"auto"`` (``fast_jl`` CUDA projector when the device is CUDA and fast_jl
            is installed, else ``"basic"``), ``"basic"`` (traker's ``BasicProjector``: N(0, 1)
            entries on CPU, Rademacher on GPU), ``"cuda"`` (require fast_jl) or ``"identity"``
            (traker's ``NoOpProjector``: exact, k = p; only for small models).
        proj_max_batch_size: batch size of the fast_jl kernel (8, 16 or 32; traker's
            ``proj_max_batch_size``: 32 for A100, 16 for V100, 40 for H100).
        projector_block_mb: memory budget in MiB of one block of the ``BasicProjector``
            matrix (``p * block * 4`` bytes; the k columns are split into the fewest equal
            blocks within it). With more than one block, traker regenerates every block for
            every batch (slower, less memory); a single block is generated once. traker seeds
            each block separately, so the block count changes the random matrix (and the
            scores, within the projection's randomness).
    """

    output_function: str = "loss"
    proj_dim: int = 32768
    damping: float = 1e-9
    grad_samples: int | None = None
    query_samples: int | None = None
    batch_size: int = 16
    sample_chunk: int | None = None
    backend: str = "auto"
    projector: str = "auto"
    proj_max_batch_size: int = 32
    projector_block_mb: int = 1024

    def __post_init__(self) -> None:
        if self.output_function not in OUTPUT_FUNCTIONS:
            raise ValueError(
                f"output_function must be one of {OUTPUT_FUNCTIONS}, got {self.output_function!r}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {PROJECTORS}, got {self.projector!r}")
        for name in ("proj_dim", "batch_size", "projector_block_mb"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("grad_samples", "query_samples", "sample_chunk"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
        if self.proj_max_batch_size not in (8, 16, 32, 40):
            raise ValueError(
                f"proj_max_batch_size must be 8, 16, 32 or 40 (fast_jl kernels), got "
                f"{self.proj_max_batch_size!r}"
            )
        if (
            not isinstance(self.damping, (int, float))
            or isinstance(self.damping, bool)
            or not math.isfinite(self.damping)
            or self.damping < 0
        ):
            raise ValueError(f"damping must be a finite float >= 0, got {self.damping!r}")


# --------------------------------------------------------------------------------------------
# traker plumbing: the model-output function, gradient and score computers
# --------------------------------------------------------------------------------------------


class _MeasuredModel(nn.Module):
    """The eps-model under the prefix ``model.``: the module traker holds and loads states into.

    Gradients never go through its ``forward`` (the engine differentiates the inner model);
    the prefix keeps the state-dict keys that the features' key fingerprints.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


class DiffusionModelOutput(AbstractModelOutput):
    """traker's model-output function: names the output function the gradient computer uses.

    The gradients themselves come from :func:`methods.gradients.per_example_gradients` (see
    ``_PerExampleGradientComputer``); traker only calls :meth:`get_out_to_loss_grad`.

    Args:
        function: a measurement name (``diffusion.measurements``): ``"loss"`` or
            ``"square-norm"`` on the training side, ``ctx.measurement`` on the query side.
        layout: ``"train"``: the batch is ``(x0 [B, C, H, W], t [B, S], eps [B, S, C, H, W])``
            plus ``flip [B, S]`` with hflip; ``"query"``: ``(x0, t, eps)`` plus ``trajectory
            [B, T + 1, C, H, W]`` for ``trajectory-logprob``.
    """

    def __init__(self, function: str, layout: str) -> None:
        super().__init__()
        if layout not in ("train", "query"):
            raise ValueError(f"layout must be 'train' or 'query', got {layout!r}")
        self.function = function
        self.layout = layout

    def get_output(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Not used: per-example gradients come from :mod:`methods.gradients`."""
        raise NotImplementedError("TRAK's gradients come from methods.gradients")

    def get_out_to_loss_grad(
        self, model: nn.Module, weights: Any, buffers: Any, batch: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        """TRAK's ``Q`` term: 1 for every example (no logistic reweighting).

        Args:
            model: the wrapped model (unused).
            weights: its parameters (unused).
            buffers: its buffers (unused).
            batch: the batch tuple; its first tensor gives B and the device.

        Returns:
            ``# [B, 1]`` ones.
        """
        return torch.ones(batch[0].shape[0], 1, device=batch[0].device)


class _PerExampleGradientComputer(FunctionalGradientComputer):
    """traker's gradient computer as an adapter of :func:`methods.gradients.per_example_gradients`.

    traker constructs it and calls ``compute_per_sample_grad(batch)`` with the batches that
    :meth:`TRAK.score` passes to ``featurize``/``score``; the output function is the task's
    (:class:`DiffusionModelOutput`). ``schedule`` and ``options`` are set after construction.
    """

    schedule: NoiseSchedule
    options: Mapping[str, Any] = {}
    """Keyword options of :func:`~methods.gradients.per_example_gradients` (``TRAK._engine_options``)."""

    def compute_per_sample_grad(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``# [B, n_params]`` gradients of each example's output, every parameter of the model.

        Args:
            batch: ``(x0, t, eps[, extra])`` as described by :class:`DiffusionModelOutput`.

        Returns:
            The flat gradients in traker's order (``named_parameters``, each flattened).
        """
        task = self.modelout_fn
        x0, t, eps, *rest = batch
        extra = rest[0] if rest else None
        flip = extra if task.layout == "train" else None
        model = self.model.model
        return per_example_gradients(
            model,
            self.schedule,
            x0,
            ExampleDraws(t=t, eps=eps, flip=flip),
            measurement=task.function,
            layout=ParameterList.from_model(model),
            trajectories=extra if task.layout == "query" else None,
            **self.options,
        )


class _BasicProjector(BasicProjector):
    """traker's ``BasicProjector``, regenerating its matrix after ``free_memory``.

    With a single block traker generates the matrix once and never again, but
    ``finalize_features`` frees it before the queries are projected (an AttributeError in
    traker 0.3.2). The regenerated matrix is identical (same generator state).
    """

    def project(self, grads, model_id: int) -> torch.Tensor:
        if self.num_blocks == 1 and not self.proj_matrix_available:
            self.generate_sketch_matrix(self.generator_states[0])
        return super().project(grads, model_id)


class _DampedScoreComputer(BasicScoreComputer):
    """``X (X^T X + lambda_reg I)^{-1}`` solved in float64, without traker's rescaling.

    traker's ``BasicScoreComputer`` inverts in float32 and divides the inverse by its mean
    absolute entry (a float16 safeguard that changes the scores' scale). Here ``get_xtx``
    returns the smaller Gram matrix (``X X^T`` when N < k, else ``X^T X``) and
    ``get_x_xtx_inv`` solves the matching damped system; the two forms are equal
    (push-through identity). Features are returned in traker's storage dtype.
    """

    block_rows: int = 8192

    def _rows(self, grads: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, grads.shape[0], self.block_rows):
            block = grads[start : start + self.block_rows]
            yield start, block.to(self.device, torch.float64)

    def get_xtx(self, grads: torch.Tensor) -> torch.Tensor:
        n, k = grads.shape
        if n < k:
            x = grads.to(self.device, torch.float64)  # [N, k]
            return x @ x.T  # [N, N]
        result = torch.zeros(k, k, dtype=torch.float64, device=self.device)
        for _, block in self._rows(grads):
            result += block.T @ block
        return result  # [k, k]

    def get_x_xtx_inv(self, grads: torch.Tensor, xtx: torch.Tensor) -> torch.Tensor:
        n, k = grads.shape
        eye = torch.eye(xtx.shape[0], dtype=torch.float64, device=self.device)
        system = xtx.to(torch.float64) + self.lambda_reg * eye
        try:
            if n < k:
                x = grads.to(self.device, torch.float64)
                return torch.linalg.solve(system, x).to(self.dtype)  # [N, k]
            chol = torch.linalg.cholesky(system)
            out = torch.empty(n, k, dtype=self.dtype, device=self.device)
            for start, block in self._rows(grads):
                solved = torch.cholesky_solve(block.T, chol).T  # [b, k]
                out[start : start + block.shape[0]] = solved.to(self.dtype)
            return out
        except torch.linalg.LinAlgError as error:
            raise ValueError(
                f"the damped TRAK system is singular (traker lambda_reg = {self.lambda_reg:g}): "
                "increase the damping"
            ) from error


@dataclass(frozen=True)
class _Session:
    """A TRAKer whose training features are finalised, ready to score query experiments.

    Attributes:
        traker: the TRAKer (checkpoint ``model_id`` loaded, features finalised).
        state: the scored model's state dict (the scoring checkpoint).
        save_dir: traker's work directory.
        batch_size: examples per gradient batch.
        device: the compute device.
        model_id: traker's checkpoint id of the model.
    """

    traker: TRAKer
    state: Mapping[str, torch.Tensor]
    save_dir: Path
    batch_size: int
    device: torch.device
    model_id: int


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _spec_hash(spec: Mapping[str, Any]) -> str:
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _fast_jl_available() -> bool:
    try:
        import fast_jl  # noqa: F401  # deferred: optional CUDA extension, probed at run time
    except ImportError:
        return False
    return True


@contextmanager
def _work_dir(cache: ArtifactCache | None, key: str) -> Iterator[Path]:
    """Yield traker's save_dir: the cache's work directory ``("trak", key)``, or a temporary one.

    The cache's directory is kept; the temporary directory (used without a cache) is removed.
    """
    if cache is not None:
        yield cache.work_dir("trak", key)
    else:
        with tempfile.TemporaryDirectory(prefix="trak-") as tmp:
            yield Path(tmp)


def _read_finalized(path: Path) -> float | None:
    try:
        with open(path / _FINALIZED_FILE) as f:
            return float(json.load(f)["lambda_reg"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_finalized(path: Path, lambda_reg: float) -> None:
    tmp = path / f".{_FINALIZED_FILE}.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"lambda_reg": lambda_reg}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / _FINALIZED_FILE)


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------


class TRAK(AttributionMethod):
    """TRAK (Park et al. 2023) for diffusion models, and D-TRAK (Zheng et al. 2024).

    See the module docstring for the exact formula, the damping convention and the caching.
    Registered as ``trak`` and as ``dtrak`` (``output_function="square-norm"``).
    """

    Config: ClassVar[type] = TRAKConfig
    invariant_config_fields: ClassVar[dict[str, tuple[Any, Any]]] = {"batch_size": (1, 7)}
    features_independent_fields: ClassVar[tuple[str, ...]] = (
        "damping",
        "batch_size",
        "proj_max_batch_size",
        "sample_chunk",
        "backend",
        "query_samples",
        "error_weighting",
    )
    """Config fields that do not change the projected training gradients: left out of their key."""

    # ---- availability ----------------------------------------------------------------------

    def availability(self) -> tuple[bool, str]:
        """(available, reason): the CUDA projector needs a CUDA device and traker's kernels."""
        if self.config.projector == "cuda":
            if not torch.cuda.is_available():
                return False, "projector='cuda' needs a CUDA device; use projector='basic'"
            if not _fast_jl_available():
                return False, (
                    "projector='cuda' needs traker's CUDA kernels (pip install traker[fast]); "
                    "use projector='basic'"
                )
        return True, ""

    # ---- helpers ---------------------------------------------------------------------------

    def _functions(self, ctx: MethodContext) -> tuple[str, str]:
        """(training-side output function, query-side measurement)."""
        if self.config.output_function != "loss":
            function = self.config.output_function
            return function, function
        parse_measurement(ctx.measurement, ctx.schedule.num_timesteps)
        return "loss", ctx.measurement

    def _engine_options(self) -> dict[str, Any]:
        """Options of :func:`methods.gradients.per_example_gradients` from the config."""
        return {"sample_chunk": self.config.sample_chunk, "backend": self.config.backend}

    def _projector(self, n_params: int, device: torch.device, seed: int, model_id: int):
        """(projector or None to let traker pick fast_jl, proj_dim); model_id seeds as traker does."""
        cfg = self.config
        if cfg.projector == "identity":
            return NoOpProjector(device=device), n_params
        proj_dim = cfg.proj_dim
        if proj_dim > n_params:
            warnings.warn(
                f"TRAK proj_dim={proj_dim} exceeds the number of parameters {n_params}: capped "
                f"at {n_params} (use projector='identity' for the exact, unprojected scores)",
                stacklevel=3,
            )
            proj_dim = n_params
        use_cuda_kernel = device.type == "cuda" and (
            cfg.projector == "cuda" or (cfg.projector == "auto" and _fast_jl_available())
        )
        if use_cuda_kernel:
            return None, proj_dim  # traker builds (Chunked)CudaProjector with Rademacher entries
        n_blocks = math.ceil(proj_dim * n_params * 4 / (cfg.projector_block_mb * 2**20))
        block = math.ceil(proj_dim / n_blocks)  # balanced blocks within the budget
        proj_type = ProjectionType.normal if device.type == "cpu" else ProjectionType.rademacher
        projector = _BasicProjector(
            grad_dim=n_params,
            proj_dim=proj_dim,
            seed=seed,
            proj_type=proj_type,
            device=device,
            block_size=block,
            dtype=torch.float32,
            model_id=model_id,
        )
        return projector, proj_dim

    def _features_spec(
        self,
        ctx: MethodContext,
        state: Mapping[str, torch.Tensor],
        proj_dim: int,
        device,
        model_id: int = _MODEL_ID,
        *,
        train_function: str | None = None,
    ) -> dict[str, Any]:
        """The key of the training features' work directory: training side only.

        Everything that determines the projected training gradients: the config except batch
        sizes and damping, the projection size, the training output function, S after the
        config's override, hflip, seed, device type, the base model and training set
        (``ctx.train_spec`` and their tensor fingerprints) and the schedule; never the queries.
        A non-zero traker checkpoint id (an ensemble member's: its own projection) is added;
        id 0 adds nothing, so TRAK's keys are those of its single-model versions.

        Args:
            ctx: the method context.
            state: the measured model's state dict (fingerprinted).
            proj_dim: the projection size in use (after capping at the parameter count).
            device: the compute device.
            model_id: traker's checkpoint id of the model.
            train_function: the training-side output function featurised; None: the
                config's (:meth:`_functions`).

        Returns:
            The JSON-able spec (hashed into the work directory's key).
        """
        cfg = self.config
        spec = {
            "method": type(self).__name__.lower(),
            "traker": TRAK_VERSION,
            "config": {
                k: v for k, v in asdict(cfg).items() if k not in self.features_independent_fields
            },
            "proj_dim": proj_dim,
            "train_function": self._functions(ctx)[0] if train_function is None else train_function,
            "grad_samples": ctx.sample_counts(cfg).grad,
            "hflip": bool(ctx.hflip),
            "seed": ctx.seed,
            "device_type": torch.device(device).type,
            "n_train": ctx.n_train,
            "model": tensor_fingerprint(state, named=True),
            "train_images": tensor_fingerprint(ctx.train_images, named=True),
            "schedule": asdict(ctx.schedule),
            "train": dict(ctx.train_spec),
        }
        if model_id != _MODEL_ID:
            spec["model_id"] = model_id
        return spec

    # ---- scoring ---------------------------------------------------------------------------

    def score(self, ctx: MethodContext) -> np.ndarray:
        """``# [n_queries, n_train]`` float64 TRAK scores (formula in the module docstring)."""
        self._require_available()
        return self._model_scores(ctx, ctx.model, _MODEL_ID)

    def _require_available(self) -> None:
        """Raise :class:`MethodUnavailableError` with the reason when :meth:`availability` says no."""
        available, reason = self.availability()
        if not available:
            raise MethodUnavailableError(reason)

    def _model_scores(self, ctx: MethodContext, model: nn.Module, model_id: int) -> np.ndarray:
        """``# [n_queries, n_train]`` float64 TRAK scores of one model, traker checkpoint ``model_id``.

        The per-model path of TRAK (``model = ctx.model``, id 0) and of an ensemble's members
        (:mod:`methods.trak_ensemble`): traker seeds the projection of checkpoint ``model_id``
        with ``projector_seed + 10^5 * model_id`` (``BasicProjector``; ``10^4`` for fast_jl),
        so each id has its own random projection, as in traker's multi-model runs.

        Args:
            ctx: the method context (data, queries, seed, cache); ``ctx.model`` is not used.
            model: the model whose gradients are featurised and scored.
            model_id: traker's checkpoint id (0 for TRAK's single model); part of the
                features' key when non-zero.

        Returns:
            The scores, finite.
        """
        train_fn_name, query_fn_name = self._functions(ctx)
        if query_fn_name.startswith("trajectory-logprob") and ctx.query_trajectories is None:
            raise ValueError(
                "measurement 'trajectory-logprob' needs ctx.query_trajectories "
                "[n_queries, T + 1, C, H, W]"
            )
        with self._featurized(ctx, model, model_id, train_fn_name) as session:
            return self._session_scores(session, ctx, query_fn_name)

    @contextmanager
    def _featurized(
        self, ctx: MethodContext, model: nn.Module, model_id: int, train_function: str
    ) -> Iterator[_Session]:
        """A TRAKer with the training features of ``model`` featurised and finalised.

        Featurises the examples not yet flagged in the work directory (keyed by
        :meth:`_features_spec`), finalises ``Phi (Phi^T Phi + lambda_reg I)^-1`` (again when the
        damping changed) and yields the session; any number of query experiments can then be
        scored against it (:meth:`_session_scores`).

        Args:
            ctx: the method context (training data, seed, cache).
            model: the model whose gradients are featurised.
            model_id: traker's checkpoint id (seeds its projection).
            train_function: the training-side output function (a measurement name).

        Yields:
            The :class:`_Session`; its work directory lives until the context exits.
        """
        cfg = self.config
        device = torch.device(ctx.device)
        n_train = ctx.n_train
        projector_seed = example_seed(ctx.seed, PROJECTION_STREAM, 0) % (2**30)

        wrapper = _MeasuredModel(_copy_model(model, device)).to(device).eval()
        state = wrapper.state_dict()
        n_params = sum(p.numel() for p in wrapper.parameters())
        if cfg.projector == "identity" and n_params > 20_000:
            raise ValueError(
                f"projector='identity' builds a {n_params} x {n_params} system; it is meant for "
                "small test models: use a random projection ('auto' or 'basic')"
            )
        projector, proj_dim = self._projector(n_params, device, projector_seed, model_id)

        spec = self._features_spec(
            ctx, state, proj_dim, device, model_id, train_function=train_function
        )
        lambda_reg = float(n_train * cfg.damping)
        batch_size = cfg.batch_size
        if projector is None:
            batch_size = min(batch_size, cfg.proj_max_batch_size)

        with _work_dir(ctx.cache, _spec_hash(spec)) as save_dir:
            traker = TRAKer(
                model=wrapper,
                task=DiffusionModelOutput(train_function, "train"),
                train_set_size=n_train,
                save_dir=str(save_dir),
                load_from_save_dir=True,
                device=str(device),
                gradient_computer=_PerExampleGradientComputer,
                projector=projector,
                score_computer=_DampedScoreComputer,
                proj_dim=proj_dim,
                logging_level=logging.WARNING,
                use_half_precision=False,
                proj_max_batch_size=cfg.proj_max_batch_size,
                projector_seed=projector_seed,
                lambda_reg=lambda_reg,
            )
            computer = traker.gradient_computer
            computer.schedule = ctx.schedule
            computer.options = self._engine_options()

            traker.load_checkpoint(state, model_id=model_id)
            self._featurize(traker, ctx, batch_size, device)

            # ---- finalise: Phi (Phi^T Phi + lambda_reg I)^-1, redone if the damping changed ----
            meta = traker.saver.model_ids[model_id]
            if meta["is_finalized"] != 1 or _read_finalized(save_dir) != lambda_reg:
                meta["is_finalized"] = 0
                with _quiet_traker_bars(ctx.progress):
                    traker.finalize_features(model_ids=[model_id])
                _write_finalized(save_dir, lambda_reg)
            yield _Session(traker, state, save_dir, batch_size, device, model_id)

    def _session_scores(
        self,
        session: _Session,
        ctx: MethodContext,
        function: str,
        *,
        images: torch.Tensor | None = None,
        stream: str = QUERY_STREAM,
    ) -> np.ndarray:
        """``# [n_queries, n_train]`` float64 scores of one query experiment in ``session``.

        Args:
            session: the featurised TRAKer (:meth:`_featurized`).
            ctx: the method context (queries, their trajectories, seed, sample counts).
            function: the query-side output function (a measurement name).
            images: ``# [n_queries, C, H, W]`` the images whose output is differentiated;
                None: ``ctx.query_images``.
            stream: the draws' stream (:func:`methods.gradients.example_seed`).

        Returns:
            The scores, finite.
        """
        exp_name = self._score_queries(
            session.traker,
            ctx,
            session.state,
            function,
            session.batch_size,
            session.device,
            session.model_id,
            images=images,
            stream=stream,
        )
        with _quiet_traker_bars(ctx.progress):
            raw = session.traker.finalize_scores(exp_name=exp_name, model_ids=[session.model_id])
        scores = np.array(raw, dtype=np.float64).T  # [n_queries, n_train]
        _drop_experiment_files(session.save_dir, exp_name, session.model_id)
        if not np.all(np.isfinite(scores)):
            raise FloatingPointError(
                "TRAK produced non-finite scores: increase the damping or check the model"
            )
        return scores

    def _featurize(
        self, traker: TRAKer, ctx: MethodContext, batch_size: int, device: torch.device
    ) -> None:
        """Featurise the training examples not yet flagged (resumes a killed featurisation).

        Args:
            traker: the TRAKer, with the model's checkpoint loaded.
            ctx: the method context (training images, seed, hflip, sample counts).
            batch_size: examples per gradient batch.
            device: the compute device.
        """
        n_samples = ctx.sample_counts(self.config).grad
        done = np.asarray(traker.saver.current_store["is_featurized"]).reshape(-1)
        todo = np.flatnonzero(done == 0)
        batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
        for inds in tqdm(batches, desc="TRAK featurise", disable=not ctx.progress):
            batch = _gradient_batch(
                ctx.train_images.detach(),
                inds,
                n_samples=n_samples,
                seed=ctx.seed,
                stream=TRAIN_STREAM,
                num_timesteps=ctx.schedule.num_timesteps,
                hflip=ctx.hflip,
                device=device,
            )
            traker.featurize(batch=batch, inds=inds)

    def _score_queries(
        self,
        traker: TRAKer,
        ctx: MethodContext,
        state: Mapping[str, torch.Tensor],
        function: str,
        batch_size: int,
        device: torch.device,
        model_id: int,
        *,
        images: torch.Tensor | None = None,
        stream: str = QUERY_STREAM,
    ) -> str:
        """Project the queries' gradients into a new scoring experiment; returns its name.

        Args:
            traker: the TRAKer, features finalised.
            ctx: the method context (queries, their trajectories, seed, sample counts).
            state: the scored model's state dict (the scoring checkpoint).
            function: the query-side output function (a measurement name).
            batch_size: queries per gradient batch.
            device: the compute device.
            model_id: traker's checkpoint id of the model.
            images: ``# [n_queries, C, H, W]`` the images differentiated (None:
                ``ctx.query_images``).
            stream: the draws' stream (:func:`methods.gradients.example_seed`).

        Returns:
            The experiment's name (pass it to ``finalize_scores``).
        """
        images = ctx.query_images if images is None else images
        n_samples = ctx.sample_counts(self.config).query
        query_spec = {
            "queries": tensor_fingerprint(images, named=True),
            "function": function,
            "query_samples": n_samples,
            "seed": ctx.seed,
        }
        if stream != QUERY_STREAM:
            query_spec["stream"] = stream
        exp_name = "q" + _spec_hash(query_spec)
        traker.gradient_computer.modelout_fn = DiffusionModelOutput(function, "query")
        traker.task = traker.gradient_computer.modelout_fn
        traker.start_scoring_checkpoint(
            exp_name=exp_name, checkpoint=state, model_id=model_id, num_targets=ctx.n_queries
        )
        trajectories = ctx.query_trajectories if function == "trajectory-logprob" else None
        n_queries = ctx.n_queries
        batches = [
            np.arange(i, min(i + batch_size, n_queries)) for i in range(0, n_queries, batch_size)
        ]
        for inds in tqdm(batches, desc="TRAK queries", disable=not ctx.progress):
            batch = _gradient_batch(
                images.detach(),
                inds,
                n_samples=n_samples,
                seed=ctx.seed,
                stream=stream,
                num_timesteps=ctx.schedule.num_timesteps,
                hflip=False,  # the measurement is on the query as it appeared (App. G.8)
                device=device,
                trajectories=trajectories,
            )
            traker.score(batch=batch, inds=inds)
        return exp_name


def _gradient_batch(
    images: torch.Tensor,
    inds: np.ndarray,
    *,
    n_samples: int,
    seed: int,
    stream: str,
    num_timesteps: int,
    hflip: bool,
    device: torch.device,
    trajectories: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """The batch traker hands to the gradient computer (:class:`DiffusionModelOutput`).

    Args:
        images: ``# [N, C, H, W]`` the whole set.
        inds: ``# [B]`` positions of the batch's examples.
        n_samples: Monte Carlo draws per example.
        seed: the run's seed.
        stream: the draws' stream (:func:`methods.gradients.example_seed`).
        num_timesteps: T of the noise schedule.
        hflip: draw a horizontal flip per draw (training side).
        device: where the batch goes.
        trajectories: ``# [N, T + 1, C, H, W]`` (query side, trajectory-logprob), or None.

    Returns:
        ``(x0 [B, C, H, W], t [B, S], eps [B, S, C, H, W])`` plus ``flip [B, S]`` with hflip,
        or ``trajectory [B, T + 1, C, H, W]`` with trajectories.
    """
    rows = torch.from_numpy(inds)
    draws = draw_examples(
        inds, n_samples, images.shape[1:], num_timesteps, seed=seed, stream=stream, hflip=hflip
    )
    x0 = images[rows].to(device)
    batch: tuple[torch.Tensor, ...] = (x0, draws.t.to(device), draws.eps.to(device, x0.dtype))
    if draws.flip is not None:
        batch = (*batch, draws.flip.to(device))
    if trajectories is not None:
        batch = (*batch, trajectories[rows].to(device, x0.dtype))
    return batch


def _copy_model(model: nn.Module, device: torch.device) -> nn.Module:
    """A detached copy on ``device`` in eval mode (traker loads state dicts into its model)."""
    clone = copy.deepcopy(model).to(device).eval()
    for p in clone.parameters():
        p.requires_grad_(True)
    return clone


@contextmanager
def _quiet_traker_bars(progress: bool) -> Iterator[None]:
    """Silence the tqdm bar over model ids of traker's finalize_* unless ``progress``."""
    import trak.traker as traker_module  # deferred: traker loads only when TRAK runs

    original = traker_module.tqdm
    if not progress:
        traker_module.tqdm = lambda iterable, *a, **k: iterable
    try:
        yield
    finally:
        traker_module.tqdm = original


def _drop_experiment_files(save_dir: Path, exp_name: str, model_id: int) -> None:
    """Remove a finished experiment's memory maps (the scores are returned, not reused)."""
    for path in (
        save_dir / str(model_id) / f"{exp_name}_grads.mmap",
        save_dir / "scores" / f"{exp_name}.mmap",
    ):
        path.unlink(missing_ok=True)
