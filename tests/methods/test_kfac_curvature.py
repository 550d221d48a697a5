"""methods/kfac_curvature.py: the curvlinops seam, the curvature containers, the fit's guarantees.

Exactness of the fitted curvature against dense float64 references is tested in
tests/methods/test_kfac.py, the convolution input factor in tests/methods/test_kfac_input_factor.py;
here: the declared curvlinops internals (:data:`CURVLINOPS_HOOKS`), ``EigenCurvature`` /
``DenseCurvature`` (preconditioning, store round trip), float64 factors of a float32 model, MC-Fisher
targets independent of the batch size, and argument checks.
"""

from __future__ import annotations

import inspect
from dataclasses import replace

import pytest
import torch
from curvlinops import KFACLinearOperator
from torch import nn

from diffusion.schedule import NoiseSchedule
from methods import kfac_curvature
from methods.gradients import ParameterLayout
from methods.kfac_curvature import (
    CURVLINOPS_HOOKS,
    CURVLINOPS_REQUIREMENT,
    CURVLINOPS_STATE,
    CurvlinopsSeamError,
    DenseCurvature,
    EigenCurvature,
    check_curvlinops_hooks,
    check_curvlinops_state,
    fit_kfac,
    kfac_factors,
)

SCHEDULE = NoiseSchedule(num_timesteps=20, beta_start=1e-3, beta_end=0.1)
SHAPE = (1, 4, 4)


