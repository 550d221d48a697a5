"""K-FAC influence against exact answers, in float64 on hand-made tiny denoisers.

References are computed here independently, with explicit Python loops over examples and Monte
Carlo draws and ``torch.autograd.functional.jacobian`` / ``backward`` (never with the code under
test): dense GGNs ``(1/(NK)) sum J^T (2/d) J`` (GGN^model) and ``(1/(NK)) sum g g^T`` (GGN^loss,
per-draw gradients), per-example gradients averaged over their draws, and influence scores
``G_query (H + lambda I)^-1 G_train^T / N`` by ``torch.linalg.solve``. Only the draws are shared
with the code under test (same seeds and streams), so both sides see the same data.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from diffusion.measurements import per_draw
from diffusion.schedule import NoiseSchedule
from methods.context import MethodContext
from methods.gradients import ParameterLayout, draw_examples
from methods.kfac import QUERY_STREAM, TRAIN_STREAM, KFACInfluence
from methods.kfac_curvature import FIT_STREAM, fit_kfac, kfac_factors

SCHEDULE = NoiseSchedule(num_timesteps=20, beta_start=1e-3, beta_end=0.1)
SHAPE = (1, 4, 4)


class LinearDenoiser(nn.Module):
    """``eps_theta(x_t, t) = W vec(x_t) + b`` (t ignored): a single linear layer."""

    def __init__(self, d: int, bias: bool = True) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d, bias=bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.lin(x_t.flatten(1)).view_as(x_t)


class ConvDenoiser(nn.Module):
    """Conv2d -> tanh -> Conv2d (t ignored)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.tanh(self.conv1(x_t)))


def _images(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand((n, *SHAPE), generator=gen, dtype=torch.float64) * 2 - 1).clamp(-1, 1)


def _model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # nn default init; fixed for reproducibility
    model = LinearDenoiser(16) if kind == "linear" else ConvDenoiser()
    return model.double().eval()


# --------------------------------------------------------------------------- brute force


def _flatten_layout(layout: ParameterLayout, per_param: dict[str, torch.Tensor], lead: int):
    """``{name: [lead, *shape]}`` -> ``# [lead, n_params]`` in ``[W.flatten(1) | b]`` order."""
    parts = []
    for block in layout.blocks:
        w = per_param[block.weight].reshape(lead, block.d_out, -1)
        if block.bias is not None:
            w = torch.cat([w, per_param[block.bias].reshape(lead, block.d_out, 1)], dim=2)
        parts.append(w.reshape(lead, -1))
    return torch.cat(parts, dim=1)


def _rows(images, n_samples, seed, stream):
    """Yield ``(n, x_t [1, C, H, W], t [1], eps [1, C, H, W])`` for every example and draw."""
    draws = draw_examples(
        range(images.shape[0]), n_samples, SHAPE, SCHEDULE.num_timesteps, seed=seed, stream=stream
    )
    for n in range(images.shape[0]):
        for k in range(n_samples):
            t = draws.t[n, k : k + 1]
            eps = draws.eps[n, k : k + 1].double()
            yield n, SCHEDULE.q_sample(images[n : n + 1], t, eps), t, eps


def dense_ggn(model, images, n_samples, seed, hessian):
    """Dense GGN^model (exact output Hessian) or GGN^loss (per-draw) by explicit loops."""
    layout = ParameterLayout.from_model(model)
    names = layout.param_names()
    params = dict(model.named_parameters())
    h = torch.zeros(layout.n_params, layout.n_params, dtype=torch.float64)
    count = 0
    for _, x_t, t, eps in _rows(images, n_samples, seed, FIT_STREAM):
        count += 1
        if hessian == "ggn-loss":
            model.zero_grad()
            (eps - model(x_t, t)).square().mean().backward()
            g = _flatten_layout(layout, {n: params[n].grad[None] for n in names}, 1)[0]
            h += torch.outer(g, g)
        else:

            def output(*ps, x_t=x_t, t=t):
                return functional_call(model, dict(zip(names, ps, strict=True)), (x_t, t)).flatten()

            jac = torch.autograd.functional.jacobian(output, tuple(params[n] for n in names))
            d = x_t.numel()
            j = _flatten_layout(layout, dict(zip(names, jac, strict=True)), d)  # [d, P]
            h += (2.0 / d) * j.T @ j
    return h / count


