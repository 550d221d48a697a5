"""Fitting the curvature of influence functions: K-FAC / EK-FAC (curvlinops) and a dense GGN.

The curvature approximates the Hessian of the mean training loss
``L_D = (1/N) sum_n l(theta, x_n)`` with ``l`` = mean over pixels of the squared error, averaged
over ``K`` Monte Carlo draws of ``(t, eps[, flip])`` per example (:mod:`methods.gradients`).
Each draw ``(n, k)`` is one datum of the curvlinops data set (``num_data = N * K``), so that
curvlinops' ``MSELoss(reduction="mean")`` on the flattened ``[rows, C * H * W]`` output is exactly
``L_D``'s Monte Carlo estimate, and its GGN is ``(1/(NK)) sum_{n,k} J^T (2/d) J``
(``d = C * H * W``; the ``2/d`` is the Hessian of the pixel-mean squared error).

Hessians (``hessian``):
- ``"ggn-model"``: GGN^model estimated by the MC-Fisher (paper Eq. 10): one target
  ``eps_mod ~ N(eps_theta(x_t), I / 2)`` per draw, sampled from the model's own output
  distribution (curvlinops ``fisher_type="mc"``; variance 1/2 because the loss is the squared
  error without the Gaussian's 1/2). The true ``eps`` does not enter.
- ``"ggn-model-exact"``: GGN^model with the exact output Hessian (curvlinops ``"type-2"``,
  ``d`` backward passes per batch): no MC over ``eps_mod``. For small images and tests.
- ``"ggn-loss"``: the empirical Fisher (curvlinops ``"empirical"``) of the per-draw losses,
  ``(1/(NK)) sum_{n,k} grad l_{n,k} grad l_{n,k}^T`` (K-FAC'd). Deviation from the paper's
  Eq. 11 (which averages the K draws' gradients before the outer product): curvlinops' hooks
  see one datum per draw. Under K-FAC expand, averaging first would only scale the second
  factor by 1/K (expand drops the cross-draw terms anyway), a rescaling of the damping.
  Scale: curvlinops multiplies the mean-reduced loss by ``sqrt(d)`` before taking gradients
  (right for the MC-Fisher, ``d`` times too large for the empirical Fisher of the pixel-mean
  loss); the factor is divided by ``d`` here, so that ``ggn-loss`` is the GGN^loss of ``l``.

Curvatures: ``"kfac"`` (eigendecomposition of the two factors of each layer, exactly damped),
``"ekfac"`` (curvlinops' eigenvalue-corrected K-FAC), ``"dense"`` (the full GGN in float64 via
``torch.func``; only for tiny models, used to check the Kronecker path; its ``ggn-model`` is the
exact GGN^model, without MC targets). Weights and biases of a layer share one Kronecker block
(curvlinops ``separate_weight_and_bias=False``), matching :class:`methods.gradients.ParameterLayout`.

Randomness: draws of example ``n`` come from ``(seed, "fit", n)`` (and the MC-Fisher targets from
the same generator, not curvlinops' single generator), so the curvature does not depend on the
batch size. Precision: the factors are accumulated in float64 whatever the model's dtype (the
forward and backward passes stay in the model's dtype). At damping 1e-8 the inverse resolves
eigenvalues below float32's resolution of a long sum, and float32 accumulation made the scores
depend on the batch size by percents. The one exception is deliberate: a convolution's input
factor under K-FAC expand (the fit's dominant cost) multiplies groups of 4096 patch vectors in
the model's dtype and sums the groups in float64 (:func:`_conv_patch_gram`: ~1e-7 relative
error). What the fit costs and what the grouping saves: perf/README.md ("K-FAC fit").
"""

from __future__ import annotations

import importlib.metadata
import inspect
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from curvlinops import EKFACLinearOperator, KFACLinearOperator
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap
from tqdm.auto import tqdm

from diffusion.schedule import NoiseSchedule
from methods.gradients import ParameterLayout, draw_examples

__all__ = [
    "CURVLINOPS_HOOKS",
    "CURVLINOPS_REQUIREMENT",
    "CURVLINOPS_STATE",
    "DENSE_MAX_PARAMS",
    "FIT_STREAM",
    "HESSIANS",
    "KFAC_APPROXES",
    "CurvlinopsHook",
    "CurvlinopsSeamError",
    "DenseCurvature",
    "EigenCurvature",
    "check_curvlinops_hooks",
    "check_curvlinops_state",
    "fit_dense",
    "fit_kfac",
    "kfac_factors",
]

HESSIANS: tuple[str, ...] = ("ggn-model", "ggn-model-exact", "ggn-loss")
KFAC_APPROXES: tuple[str, ...] = ("expand", "reduce")
_FISHER_TYPE = {"ggn-model": "mc", "ggn-model-exact": "type-2", "ggn-loss": "empirical"}
DENSE_MAX_PARAMS = 6000
"""Largest parameter count for the dense curvature (a [P, P] float64 matrix and its eigh)."""

FIT_STREAM = "fit"


# ----------------------------------------------------------------------------- containers


