"""DAS against a closed form computed here from independent per-draw gradients.

Reference (float64, explicit loop over examples and draws, plain autograd): each draw's gradient
of the mean model output, normalised to unit norm, averaged over the example's draws (the
authors' ``03_grad.py``); the TRAK solve with the identity projection; each training column
multiplied by ``mean_s sqrt(loss_s) / ||sqrt(loss)||`` (their ``07_score.py``).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from methods import create_method
from methods.das import DASConfig
from methods.gradients import draw_examples
from methods.trak import QUERY_STREAM, TRAIN_STREAM
from tests.methods.test_trak import (
    SCHEDULE,
    SIDE,
    T,
    TinyEps,
    assert_scores_close,
    closed_form,
    make_ctx,
    n_params,
)


def _draw_values(model, x0, t, eps):
    """(mean model output, loss) of one draw, written out from the formulas."""
    abar = SCHEDULE.alpha_bars[t]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    out = model(x_t[None], t.reshape(1))[0]
    return out.mean(), ((eps - out) ** 2).mean()


def reference(model, images, stream, n_samples, seed, hflip):
    """``(G # [n, p], w # [n])``: normalised-draw gradients and normalised training errors."""
    model64 = copy.deepcopy(model).double()
    params = list(model64.parameters())
    grads, weights = [], []
    for i in range(images.shape[0]):
        d = draw_examples([i], n_samples, (1, SIDE, SIDE), T, seed=seed, stream=stream, hflip=hflip)
        total, errors = 0, []
        for s in range(n_samples):
            x0 = images[i].double()
            x0 = x0.flip(-1) if d.flip is not None and bool(d.flip[0, s]) else x0
            mean, loss = _draw_values(model64, x0, d.t[0, s], d.eps[0, s].double())
            g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(mean, params)])
            total = total + g / (g.norm() + 1e-8) / n_samples
            errors.append(loss.detach().sqrt())
        e = torch.stack(errors)
        grads.append(total)
        weights.append((e / (e.norm() + 1e-8)).mean())
    return torch.stack(grads), torch.stack(weights)


@pytest.mark.parametrize("hflip", [False, True])
def test_das_identity_projection_equals_closed_form(hflip):
    model = TinyEps(hidden=3, seed=2)
    ctx = make_ctx(model, 6, 3, hflip=hflip, measurement="elbo")  # DAS ignores the measurement
    g_train, w = reference(model, ctx.train_images, TRAIN_STREAM, ctx.grad_samples, 7, hflip)
    g_query, _ = reference(model, ctx.query_images, QUERY_STREAM, ctx.query_samples, 7, False)
    ridge = 0.05 * float((g_train**2).sum()) / 6
    damping = ridge / (6 * n_params(model))
    method = create_method("das", projector="identity", damping=damping, batch_size=4)
    expected = closed_form(g_train, g_query, ridge) * w.numpy()[None, :]
    scores = method.score(ctx)
    assert scores.shape == (3, 6) and scores.dtype == np.float64
    assert_scores_close(scores, expected)
    # the two DAS ingredients both matter: neither weighting nor normalisation is a no-op
    unweighted = create_method(
        "das", projector="identity", damping=damping, error_weighting=False
    ).score(ctx)
    assert_scores_close(unweighted, closed_form(g_train, g_query, ridge))
    assert not np.allclose(unweighted, scores, rtol=1e-3)
    raw = create_method("das", projector="identity", damping=damping, normalize_draws=False)
    assert not np.allclose(raw.score(ctx), scores, rtol=1e-3)


def test_das_defaults_and_validation():
    assert DASConfig().output_function == "mean-output"
    assert DASConfig().proj_dim == 4096 and DASConfig().normalize_draws
    with pytest.raises(ValueError, match="output_function"):
        DASConfig(output_function="loss")
    with pytest.raises(ValueError, match="error_weighting"):
        DASConfig(error_weighting=1)
