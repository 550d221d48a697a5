"""The contract every registered attribution method must meet (DESIGN.md, methods/base.py).

Parametrised at collection time over ``methods.available_methods()``: built-ins, decorator
registrations made before collection, and installed plugins (entry-point group
``diffusion_attribution.methods``) are all checked without being listed here.

Every check runs on both model backends (``diffusion.backends``): the harness U-Net and a tiny
diffusers ``UNet2DModel`` (skipped without diffusers).

For each method (skipped when ``availability()`` says it cannot run here; a method whose module
fails to import is an error):

- ``kind == "scores"``: ``score(ctx)`` is ``[n_queries, n_train]`` float64 and finite;
  ``kind == "subset-predictions"``: ``predict_subsets(ctx, masks)`` is ``[n_subsets, n_queries]``
  float64 and finite (when the context offers ``train_fn``/``measure_fn``, as here).
- determinism: a fresh instance with the same ``ctx.seed`` gives the same output
  (if ``method.deterministic``).
- invariance: each field in ``invariant_config_fields`` (e.g. batch sizes) does not change the
  scores beyond floating-point noise (and int8-quantisation steps).
- sign on a known answer (if ``method.knows_self_influence``): when the queries are training
  examples, each one's own score ranks, on average over the queries, within the top quarter of
  its row. Chance level (random scores) passes this with probability ~5 %, reversed scores
  never; the average (not every query) keeps it robust to the Monte Carlo noise of diffusion
  loss gradients.
"""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
import pytest

from methods import MethodContext, available_methods, get_method
from methods.base import AttributionMethod

METHOD_NAMES = available_methods()  # at collection: plugins and registrations included

BACKENDS = ("unet", "diffusers")
_OUTPUTS: dict[tuple[str, str], np.ndarray] = {}  # first output per (method, backend)
_CONTEXTS = {
    "unet": ("smoke_context", "self_influence_context"),
    "diffusers": ("diffusers_smoke_context", "diffusers_self_influence_context"),
}


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def smoke_ctx(backend: str, request: pytest.FixtureRequest) -> MethodContext:
    return request.getfixturevalue(_CONTEXTS[backend][0])


@pytest.fixture
def self_ctx(backend: str, request: pytest.FixtureRequest) -> MethodContext:
    return request.getfixturevalue(_CONTEXTS[backend][1])


def _build(name: str, **overrides) -> AttributionMethod:
    """The registered method ``name``; skips when it is unavailable here."""
    method = get_method(name).build(**overrides)
    available, reason = method.availability()
    if not available:
        pytest.skip(f"method {name!r} is unavailable here: {reason}")
    return method


def _masks(n_train: int) -> np.ndarray:
    """Three fixed half-size subsets ``# [3, n_train]`` bool."""
    rng = np.random.default_rng(0)
    masks = np.zeros((3, n_train), dtype=bool)
    for row in masks:
        row[rng.permutation(n_train)[: n_train // 2]] = True
    return masks


def _run(method: AttributionMethod, ctx: MethodContext) -> np.ndarray:
    if method.kind == "subset-predictions":
        if ctx.train_fn is None or ctx.measure_fn is None:
            pytest.skip("the context offers no train_fn/measure_fn")
        return method.predict_subsets(ctx, _masks(ctx.n_train))
    return method.score(ctx)


def _output(name: str, backend: str, ctx: MethodContext) -> np.ndarray:
    if (name, backend) not in _OUTPUTS:
        _OUTPUTS[name, backend] = _run(_build(name), ctx)
    return _OUTPUTS[name, backend]


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_output_shape_dtype_finite(name: str, backend: str, smoke_ctx: MethodContext) -> None:
    method = _build(name)
    out = _output(name, backend, smoke_ctx)
    assert isinstance(out, np.ndarray), f"{name} returned {type(out).__name__}, not an ndarray"
    if method.kind == "subset-predictions":
        expected = (3, smoke_ctx.n_queries)
    else:
        assert method.kind == "scores", f"{name}: unknown kind {method.kind!r}"
        expected = (smoke_ctx.n_queries, smoke_ctx.n_train)
    assert out.shape == expected
    assert out.dtype == np.float64
    assert np.isfinite(out).all()


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_deterministic_for_a_fixed_seed(name: str, backend: str, smoke_ctx: MethodContext) -> None:
    method = _build(name)
    if not method.deterministic:
        pytest.skip(f"{name} declares itself non-deterministic")
    first = _output(name, backend, smoke_ctx)
    again = _run(_build(name), smoke_ctx)
    scale = float(np.abs(first).max())
    np.testing.assert_allclose(again, first, rtol=1e-9, atol=1e-12 * scale)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_invariant_config_fields(name: str, smoke_ctx: MethodContext) -> None:
    method = _build(name)
    invariant = dict(method.invariant_config_fields)
    if not invariant:
        pytest.skip(f"{name} declares no invariant config fields")
    known = {f.name for f in fields(method.config)}
    for field_name, (a, b) in invariant.items():
        assert field_name in known, f"{name}: invariant field {field_name!r} is not in its Config"
        out_a = _run(type(method)(replace(method.config, **{field_name: a})), smoke_ctx)
        out_b = _run(type(method)(replace(method.config, **{field_name: b})), smoke_ctx)
        scale = float(np.abs(out_a).max())
        # float32 summation order, plus (for int8-compressed methods) a quantisation step
        np.testing.assert_allclose(
            out_b,
            out_a,
            rtol=1e-4,
            atol=2e-3 * scale,
            err_msg=f"{name}: scores change with {field_name}={a!r} vs {b!r}",
        )


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_self_influence_ranks_high(
    name: str, self_ctx: MethodContext, self_query_positions: tuple[int, ...]
) -> None:
    method = _build(name)
    if method.kind != "scores":
        pytest.skip(f"{name} gives no per-example scores")
    if not method.knows_self_influence:
        pytest.skip(f"{name} does not claim to rank a query's own training example high")
    scores = method.score(self_ctx)  # [n_self, n_train]
    n_train = self_ctx.n_train
    ranks = np.array(
        [int((row > row[j]).sum()) for row, j in zip(scores, self_query_positions, strict=True)]
    )  # 0 = the highest score of its row
    assert ranks.mean() < n_train / 4, (
        f"{name}: training examples used as queries rank themselves at {ranks.tolist()} "
        f"(0 = top) of {n_train}; expected an average in the top quarter"
    )