@dataclass(frozen=True)
class EigenCurvature:
    """Block-diagonal curvature in Kronecker-factored eigenbases.

    Block ``b`` (a ``[d_out, cols]`` matrix ``W`` in the row-major layout of
    :class:`ParameterLayout`) is ``(QB kron QA) diag(vec(eig)) (QB kron QA)^T``: applied to
    ``W`` it gives ``QB ((QB^T W QA) * eig) QA^T``. For K-FAC ``eig = outer(eig(B), eig(A))``;
    for EK-FAC the corrected eigenvalues.

    Attributes:
        layout: the parameter layout.
        qa: per block, ``# [cols, cols]`` eigenvectors of the input factor A.
        qb: per block, ``# [d_out, d_out]`` eigenvectors of the output-gradient factor B.
        eig: per block, ``# [d_out, cols]`` eigenvalues (>= 0).
    """

    layout: ParameterLayout
    qa: tuple[torch.Tensor, ...]
    qb: tuple[torch.Tensor, ...]
    eig: tuple[torch.Tensor, ...]

    def to(self, device: torch.device | str) -> EigenCurvature:
        """A copy with every tensor on ``device``."""
        return EigenCurvature(
            layout=self.layout,
            qa=tuple(q.to(device) for q in self.qa),
            qb=tuple(q.to(device) for q in self.qb),
            eig=tuple(e.to(device) for e in self.eig),
        )

    def precondition(self, grads: torch.Tensor, damping: float) -> torch.Tensor:
        """``(H + damping I)^-1 grads`` with the damping added to every eigenvalue (exact).

        Args:
            grads: ``# [Q, n_params]``.
            damping: lambda > 0.

        Returns:
            ``# [Q, n_params]`` in float64.
        """
        grads = grads.to(torch.float64)
        out = torch.empty_like(grads)
        out_views = self.layout.block_views(out)
        for view, g, qa, qb, eig in zip(
            out_views, self.layout.block_views(grads), self.qa, self.qb, self.eig, strict=True
        ):
            rotated = qb.T @ g @ qa  # [Q, d_out, cols]
            rotated = rotated / (eig + damping)
            view.copy_(qb @ rotated @ qa.T)
        return out

    def dense(self) -> torch.Tensor:
        """The full block-diagonal matrix ``# [n_params, n_params]`` float64 (tests only)."""
        blocks = []
        for qa, qb, eig in zip(self.qa, self.qb, self.eig, strict=True):
            q = torch.kron(qb, qa)
            blocks.append(q @ torch.diag(eig.reshape(-1)) @ q.T)
        return torch.block_diag(*blocks)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat dict for the artifact store (keys ``"0003.qa"`` etc.)."""
        out: dict[str, torch.Tensor] = {}
        for i, (qa, qb, eig) in enumerate(zip(self.qa, self.qb, self.eig, strict=True)):
            out[f"{i:04d}.qa"] = qa.contiguous()
            out[f"{i:04d}.qb"] = qb.contiguous()
            out[f"{i:04d}.eig"] = eig.contiguous()
        return out

    @classmethod
    def from_tensors(cls, layout: ParameterLayout, tensors: dict[str, torch.Tensor]):
        """Inverse of :meth:`to_tensors`; checks the shapes against ``layout``."""
        qa, qb, eig = [], [], []
        for i, block in enumerate(layout.blocks):
            try:
                a, b, e = (tensors[f"{i:04d}.{k}"] for k in ("qa", "qb", "eig"))
            except KeyError as error:
                raise ValueError(
                    f"cached curvature lacks block {i} ({block.module!r}): {error}; delete the "
                    "cache entry to recompute it"
                ) from None
            if a.shape != (block.cols, block.cols) or b.shape != (block.d_out, block.d_out):
                raise ValueError(
                    f"cached curvature block {i} ({block.module!r}) has shapes "
                    f"{tuple(a.shape)}, {tuple(b.shape)}; the model needs "
                    f"{(block.cols, block.cols)}, {(block.d_out, block.d_out)}"
                )
            qa.append(a)
            qb.append(b)
            eig.append(e)
        return cls(layout=layout, qa=tuple(qa), qb=tuple(qb), eig=tuple(eig))


@dataclass(frozen=True)
class DenseCurvature:
    """A dense curvature ``H = V diag(eig) V^T`` over the flat layout (tiny models only).

    Attributes:
        eigenvectors: ``# [n_params, n_params]`` float64.
        eigenvalues: ``# [n_params]`` float64, >= 0.
    """

    eigenvectors: torch.Tensor
    eigenvalues: torch.Tensor

    def to(self, device: torch.device | str) -> DenseCurvature:
        """A copy with every tensor on ``device``."""
        return DenseCurvature(self.eigenvectors.to(device), self.eigenvalues.to(device))

    def precondition(self, grads: torch.Tensor, damping: float) -> torch.Tensor:
        """``(H + damping I)^-1 grads``: ``# [Q, n_params]`` -> float64 ``# [Q, n_params]``."""
        v = self.eigenvectors
        rotated = grads.to(torch.float64) @ v  # [Q, P]
        return (rotated / (self.eigenvalues + damping)) @ v.T

    def dense(self) -> torch.Tensor:
        """The curvature as a dense ``# [n_params, n_params]`` matrix."""
        v = self.eigenvectors
        return v @ torch.diag(self.eigenvalues) @ v.T

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to store (inverse of :meth:`from_tensors`)."""
        return {"eigenvectors": self.eigenvectors, "eigenvalues": self.eigenvalues}

    @classmethod
    def from_tensors(cls, layout: ParameterLayout, tensors: dict[str, torch.Tensor]):
        """The curvature stored by :meth:`to_tensors`, checked against ``layout``."""
        vectors, values = tensors["eigenvectors"], tensors["eigenvalues"]
        if vectors.shape != (layout.n_params, layout.n_params):
            raise ValueError(
                f"cached dense curvature is {tuple(vectors.shape)}, the model needs "
                f"{(layout.n_params, layout.n_params)}; delete the cache entry"
            )
        return cls(eigenvectors=vectors, eigenvalues=values)


def _eigh_psd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a PSD matrix in float64, eigenvalues clamped at 0."""
    m = matrix.to(torch.float64)
    values, vectors = torch.linalg.eigh(0.5 * (m + m.T))
    return values.clamp_min(0.0), vectors