def loop_gradients(model, images, n_samples, seed, stream, measurement="loss"):
    """Per-example gradients of the MC-mean measurement ``# [B, n_params]`` by backward()."""
    layout = ParameterLayout.from_model(model)
    params = dict(model.named_parameters())
    draws = draw_examples(
        range(images.shape[0]), n_samples, SHAPE, SCHEDULE.num_timesteps, seed=seed, stream=stream
    )
    out = []
    for n in range(images.shape[0]):
        model.zero_grad()
        for k in range(n_samples):
            value = per_draw(
                measurement,
                model,
                SCHEDULE,
                images[n : n + 1],
                draws.t[n : n + 1, k : k + 1],
                draws.eps[n : n + 1, k : k + 1].double(),
            )
            (value.sum() / n_samples).backward()
        out.append(
            _flatten_layout(layout, {n: params[n].grad[None] for n in layout.param_names()}, 1)[0]
        )
    return torch.stack(out)


def reference_scores(model, ctx, h, damping, measurement="loss"):
    n = ctx.n_train
    g_train = loop_gradients(model, ctx.train_images, ctx.grad_samples, ctx.seed, TRAIN_STREAM)
    g_query = loop_gradients(
        model, ctx.query_images, ctx.query_samples, ctx.seed, QUERY_STREAM, measurement
    )
    damped = h + damping * torch.eye(h.shape[0], dtype=torch.float64)
    return (g_query @ torch.linalg.solve(damped, g_train.T) / n).numpy()