class TinyConvDenoiser(nn.Module):
    """Conv2d -> tanh -> Linear over the pixels (t ignored): one conv and one linear block."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.lin = nn.Linear(32, 16)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.conv(x_t)).flatten(1)).view_as(x_t)


def _model(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)  # nn default init; fixed for reproducibility
    return TinyConvDenoiser().to(dtype).eval()


def _images(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return (torch.rand((n, *SHAPE), generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)


def _fit(model: nn.Module, images: torch.Tensor, **options) -> EigenCurvature:
    return fit_kfac(model, SCHEDULE, images, n_samples=2, seed=0, **options)


# --------------------------------------------------------------------------- curvlinops seam


def _hook(name: str):
    (hook,) = (h for h in CURVLINOPS_HOOKS if h.name == name)
    return hook


def test_installed_curvlinops_has_the_declared_hooks_and_state():
    check_curvlinops_hooks()
    layout = ParameterLayout.from_model(_model())
    operator, _ = kfac_curvature._kfac_operator(
        _model(),
        SCHEDULE,
        _images(2),
        hessian="ggn-model",
        kfac_approx="expand",
        ekfac=True,
        n_samples=1,
        seed=0,
        hflip=False,
        batch_size=2,
        layout=layout,
        progress=False,
    )
    check_curvlinops_state(operator)


def test_every_overridden_curvlinops_method_is_declared():
    """A new override of a curvlinops method must be added to CURVLINOPS_HOOKS (and checked)."""
    declared = {hook.name for hook in CURVLINOPS_HOOKS}
    for operator in (kfac_curvature._KFAC, kfac_curvature._EKFAC):
        curvlinops_base = operator.__mro__[-2]  # the curvlinops class, before object
        for klass in operator.__mro__:
            if klass.__module__ != kfac_curvature.__name__:
                continue
            for name, value in vars(klass).items():
                if callable(value) and hasattr(curvlinops_base, name):
                    assert name in declared, f"{klass.__name__}.{name} overrides curvlinops"


def test_overrides_take_the_declared_parameters():
    for hook in CURVLINOPS_HOOKS:
        for klass in (kfac_curvature._KFAC, kfac_curvature._EKFAC):
            ours = getattr(klass, hook.name, None)
            if issubclass(klass, hook.owner) and ours is not None:
                assert tuple(inspect.signature(ours).parameters) == hook.parameters, hook.name


def _assert_seam_message(error: pytest.ExceptionInfo, attribute: str) -> None:
    message = str(error.value)
    assert attribute in message
    assert kfac_curvature._curvlinops_version() in message
    assert CURVLINOPS_REQUIREMENT in message and "methods/kfac_curvature.py" in message


def test_a_renamed_hook_fails_with_the_fix():
    class RenamedHook:  # a curvlinops whose input-factor hook got another name
        def _hook_accumulate_input_cov(self, module, inputs, module_name): ...

    hook = replace(_hook("_hook_accumulate_input_covariance"), owner=RenamedHook)
    with pytest.raises(CurvlinopsSeamError, match="does not exist") as error:
        check_curvlinops_hooks([hook])
    _assert_seam_message(error, "RenamedHook._hook_accumulate_input_covariance")


def test_a_changed_signature_fails_with_the_fix():
    class ChangedSignature:  # the keyword curvlinops passes is now ``name``
        def _accumulate_gradient_covariance(self, grad_output, module, name): ...

    hook = replace(_hook("_accumulate_gradient_covariance"), owner=ChangedSignature)
    with pytest.raises(
        CurvlinopsSeamError, match=r"takes \(self, grad_output, module, name\)"
    ) as e:
        check_curvlinops_hooks([hook])
    _assert_seam_message(e, "ChangedSignature._accumulate_gradient_covariance")


def test_building_the_operator_checks_the_hooks(monkeypatch):
    def draw_label(self, output, generator): ...

    monkeypatch.setattr(KFACLinearOperator, "draw_label", draw_label)
    with pytest.raises(CurvlinopsSeamError) as error:
        _fit(_model(), _images(2))
    _assert_seam_message(error, "KFACLinearOperator.draw_label")


def test_missing_operator_state_fails_with_the_fix():
    class Operator:
        pass

    operator = Operator()
    for name in CURVLINOPS_STATE[:-1]:
        setattr(operator, name, None)
    with pytest.raises(CurvlinopsSeamError, match="not set") as error:
        check_curvlinops_state(operator)
    _assert_seam_message(error, f"Operator.{CURVLINOPS_STATE[-1]}")


# --------------------------------------------------------------------------- containers


def test_eigen_curvature_preconditions_like_a_dense_solve():
    curvature = _fit(_model(), _images(3))
    gen = torch.Generator().manual_seed(2)
    grads = torch.randn(4, curvature.layout.n_params, generator=gen, dtype=torch.float64)
    damping = 1e-3
    h = curvature.dense()
    expected = torch.linalg.solve(h + damping * torch.eye(h.shape[0], dtype=h.dtype), grads.T).T
    torch.testing.assert_close(
        curvature.precondition(grads, damping), expected, rtol=1e-9, atol=1e-12
    )


def test_dense_curvature_preconditions_like_a_dense_solve():
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    curvature = DenseCurvature(eigenvectors=q, eigenvalues=torch.arange(6.0, dtype=torch.float64))
    grads = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    expected = torch.linalg.solve(curvature.dense() + 0.5 * torch.eye(6).double(), grads.T).T
    torch.testing.assert_close(curvature.precondition(grads, 0.5), expected)


def test_curvature_tensors_round_trip():
    curvature = _fit(_model(), _images(3))
    back = EigenCurvature.from_tensors(curvature.layout, curvature.to_tensors())
    for name in ("qa", "qb", "eig"):
        for ours, original in zip(getattr(back, name), getattr(curvature, name), strict=True):
            assert ours.equal(original)
    dense = DenseCurvature(torch.eye(3).double(), torch.ones(3).double())
    layout = ParameterLayout.from_model(nn.Linear(2, 1))  # 3 parameters
    assert DenseCurvature.from_tensors(layout, dense.to_tensors()).dense().equal(dense.dense())


def test_from_tensors_names_a_missing_or_misshapen_block():
    curvature = _fit(_model(), _images(3))
    tensors = curvature.to_tensors()
    with pytest.raises(ValueError, match="lacks block 1"):
        EigenCurvature.from_tensors(
            curvature.layout, {k: v for k, v in tensors.items() if "0001" not in k}
        )
    tensors["0000.qa"] = torch.eye(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="block 0"):
        EigenCurvature.from_tensors(curvature.layout, tensors)
    with pytest.raises(ValueError, match="delete the cache entry"):
        DenseCurvature.from_tensors(
            curvature.layout, {"eigenvectors": torch.eye(2), "eigenvalues": torch.ones(2)}
        )


# --------------------------------------------------------------------------- the fit


@pytest.mark.parametrize("hessian", ["ggn-model", "ggn-loss"])
def test_factors_of_a_float32_model_are_accumulated_in_float64(hessian):
    """The forward/backward run in float32; the factors are float64 and equal those of the same
    model in float64 up to float32's rounding of the layer inputs and output gradients."""
    options = dict(hessian=hessian, n_samples=2, seed=0, batch_size=2)
    a32, b32 = kfac_factors(_model(torch.float32), SCHEDULE, _images(4, torch.float32), **options)
    a64, b64 = kfac_factors(_model(), SCHEDULE, _images(4), **options)
    for ours, reference in zip(a32 + b32, a64 + b64, strict=True):
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6 * reference.abs().max())


@pytest.mark.parametrize("ekfac", [False, True])
def test_mc_fisher_does_not_depend_on_the_batch_size(ekfac):
    """MC-Fisher targets come from each example's own draws, not one generator over the loop."""
    whole = _fit(_model(), _images(5), ekfac=ekfac, batch_size=5)
    split = _fit(_model(), _images(5), ekfac=ekfac, batch_size=2)
    torch.testing.assert_close(split.dense(), whole.dense(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"hessian": "fisher"}, "hessian"),
        ({"kfac_approx": "both"}, "kfac_approx"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_fit_arguments_are_checked(options, match):
    with pytest.raises(ValueError, match=match):
        _fit(_model(), _images(2), **options)