# ----------------------------------------------------------------------------- data


class _FlatEpsModel(nn.Module):
    """curvlinops' view of the denoiser: ``{"x_t", "t", "noise"} -> eps_hat # [rows, d]``.

    curvlinops calls ``model_func(X)`` with a single argument; the denoiser needs ``(x_t, t)``,
    so batches are dicts (with ``batch_size_fn``). The flat ``[rows, C * H * W]`` output makes
    one draw one datum (EK-FAC also needs a 2-d output). ``noise`` (the standard normal noise
    of the MC-Fisher targets of this batch) is kept for :meth:`_SeededTargets.draw_label`.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.label_noise: torch.Tensor | None = None

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.label_noise = batch.get("noise")
        return self.model(batch["x_t"], batch["t"]).flatten(1)


# ----------------------------------------------------------------------------- curvlinops seam

CURVLINOPS_REQUIREMENT = "curvlinops-for-pytorch>=3.0,<3.1"
"""The curvlinops versions whose internals this module was written against (pyproject.toml)."""


@dataclass(frozen=True)
class CurvlinopsHook:
    """A curvlinops method, not public API, that this module overrides or calls.

    curvlinops calls its hooks by keyword (``module_name=``, ``module=``), so the parameter
    names are part of the contract.

    Attributes:
        owner: the curvlinops class defining it.
        name: the method's name.
        parameters: its parameter names as ``inspect.signature`` lists them on ``owner``.
        use: what this module does with it (which class overrides or calls it).
    """

    owner: type
    name: str
    parameters: tuple[str, ...]
    use: str


CURVLINOPS_HOOKS: tuple[CurvlinopsHook, ...] = (
    CurvlinopsHook(
        KFACLinearOperator,
        "_hook_accumulate_input_covariance",
        ("self", "module", "inputs", "module_name"),
        "overridden by _Float64Factors (float64 input factor)",
    ),
    CurvlinopsHook(
        KFACLinearOperator,
        "_accumulate_gradient_covariance",
        ("self", "grad_output", "module", "module_name"),
        "overridden by _Float64Factors (float64 output-gradient factor)",
    ),
    CurvlinopsHook(
        KFACLinearOperator,
        "_set_or_add_",
        ("dictionary", "key", "value"),
        "called by _Float64Factors to accumulate the input factor",
    ),
    CurvlinopsHook(
        KFACLinearOperator,
        "draw_label",
        ("self", "output"),
        "overridden by _SeededTargets (per-example MC-Fisher targets)",
    ),
    CurvlinopsHook(
        EKFACLinearOperator,
        "_hook_cache_inputs",
        ("self", "module", "inputs", "module_name"),
        "overridden by _EKFAC (float64 layer inputs)",
    ),
    CurvlinopsHook(
        EKFACLinearOperator,
        "_accumulate_corrected_eigenvalues",
        ("self", "grad_output", "module", "module_name"),
        "overridden by _EKFAC (float64 output gradients)",
    ),
)
"""Every curvlinops method this module overrides or calls that is not public API."""

CURVLINOPS_STATE: tuple[str, ...] = (
    "_model_func",
    "_kfac_approx",
    "_separate_weight_and_bias",
    "_N_data",
    "_input_covariances",
)
"""The private attributes of a built curvlinops operator that _Float64Factors and
_SeededTargets read or write."""


class CurvlinopsSeamError(RuntimeError):
    """The installed curvlinops lacks or changed an internal that this module relies on."""


def _curvlinops_version() -> str:
    try:
        return importlib.metadata.version("curvlinops-for-pytorch")
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def _seam_error(attribute: str, problem: str, use: str) -> CurvlinopsSeamError:
    return CurvlinopsSeamError(
        f"curvlinops {_curvlinops_version()}: {attribute} {problem}; methods/kfac_curvature.py "
        f"relies on it ({use}). Fix: install {CURVLINOPS_REQUIREMENT!r} (the pin in "
        "pyproject.toml), or update methods/kfac_curvature.py (CURVLINOPS_HOOKS and the classes "
        "using them) to the installed curvlinops"
    )


def check_curvlinops_hooks(hooks: Iterable[CurvlinopsHook] = CURVLINOPS_HOOKS) -> None:
    """Raise :class:`CurvlinopsSeamError` if a hook is missing or its parameters changed."""
    for hook in hooks:
        attribute = f"{hook.owner.__name__}.{hook.name}"
        method = getattr(hook.owner, hook.name, None)
        if not callable(method):
            raise _seam_error(attribute, "does not exist", hook.use)
        parameters = tuple(inspect.signature(method).parameters)
        if parameters != hook.parameters:
            raise _seam_error(
                attribute,
                f"takes ({', '.join(parameters)}), expected ({', '.join(hook.parameters)})",
                hook.use,
            )


def check_curvlinops_state(operator: object, names: Iterable[str] = CURVLINOPS_STATE) -> None:
    """Raise :class:`CurvlinopsSeamError` if the built ``operator`` lacks one of ``names``."""
    for name in names:
        if not hasattr(operator, name):
            raise _seam_error(
                f"{type(operator).__name__}.{name}",
                "is not set by the operator's constructor",
                "read or written by _Float64Factors / _SeededTargets",
            )


class _SeededTargets:
    """Mixin: MC-Fisher targets from the per-example draws instead of one global generator.

    curvlinops draws the targets from one generator over the whole data loop, so a target would
    depend on the batch composition; here target noise is drawn per example with its other
    draws (``ExampleDraws.extra_noise``). Same distribution as curvlinops' own
    ``draw_label`` for ``MSELoss``: ``output + sqrt(1/2) * z``.
    """

    def draw_label(self, output: torch.Tensor) -> torch.Tensor:
        noise = self._model_func.label_noise  # type: ignore[attr-defined]
        if noise is None or noise.shape != output.shape:
            raise RuntimeError(
                "internal error: MC-Fisher target noise missing or of the wrong shape "
                f"({None if noise is None else tuple(noise.shape)} vs {tuple(output.shape)})"
            )
        return output.detach() + math.sqrt(0.5) * noise.to(output)


class _Float64Factors:
    """Mixin: accumulate the Kronecker factors in float64 whatever the model's dtype.

    With damping 1e-8 the inverse resolves eigenvalues far below float32's resolution of a sum
    of many outer products (~1e-7 of the largest), so float32 accumulation makes the scores
    depend on the summation order (the batch size) by percents. The layer inputs and output
    gradients are cast to float64 before curvlinops' outer products (overrides of curvlinops
    3.0's hook methods, declared in :data:`CURVLINOPS_HOOKS`; the forward/backward passes stay
    in the model's dtype).
    """

    def _hook_accumulate_input_covariance(self, module, inputs, module_name):
        if len(inputs) != 1 or not _fast_input_covariance_supported(module):
            inputs = tuple(x.detach().to(torch.float64) for x in inputs)
            return super()._hook_accumulate_input_covariance(module, inputs, module_name)
        joint_bias = not self._separate_weight_and_bias and module.bias is not None
        covariance = _input_covariance(
            module, inputs[0].detach(), self._kfac_approx, joint_bias
        ).div_(self._N_data)
        self._input_covariances = self._set_or_add_(
            self._input_covariances, module_name, covariance
        )
        return None

    def _accumulate_gradient_covariance(self, grad_output, module, module_name):
        grad_output = grad_output.detach().to(torch.float64)
        return super()._accumulate_gradient_covariance(grad_output, module, module_name)


def _fast_input_covariance_supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and not isinstance(module.padding, str)
    return isinstance(module, nn.Linear)


_GRAM_GROUP_ROWS = 4096
"""(row, position) vectors per float32 Gram product of the input factor (:func:`_conv_patch_gram`)."""


def _input_covariance(
    module: nn.Module, x: torch.Tensor, kfac_approx: str, joint_bias: bool
) -> torch.Tensor:
    """One batch's input factor ``sum a a^T / scale`` in float64, as curvlinops defines it.

    ``a`` are the layer's inputs (unfolded patches for a convolution), one per row and shared
    position for ``expand`` (``scale`` = the number of shared positions), averaged over the
    shared positions for ``reduce`` (``scale = 1``); with ``joint_bias`` a constant 1 is
    appended to ``a``. Same value as curvlinops' hook, without materialising the appended
    column or float64 patches of the whole batch.
    """
    if isinstance(module, nn.Conv2d):
        if kfac_approx == "expand":
            outer, sums, positions = _conv_patch_gram(module, x)
            count = x.shape[0] * positions
            return _with_bias(outer, sums, count, joint_bias).div_(positions)
        rows, positions = _unfold(module, x).mean(dim=2), 1  # [B, d_in]
    else:
        positions = x.shape[1:-1].numel()
        if kfac_approx == "expand":
            rows = x.reshape(-1, x.shape[-1])  # [B * positions, d_in]
        else:
            rows, positions = x.reshape(x.shape[0], -1, x.shape[-1]).mean(dim=1), 1
    rows = rows.to(torch.float64)
    outer = rows.T @ rows  # [d_in, d_in]
    sums = rows.sum(dim=0) if joint_bias else None
    return _with_bias(outer, sums, rows.shape[0], joint_bias).div_(positions)


def _unfold(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The convolution's input patches ``# [B, d_in, L]`` (``d_in = C_in * kh * kw``)."""
    return F.unfold(
        x,
        module.kernel_size,
        dilation=module.dilation,
        padding=module.padding,
        stride=module.stride,
    )