def _context(
    model, n_train=6, n_queries=2, grad_samples=3, fit_samples=4, query_samples=2, seed=0, **kw
):
    return MethodContext(
        model=model,
        schedule=SCHEDULE,
        train_images=_images(n_train, 1),
        query_images=_images(n_queries, 2),
        seed=seed,
        grad_samples=grad_samples,
        fit_samples=fit_samples,
        query_samples=query_samples,
        **kw,
    )


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("bias", [True, False])
def test_kfac_type2_equals_dense_ggn_on_a_linear_layer(kfac_approx, bias):
    torch.manual_seed(0)
    model = LinearDenoiser(16, bias=bias).double().eval()
    images = _images(5, 1)
    curvature = fit_kfac(
        model,
        SCHEDULE,
        images,
        hessian="ggn-model-exact",
        kfac_approx=kfac_approx,
        n_samples=3,
        seed=0,
        batch_size=2,
    )
    reference = dense_ggn(model, images, 3, 0, "ggn-model")
    torch.testing.assert_close(curvature.dense(), reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_linear_layer_scores_equal_dense_solve(curvature):
    model = _model("linear")
    ctx = _context(model)
    method = KFACInfluence(
        KFACInfluence.Config(
            hessian="ggn-model-exact", curvature=curvature, quantize=None, batch_size=4
        )
    )
    scores = method.score(ctx)
    h = dense_ggn(model, ctx.train_images, ctx.fit_samples, ctx.seed, "ggn-model")
    expected = reference_scores(model, ctx, h, method.config.damping)
    assert scores.shape == (2, 6) and scores.dtype == "float64"
    assert abs(expected).max() > 0
    torch.testing.assert_close(
        torch.from_numpy(scores), torch.from_numpy(expected), rtol=1e-7, atol=1e-9
    )


@pytest.mark.parametrize("hessian", ["ggn-model", "ggn-loss"])
def test_dense_conv_scores_match_brute_force(hessian):
    model = _model("conv")
    ctx = _context(model, n_train=5, grad_samples=2, fit_samples=3)
    damping = 1e-3  # the 39-parameter GGN of 15 draws is rank-deficient: keep the solve tame
    method = KFACInfluence(
        KFACInfluence.Config(
            hessian=hessian, curvature="dense", damping=damping, quantize=None, batch_size=2
        )
    )
    scores = method.score(ctx)
    h = dense_ggn(model, ctx.train_images, ctx.fit_samples, ctx.seed, hessian)
    expected = reference_scores(model, ctx, h, damping)
    torch.testing.assert_close(
        torch.from_numpy(scores), torch.from_numpy(expected), rtol=1e-7, atol=1e-10
    )


def test_ekfac_eigenvalues_are_the_dense_ggn_in_the_kronecker_eigenbasis():
    """EK-FAC's defining property: its eigenvalues are diag(Q^T H Q), Q = QB kron QA."""
    model = _model("conv")
    images = _images(4, 1)
    curvature = fit_kfac(
        model, SCHEDULE, images, hessian="ggn-loss", ekfac=True, n_samples=3, seed=0
    )
    h = dense_ggn(model, images, 3, 0, "ggn-loss")
    layout = ParameterLayout.from_model(model)
    for block, qa, qb, eig in zip(
        layout.blocks, curvature.qa, curvature.qb, curvature.eig, strict=True
    ):
        q = torch.kron(qb, qa)
        sl = slice(block.offset, block.offset + block.size)
        diag = torch.diagonal(q.T @ h[sl, sl] @ q)
        torch.testing.assert_close(eig.reshape(-1), diag, rtol=1e-8, atol=1e-12)


def test_single_draw_empirical_kfac_is_exact():
    """With one datum the empirical Fisher of a layer is a Kronecker product: no approximation
    (this pins the 1/d scale convention of GGN^loss for the pixel-mean loss)."""
    model = _model("linear")
    images = _images(1, 1)
    curvature = fit_kfac(model, SCHEDULE, images, hessian="ggn-loss", n_samples=1, seed=0)
    reference = dense_ggn(model, images, 1, 0, "ggn-loss")
    torch.testing.assert_close(curvature.dense(), reference, rtol=1e-10, atol=1e-14)


def test_mc_fisher_converges_to_type2():
    model = _model("linear")
    images = _images(4, 1)
    _, (exact,) = kfac_factors(
        model, SCHEDULE, images, hessian="ggn-model-exact", n_samples=1, seed=0
    )
    errors = []
    for n_samples in (10, 1000):
        a, (b,) = kfac_factors(
            model, SCHEDULE, images, hessian="ggn-model", n_samples=n_samples, seed=0
        )
        errors.append(float((b - exact).norm() / exact.norm()))
    # expected ~ 1/sqrt(draws): a factor 10 from 10 to 1000 draws per example
    assert errors[1] < errors[0] / 4, errors
    assert errors[1] < 0.1, errors


def test_mc_fisher_is_unbiased_for_the_output_hessian():
    """For a linear layer B_type2 = (2/d) I exactly; the MC-Fisher's B is close to it."""
    model = _model("linear")
    _, (b_exact,) = kfac_factors(
        model, SCHEDULE, _images(3, 1), hessian="ggn-model-exact", n_samples=1, seed=0
    )
    torch.testing.assert_close(b_exact, (2.0 / 16) * torch.eye(16, dtype=torch.float64))


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("hessian", "fisher", "hessian"),
        ("kfac_approx", "both", "kfac_approx"),
        ("curvature", "kfc", "curvature"),
        ("damping", 0.0, "damping"),
        ("damping", float("nan"), "damping"),
        ("fit_samples", 0, "fit_samples"),
        ("grad_samples", 1.5, "grad_samples"),
        ("query_samples", -1, "query_samples"),
        ("measurement", "likelihood", "measurement"),
        ("quantize", "int4", "quantize"),
        ("batch_size", 0, "batch_size"),
        ("sample_chunk", 0, "sample_chunk"),
        ("backend", "jax", "backend"),
    ],
)
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        KFACInfluence.Config(**{field: value})


