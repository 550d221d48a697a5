"""K-FAC against exact answers on a tiny diffusers ``UNet2DModel`` (float64).

The same exactness checks as tests/methods/test_kfac.py, where they hold for any network (a
U-Net's convolutions and attention share weights over positions, so a layer's GGN block is not
itself a Kronecker product): the Kronecker factors equal curvlinops' own, on every
``nn.Linear``/``nn.Conv2d`` layer, the attention projections ``to_q``/``to_k``/``to_v``/
``to_out.0`` included; and EK-FAC's eigenvalues are the dense per-layer GGN^loss (per-draw
gradients by plain backward passes) in the Kronecker eigenbasis.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from methods.gradients import ParameterLayout, draw_examples
from methods.kfac_curvature import FIT_STREAM, fit_kfac, kfac_factors
from tests.tiny_diffusers import DIFFUSERS_REASON, TINY_SCHEDULE, tiny_diffusers_model

pytest.importorskip("diffusers", reason=DIFFUSERS_REASON)

SHAPE = (1, 8, 8)
N_IMAGES, N_SAMPLES = 3, 2
ATTENTION = tuple(
    f"unet.mid_block.attentions.0.{name}" for name in ("to_q", "to_k", "to_v", "to_out.0")
)


class _DictModel(nn.Module):
    """curvlinops' view of a denoiser: ``{"x_t", "t"} -> [rows, d]``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model(batch["x_t"], batch["t"]).flatten(1)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_diffusers_model(seed=1).double()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.rand((N_IMAGES, *SHAPE), generator=gen, dtype=torch.float64) * 2 - 1


def _rows(images: torch.Tensor):
    """``(x_t, t, eps)`` of every (image, draw), rows image-major: ``[R, C, H, W]``, ``[R]``."""
    draws = draw_examples(
        range(N_IMAGES), N_SAMPLES, SHAPE, TINY_SCHEDULE.num_timesteps, seed=0, stream=FIT_STREAM
    )
    x0 = images.unsqueeze(1).expand(N_IMAGES, N_SAMPLES, *SHAPE).reshape(-1, *SHAPE)
    t = draws.t.reshape(-1)
    eps = draws.eps.reshape(-1, *SHAPE).double()
    return TINY_SCHEDULE.q_sample(x0, t, eps), t, eps


def test_every_linear_and_conv_layer_is_attributed(model):
    layout = ParameterLayout.from_model(model)
    modules = [b.module for b in layout.blocks]
    assert set(ATTENTION) <= set(modules)
    expected = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    assert modules == expected


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("hessian", ["ggn-model-exact", "ggn-loss"])
def test_factors_equal_plain_curvlinops(model, images, kfac_approx, hessian):
    from curvlinops import KFACLinearOperator

    a_ours, b_ours = kfac_factors(
        model,
        TINY_SCHEDULE,
        images,
        hessian=hessian,
        kfac_approx=kfac_approx,
        n_samples=N_SAMPLES,
        seed=0,
        batch_size=2,
    )
    x_t, t, eps = _rows(images)
    layout = ParameterLayout.from_model(model)
    params = [dict(model.named_parameters())[n] for n in layout.param_names()]
    plain = KFACLinearOperator(
        _DictModel(model),
        nn.MSELoss(),
        params,
        [({"x_t": x_t, "t": t}, eps.flatten(1))],
        fisher_type={"ggn-model-exact": "type-2", "ggn-loss": "empirical"}[hessian],
        kfac_approx=kfac_approx,
        separate_weight_and_bias=False,
        check_deterministic=False,
        batch_size_fn=lambda batch: batch["x_t"].shape[0],
    )
    plain.compute_kronecker_factors()
    state = plain.state_dict()
    scale = 1.0 / x_t[0].numel() if hessian == "ggn-loss" else 1.0  # pixel-mean loss
    assert len(a_ours) == len(layout.blocks)
    for block, a, b in zip(layout.blocks, a_ours, b_ours, strict=True):
        name = f"model.{block.module}"
        torch.testing.assert_close(a, state["input_covariances"][name], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(
            b, state["gradient_covariances"][name] * scale, rtol=1e-9, atol=1e-14
        )


def test_ekfac_eigenvalues_are_the_dense_ggn_in_the_kronecker_eigenbasis(model, images):
    curvature = fit_kfac(
        model, TINY_SCHEDULE, images, hessian="ggn-loss", ekfac=True, n_samples=N_SAMPLES, seed=0
    )
    layout = ParameterLayout.from_model(model)
    params = dict(model.named_parameters())
    x_t, t, eps = _rows(images)
    per_draw = []  # [R, n_params]: gradient of each draw's pixel-mean loss, one backward each
    for r in range(x_t.shape[0]):
        model.zero_grad()
        (eps[r : r + 1] - model(x_t[r : r + 1], t[r : r + 1])).square().mean().backward()
        grads = {n: params[n].grad[None] for n in layout.param_names()}
        per_draw.append(layout.flatten(grads)[0])
    g = torch.stack(per_draw)
    checked = set()
    for block, qa, qb, eig in zip(
        layout.blocks, curvature.qa, curvature.qb, curvature.eig, strict=True
    ):
        g_block = g[:, block.offset : block.offset + block.size]  # [R, size]
        projected = g_block @ torch.kron(qb, qa)  # [R, size]
        expected = projected.square().mean(0)  # diag(Q^T H_block Q)
        assert expected.abs().max() > 0, block.module
        torch.testing.assert_close(eig.reshape(-1), expected, rtol=1e-8, atol=1e-14)
        checked.add(block.module)
    assert set(ATTENTION) <= checked