def _conv_patch_gram(module: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``sum_{b, l} a a^T`` and ``sum_{b, l} a`` over the patches ``a`` of ``x``, in float64.

    Extracts and multiplies a group of about :data:`_GRAM_GROUP_ROWS` (row, position) patch
    vectors at a time (the group's patches stay in cache; the batch's would not), in the input's
    own dtype, and sums the groups' Grams in float64: no float64 copy of the patches, and the
    float64 sum over groups avoids the error of one long float32 sum (relative error ~7e-8 of
    the largest entry for a 32-channel 8x8 input, ~5e-7 for one float32 product over the whole
    batch; checked against float64 in tests/methods/test_kfac_input_factor.py). Speed:
    perf/README.md ("K-FAC fit").

    Args:
        module: the convolution.
        x: its input ``# [B, C_in, H, W]``.

    Returns:
        ``(# [d_in, d_in], # [d_in], L)``: the Gram and the sum (float64), and the number of
        positions per row.
    """
    d_in = x.shape[1] * module.kernel_size[0] * module.kernel_size[1]
    order = _unfold_order(module, x.shape[1], x.device)
    positions = math.prod(  # output positions per row
        (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
        for size, pad, dil, k, stride in zip(
            x.shape[2:],
            module.padding,
            module.dilation,
            module.kernel_size,
            module.stride,
            strict=True,
        )
    )
    rows_per_group = max(1, _GRAM_GROUP_ROWS // positions)
    outer = x.new_zeros(d_in, d_in, dtype=torch.float64)
    sums = x.new_zeros(d_in, dtype=torch.float64)
    for start in range(0, x.shape[0], rows_per_group):
        vectors = _patch_vectors(module, x[start : start + rows_per_group])  # [b * L, d_in]
        outer += vectors.T @ vectors
        sums += vectors.sum(dim=0)  # float32 pairwise sum of the group, float64 across groups
    if order is not None:  # back to F.unfold's (channel, kernel row, kernel column) order
        outer, sums = outer[order][:, order], sums[order]
    return outer, sums, positions


def _patch_vectors(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The patches of ``x # [b, C_in, H, W]`` as rows ``# [b * L, d_in]``.

    Undilated convolutions: the patch entries come in (kernel row, kernel column, channel)
    order (see :func:`_unfold_order`), copied from a windowed view of the channels-last padded
    input in runs of ``kw * C_in`` contiguous floats (instead of ``F.unfold`` and a transposing
    copy of its ``[b, d_in, L]`` result; speed: perf/README.md). Otherwise ``F.unfold``'s order.
    """
    if tuple(module.dilation) != (1, 1):
        patches = _unfold(module, x)  # [b, d_in, L]
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    (kh, kw), (sh, sw), (ph, pw) = module.kernel_size, module.stride, module.padding
    padded = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1).contiguous()  # [b, H', W', C]
    windows = padded.unfold(1, kh, sh).unfold(2, kw, sw)  # [b, Ho, Wo, C, kh, kw]
    return windows.permute(0, 1, 2, 4, 5, 3).reshape(-1, kh * kw * x.shape[1])


def _unfold_order(module: nn.Conv2d, channels: int, device: torch.device) -> torch.Tensor | None:
    """Indices taking :func:`_patch_vectors`' entry order to ``F.unfold``'s (None: the same).

    Entry ``c * kh * kw + i * kw + j`` of ``F.unfold`` (channel ``c``, kernel position
    ``(i, j)``) is entry ``i * kw * C + j * C + c`` of the (kernel row, column, channel) order.
    """
    if tuple(module.dilation) != (1, 1):
        return None
    kh, kw = module.kernel_size
    c, i, j = torch.meshgrid(
        torch.arange(channels), torch.arange(kh), torch.arange(kw), indexing="ij"
    )
    return (i * kw * channels + j * channels + c).reshape(-1).to(device)


def _with_bias(
    outer: torch.Tensor, sums: torch.Tensor | None, count: int, joint_bias: bool
) -> torch.Tensor:
    """``outer # [d, d]`` bordered by the bias column (``sums``, ``count``) if ``joint_bias``."""
    if not joint_bias:
        return outer
    d_in = outer.shape[0]
    full = outer.new_empty(d_in + 1, d_in + 1)
    full[:d_in, :d_in] = outer
    full[:d_in, d_in] = sums
    full[d_in, :d_in] = sums
    full[d_in, d_in] = count
    return full


class _KFAC(_SeededTargets, _Float64Factors, KFACLinearOperator):
    pass


class _EKFAC(_SeededTargets, _Float64Factors, EKFACLinearOperator):
    def _hook_cache_inputs(self, module, inputs, module_name):
        inputs = tuple(x.detach().to(torch.float64) for x in inputs)
        return super()._hook_cache_inputs(module, inputs, module_name)

    def _accumulate_corrected_eigenvalues(self, grad_output, module, module_name):
        grad_output = grad_output.detach().to(torch.float64)
        return super()._accumulate_corrected_eigenvalues(grad_output, module, module_name)


class _FitData:
    """Re-iterable batches ``({"x_t", "t", "noise"}, eps # [rows, d])`` of fit draws.

    ``batch_size`` examples (``batch_size * n_samples`` rows) per batch, generated lazily and
    identically on every pass (curvlinops may pass over the data more than once).
    """

    def __init__(
        self,
        images: torch.Tensor,
        schedule: NoiseSchedule,
        *,
        n_samples: int,
        seed: int,
        hflip: bool,
        batch_size: int,
        with_noise: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.images = images
        self.schedule = schedule
        self.n_samples = n_samples
        self.seed = seed
        self.hflip = hflip
        self.batch_size = batch_size
        self.with_noise = with_noise
        self.dtype = dtype
        self.device = device

    def __len__(self) -> int:
        return math.ceil(self.images.shape[0] / self.batch_size)

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        n, k = self.images.shape[0], self.n_samples
        shape = tuple(self.images.shape[1:])
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            draws = draw_examples(
                range(start, stop),
                k,
                shape,
                self.schedule.num_timesteps,
                seed=self.seed,
                stream=FIT_STREAM,
                hflip=self.hflip,
                extra_noise=self.with_noise,
            )
            x0 = self.images[start:stop].to(dtype=self.dtype).unsqueeze(1)  # [b, 1, C, H, W]
            x0 = x0.expand(stop - start, k, *shape)
            if draws.flip is not None:
                x0 = torch.where(draws.flip[..., None, None, None], x0.flip(-1), x0)
            rows = (stop - start) * k
            t = draws.t.reshape(rows)
            eps = draws.eps.reshape(rows, *shape).to(self.dtype)
            x_t = self.schedule.q_sample(x0.reshape(rows, *shape), t, eps)
            batch = {"x_t": x_t.to(self.device), "t": t.to(self.device)}
            if draws.extra_noise is not None:
                batch["noise"] = draws.extra_noise.reshape(rows, -1).to(self.device, self.dtype)
            yield batch, eps.flatten(1).to(self.device)


def _check_fit_args(hessian: str, kfac_approx: str, n_samples: int, batch_size: int) -> None:
    if hessian not in HESSIANS:
        raise ValueError(f"hessian must be one of {HESSIANS}, got {hessian!r}")
    if kfac_approx not in KFAC_APPROXES:
        raise ValueError(f"kfac_approx must be one of {KFAC_APPROXES}, got {kfac_approx!r}")
    if n_samples < 1 or batch_size < 1:
        raise ValueError(f"n_samples and batch_size must be >= 1, got {n_samples}, {batch_size}")


# ----------------------------------------------------------------------------- K-FAC


def _kfac_operator(
    model: nn.Module,
    schedule: NoiseSchedule,
    images: torch.Tensor,
    *,
    hessian: str,
    kfac_approx: str,
    ekfac: bool,
    n_samples: int,
    seed: int,
    hflip: bool,
    batch_size: int,
    layout: ParameterLayout,
    progress: bool,
) -> tuple[KFACLinearOperator, _FlatEpsModel]:
    _check_fit_args(hessian, kfac_approx, n_samples, batch_size)
    wrapped = _FlatEpsModel(model)
    named = dict(model.named_parameters())
    params = [named[name] for name in layout.param_names()]
    dtype, device = params[0].dtype, params[0].device
    data = _FitData(
        images,
        schedule,
        n_samples=n_samples,
        seed=seed,
        hflip=hflip,
        batch_size=batch_size,
        with_noise=hessian == "ggn-model",
        dtype=dtype,
        device=device,
    )
    check_curvlinops_hooks()
    cls = _EKFAC if ekfac else _KFAC
    operator = cls(
        wrapped,
        nn.MSELoss(reduction="mean"),
        params,
        data,
        progressbar=progress,
        check_deterministic=False,
        fisher_type=_FISHER_TYPE[hessian],
        mc_samples=1,
        kfac_approx=kfac_approx,
        num_per_example_loss_terms=1,
        separate_weight_and_bias=False,
        num_data=int(images.shape[0]) * n_samples,
        batch_size_fn=lambda batch: int(batch["x_t"].shape[0]),
    )
    check_curvlinops_state(operator)
    return operator, wrapped


def _curvlinops_name(module: str) -> str:
    return "model" if module == "" else f"model.{module}"


def kfac_factors(
    model: nn.Module,
    schedule: NoiseSchedule,
    images: torch.Tensor,
    *,
    hessian: str = "ggn-model",
    kfac_approx: str = "expand",
    n_samples: int,
    seed: int,
    hflip: bool = False,
    batch_size: int = 16,
    layout: ParameterLayout | None = None,
    progress: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The K-FAC factors of every block.

    The block of layer ``l`` is ``B_l kron A_l`` on the row-major ``[d_out, cols]`` layout.

    Args:
        model: the eps-model.
        schedule: its noise schedule.
        images: ``# [N, C, H, W]`` the training examples the curvature averages over.
        hessian: ``"ggn-model"`` (MC-Fisher) or ``"ggn-loss"`` (empirical Fisher).
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight-shared layers.
        n_samples: Monte Carlo draws per example.
        seed: the run's seed (draws as :func:`fit_kfac`).
        hflip: average over random horizontal flips as training did.
        batch_size: examples per curvature batch (does not change the factors).
        layout: the parameter layout (default: every attributed layer of ``model``).
        progress: show a progress bar.

    Returns:
        ``(A, B)``: lists over blocks of ``# [cols, cols]`` and ``# [d_out, d_out]`` float64.
    """
    layout = ParameterLayout.from_model(model) if layout is None else layout
    operator, _ = _kfac_operator(
        model,
        schedule,
        images,
        hessian=hessian,
        kfac_approx=kfac_approx,
        ekfac=False,
        n_samples=n_samples,
        seed=seed,
        hflip=hflip,
        batch_size=batch_size,
        layout=layout,
        progress=progress,
    )
    operator.compute_kronecker_factors()
    state = operator.state_dict()
    scale = _empirical_scale(hessian, images)
    a_list, b_list = [], []
    for block in layout.blocks:
        name = _curvlinops_name(block.module)
        a_list.append(state["input_covariances"][name])
        b_list.append(state["gradient_covariances"][name] * scale)
    return a_list, b_list


def _empirical_scale(hessian: str, images: torch.Tensor) -> float:
    """Factor turning curvlinops' empirical Fisher into that of the pixel-mean loss.

    For ``MSELoss(reduction="mean")`` curvlinops scales the loss by ``sqrt(d)`` before taking
    gradients (so that the MC-Fisher's expectation is the GGN), which makes its empirical Fisher
    ``d`` times ``(1/(NK)) sum grad l grad l^T`` for the pixel-mean loss ``l``. Undo that.
    """
    if hessian != "ggn-loss":
        return 1.0
    return 1.0 / math.prod(images.shape[1:])


def fit_kfac(
    model: nn.Module,
    schedule: NoiseSchedule,
    images: torch.Tensor,
    *,
    hessian: str = "ggn-model",
    kfac_approx: str = "expand",
    ekfac: bool = False,
    n_samples: int,
    seed: int,
    hflip: bool = False,
    batch_size: int = 16,
    layout: ParameterLayout | None = None,
    progress: bool = False,
) -> EigenCurvature:
    """Fit K-FAC (or EK-FAC) on ``images`` and eigendecompose it.

    Args:
        model: the denoiser ``model(x_t, t)`` (eval mode).
        schedule: noise schedule.
        images: ``# [N, C, H, W]`` training images.
        hessian: see :data:`HESSIANS` and the module docstring.
        kfac_approx: ``"expand"`` or ``"reduce"`` (weight-sharing layers).
        ekfac: eigenvalue-corrected K-FAC (curvlinops' EKFACLinearOperator).
        n_samples: K, Monte Carlo draws per example.
        seed: seed of the draws (stream ``"fit"``).
        hflip: random horizontal flip per draw (augmentation as in training).
        batch_size: examples per curvlinops batch (``batch_size * K`` rows).
        layout: the attributed parameters (default: from ``model``).
        progress: tqdm bar over the batches.

    Returns:
        the curvature, eigendecomposed in float64.
    """
    layout = ParameterLayout.from_model(model) if layout is None else layout
    if not ekfac:
        a_list, b_list = kfac_factors(
            model,
            schedule,
            images,
            hessian=hessian,
            kfac_approx=kfac_approx,
            n_samples=n_samples,
            seed=seed,
            hflip=hflip,
            batch_size=batch_size,
            layout=layout,
            progress=progress,
        )
        qa, qb, eig = [], [], []
        for a, b in zip(a_list, b_list, strict=True):
            ea, va = _eigh_psd(a)
            eb, vb = _eigh_psd(b)
            qa.append(va)
            qb.append(vb)
            eig.append(torch.outer(eb, ea))
        return EigenCurvature(layout=layout, qa=tuple(qa), qb=tuple(qb), eig=tuple(eig))

    operator, _ = _kfac_operator(
        model,
        schedule,
        images,
        hessian=hessian,
        kfac_approx=kfac_approx,
        ekfac=True,
        n_samples=n_samples,
        seed=seed,
        hflip=hflip,
        batch_size=batch_size,
        layout=layout,
        progress=progress,
    )
    operator.compute_eigenvalue_correction()
    state = operator.state_dict()
    scale = _empirical_scale(hessian, images)
    qa, qb, eig = [], [], []
    for block in layout.blocks:
        name = _curvlinops_name(block.module)
        corrected = state["corrected_eigenvalues"][name]
        if isinstance(corrected, dict):  # no bias: {position of the weight: [d_out, d_in]}
            (corrected,) = corrected.values()
        qa.append(state["input_covariances_eigenvectors"][name].to(torch.float64))
        qb.append(state["gradient_covariances_eigenvectors"][name].to(torch.float64))
        eig.append(corrected.to(torch.float64).clamp_min(0.0) * scale)
    return EigenCurvature(layout=layout, qa=tuple(qa), qb=tuple(qb), eig=tuple(eig))


# ----------------------------------------------------------------------------- dense


def fit_dense(
    model: nn.Module,
    schedule: NoiseSchedule,
    images: torch.Tensor,
    *,
    hessian: str = "ggn-model",
    n_samples: int,
    seed: int,
    hflip: bool = False,
    batch_size: int = 16,
    layout: ParameterLayout | None = None,
    progress: bool = False,
) -> DenseCurvature:
    """The dense GGN over the flat layout, eigendecomposed (tiny models only).

    ``ggn-model`` and ``ggn-model-exact``: ``(1/(NK)) sum_{n,k} J^T (2/d) J`` with
    ``J = d eps_theta(x_t, t) / d theta`` ``# [d, n_params]`` (no MC targets). ``ggn-loss``:
    ``(1/(NK)) sum_{n,k} g g^T`` with ``g`` the gradient of draw ``(n, k)``'s loss. Same draws
    as :func:`fit_kfac`.

    Args:
        model: the eps-model (at most ``DENSE_MAX_PARAMS`` attributed parameters).
        schedule: its noise schedule.
        images: ``# [N, C, H, W]`` the training examples.
        hessian: ``"ggn-model"``, ``"ggn-model-exact"`` or ``"ggn-loss"``.
        n_samples: Monte Carlo draws per example.
        seed: the run's seed.
        hflip: average over random horizontal flips as training did.
        batch_size: examples per batch (does not change the result).
        layout: the parameter layout (default: every attributed layer of ``model``).
        progress: show a progress bar.

    Returns:
        The eigendecomposed ``# [n_params, n_params]`` curvature.
    """
    _check_fit_args(hessian, "expand", n_samples, batch_size)
    layout = ParameterLayout.from_model(model) if layout is None else layout
    if layout.n_params > DENSE_MAX_PARAMS:
        raise ValueError(
            f"the dense curvature needs a [{layout.n_params}, {layout.n_params}] matrix; it is "
            f"meant for tiny models (<= {DENSE_MAX_PARAMS} parameters): use curvature='kfac'"
        )
    named = dict(model.named_parameters())
    names = layout.param_names()
    attributed = {n: named[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in named.items() if n not in attributed}
    buffers = dict(model.named_buffers())
    dtype, device = attributed[names[0]].dtype, attributed[names[0]].device
    data = _FitData(
        images,
        schedule,
        n_samples=n_samples,
        seed=seed,
        hflip=hflip,
        batch_size=batch_size,
        with_noise=False,
        dtype=dtype,
        device=device,
    )
    n_rows = int(images.shape[0]) * n_samples
    h = torch.zeros(layout.n_params, layout.n_params, dtype=torch.float64, device=device)

    def output(p, x_t, t):  # one row: x_t [C, H, W], t [] -> [d]
        return functional_call(model, (p, frozen, buffers), (x_t[None], t[None])).flatten()

    jacobians = vmap(jacrev(output), in_dims=(None, 0, 0))
    for batch, eps in tqdm(data, desc="dense GGN", disable=not progress):
        if hessian == "ggn-loss":
            rows = eps.shape[0]
            x_t, t = batch["x_t"], batch["t"]
            flat = _per_draw_loss_gradients(model, layout, attributed, frozen, buffers, x_t, t, eps)
            h += flat.to(torch.float64).T @ flat.to(torch.float64)
        else:
            jac = jacobians(attributed, batch["x_t"], batch["t"])  # name -> [rows, d, *shape]
            rows, d = eps.shape
            flat = layout.flatten({k: v.reshape(rows * d, *v.shape[2:]) for k, v in jac.items()})
            flat = flat.to(torch.float64)  # [rows * d, P]
            h += (2.0 / d) * (flat.T @ flat)
    h /= n_rows
    values, vectors = _eigh_psd(h)
    return DenseCurvature(eigenvectors=vectors, eigenvalues=values)


def _per_draw_loss_gradients(model, layout, attributed, frozen, buffers, x_t, t, eps):
    """Gradients of each row's pixel-mean squared error ``# [rows, n_params]``."""

    def loss(p, x, tt, e):
        out = functional_call(model, (p, frozen, buffers), (x[None], tt[None])).flatten()
        return (e - out).square().mean()

    grads = vmap(grad(loss), in_dims=(None, 0, 0, 0))(attributed, x_t, t, eps)
    return layout.flatten(grads)