def test_registry_variants_build():
    from methods import create_method

    assert create_method("kfac").config == KFACInfluence.Config()
    assert create_method("kfac-reduce").config.kfac_approx == "reduce"
    assert create_method("kfac-empirical").config.hessian == "ggn-loss"
    assert create_method("kfac-mloss").config.measurement == "loss"
    assert create_method("ekfac").config.curvature == "ekfac"
    grad_dot = create_method("grad-dot")
    assert grad_dot.config.curvature == "identity" and not grad_dot.knows_self_influence


def test_grad_dot_is_the_plain_gradient_inner_product():
    model = _model("conv")
    ctx = _context(model, n_train=4, grad_samples=2)
    scores = KFACInfluence(KFACInfluence.Config(curvature="identity", quantize=None)).score(ctx)
    g_train = loop_gradients(model, ctx.train_images, 2, 0, TRAIN_STREAM)
    g_query = loop_gradients(model, ctx.query_images, ctx.query_samples, 0, QUERY_STREAM)
    torch.testing.assert_close(
        torch.from_numpy(scores), (g_query @ g_train.T / 4), rtol=1e-9, atol=1e-14
    )


class _DictModel(nn.Module):
    """curvlinops' view of a denoiser in the test: ``{"x_t", "t"} -> [rows, d]``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model(batch["x_t"], batch["t"]).flatten(1)


class AttentionConvDenoiser(nn.Module):
    """Conv2d -> token Linear over [B, H*W, C] (weight sharing) -> Conv2d without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.tokens = nn.Linear(3, 3)
        self.conv2 = nn.Conv2d(3, 1, 3, padding=1, bias=False)

    def forward(self, x_t, t):
        h = torch.tanh(self.conv1(x_t))  # [B, 3, 4, 4]
        tokens = self.tokens(h.flatten(2).transpose(1, 2))  # [B, 16, 3]
        return self.conv2(tokens.transpose(1, 2).reshape(h.shape))


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("hessian", ["ggn-model-exact", "ggn-loss"])
def test_factors_equal_plain_curvlinops(kfac_approx, hessian):
    """Our float64 input-factor hook and scale conventions reproduce curvlinops' own factors."""
    from curvlinops import KFACLinearOperator

    torch.manual_seed(0)
    model = AttentionConvDenoiser().double().eval()
    images = _images(4, 1)
    n_samples = 2
    a_ours, b_ours = kfac_factors(
        model,
        SCHEDULE,
        images,
        hessian=hessian,
        kfac_approx=kfac_approx,
        n_samples=n_samples,
        seed=0,
        batch_size=3,
    )
    draws = draw_examples(range(4), n_samples, SHAPE, SCHEDULE.num_timesteps, seed=0, stream="fit")
    x0 = images.unsqueeze(1).expand(4, n_samples, *SHAPE).reshape(-1, *SHAPE)
    t = draws.t.reshape(-1)
    eps = draws.eps.reshape(-1, *SHAPE).double()
    data = [({"x_t": SCHEDULE.q_sample(x0, t, eps), "t": t}, eps.flatten(1))]
    layout = ParameterLayout.from_model(model)
    params = [dict(model.named_parameters())[n] for n in layout.param_names()]
    plain = KFACLinearOperator(
        _DictModel(model),
        nn.MSELoss(),
        params,
        data,
        fisher_type={"ggn-model-exact": "type-2", "ggn-loss": "empirical"}[hessian],
        kfac_approx=kfac_approx,
        separate_weight_and_bias=False,
        check_deterministic=False,
        batch_size_fn=lambda batch: batch["x_t"].shape[0],
    )
    plain.compute_kronecker_factors()
    state = plain.state_dict()
    scale = 1.0 / 16 if hessian == "ggn-loss" else 1.0  # our GGN^loss is of the pixel-mean loss
    for block, a, b in zip(layout.blocks, a_ours, b_ours, strict=True):
        name = f"model.{block.module}"
        torch.testing.assert_close(a, state["input_covariances"][name], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(
            b, state["gradient_covariances"][name] * scale, rtol=1e-10, atol=1e-13
        )
