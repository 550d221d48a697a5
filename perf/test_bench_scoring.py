"""Benchmarks of attribution scoring on the ``quick`` problem (see perf/README.md).

Cases (all on the quick model, 64 MC samples):

- ``test_bound_forward_backward``: the per-row bound (plain forward + backward of a batch).
- ``test_gradients_batched``: our per-example MC gradients (:mod:`methods.gradients`) for one
  chunk of 16 examples x 64 samples; ratio to the bound.
- ``test_gradients_per_example_batched``: a Python loop over the examples, the 64 samples of one
  example in one forward + backward (the simple approach a probe measured at 12x the loop);
  checks equal gradients.
- ``test_gradients_sample_loop``: the one-sample-at-a-time loop (one forward + backward per
  (example, sample)); checks equal gradients; our speedup over it.
- ``test_kfac_fit``: K-FAC curvature fit alone (on ``--bench-fit-examples``, default 96 of the
  357 examples: the fit is linear in N and the full fit is a phase of the next case); ratio to
  examples x fit samples rows of the bound.
- ``test_kfac_score``: the whole ``KFACInfluence.score`` (fit + 32 queries x all 357 training
  examples, no cache); ratio to its bound, with the phases (fit, query gradients, training
  gradients) timed inside the same call.
- ``test_trak_featurise``: TRAK (proj_dim 4096) scoring, featurisation timed inside.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from conftest import BenchProblem, Phases, RowBound, run_timed, timed_function, timed_generator

from methods.gradients import ParameterLayout, draw_examples, iter_gradient_chunks

CHUNK = 16
"""Examples per gradient chunk (``KFACInfluence.Config.batch_size``)."""
LOOP_EXAMPLES = 4
"""Examples of the one-sample-at-a-time loop (4 x 64 single-row passes; per-row cost compared)."""
TRAIN_STREAM = "train"


def _draws(problem: BenchProblem, n_items: int):
    """The draws our batched path uses for the first ``n_items`` training examples."""
    return draw_examples(
        range(n_items),
        problem.grad_samples,
        problem.train_images.shape[1:],
        problem.schedule.num_timesteps,
        seed=problem.seed,
        stream=TRAIN_STREAM,
    )


def _batched(problem: BenchProblem, n_items: int) -> torch.Tensor:
    """Our path: ``# [n_items, n_params]`` gradients of the MC-mean loss, one chunk."""
    (_, _, grads), *rest = list(
        iter_gradient_chunks(
            problem.model,
            problem.schedule,
            problem.train_images[:n_items],
            n_samples=problem.grad_samples,
            seed=problem.seed,
            stream=TRAIN_STREAM,
            batch_size=n_items,
        )
    )
    assert not rest
    return grads


def _reference_batched(problem: BenchProblem, store: dict) -> tuple[torch.Tensor, float | None]:
    """Batched gradients of the first CHUNK examples and their seconds per row (if timed)."""
    if "grad_batched" not in store:
        store["grad_batched"] = _batched(problem, CHUNK)
    return store["grad_batched"], store.get("grad_batched_per_row")


def _layout_grads(problem: BenchProblem, layout: ParameterLayout, loss: torch.Tensor):
    named = dict(problem.model.named_parameters())
    names = layout.param_names()
    grads = torch.autograd.grad(loss, [named[n] for n in names])
    return layout.flatten({n: g.unsqueeze(0) for n, g in zip(names, grads, strict=True)})[0]


class _Trainable:
    """Context: every model parameter requires grad (restored on exit)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = list(model.parameters())

    def __enter__(self) -> None:
        self.flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(True)

    def __exit__(self, *exc) -> None:
        for p, flag in zip(self.params, self.flags, strict=True):
            p.requires_grad_(flag)


def _per_example_batched(problem: BenchProblem, n_items: int) -> torch.Tensor:
    """Loop over examples; one forward + backward of an example's S samples each."""
    model, schedule = problem.model, problem.schedule
    layout = ParameterLayout.from_model(model)
    draws = _draws(problem, n_items)
    out = torch.empty(n_items, layout.n_params)
    with _Trainable(model):
        for j in range(n_items):
            x0 = problem.train_images[j].expand(
                problem.grad_samples, *problem.train_images.shape[1:]
            )
            eps = draws.eps[j]  # [S, C, H, W]
            x_t = schedule.q_sample(x0, draws.t[j], eps)
            loss = (eps - model(x_t, draws.t[j])).square().mean(dim=(1, 2, 3)).mean()
            out[j] = _layout_grads(problem, layout, loss)
    return out


def _sample_loop(problem: BenchProblem, n_items: int) -> torch.Tensor:
    """Loop over examples and samples: one forward + backward of a single row each."""
    model, schedule = problem.model, problem.schedule
    layout = ParameterLayout.from_model(model)
    draws = _draws(problem, n_items)
    n_samples = problem.grad_samples
    out = torch.zeros(n_items, layout.n_params)
    with _Trainable(model):
        for j in range(n_items):
            x0 = problem.train_images[j : j + 1]
            for s in range(n_samples):
                t = draws.t[j, s : s + 1]
                eps = draws.eps[j, s : s + 1]
                loss = (eps - model(schedule.q_sample(x0, t, eps), t)).square().mean()
                out[j] += _layout_grads(problem, layout, loss)
    return out / n_samples


def _assert_same_gradients(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    rel = ((got - want).norm(dim=1) / want.norm(dim=1)).max().item()
    assert rel < 1e-4, f"{what}: per-example gradients differ from the batched path (rel {rel:.2e})"


# ---------------------------------------------------------------------------------------------
# Per-example MC gradients
# ---------------------------------------------------------------------------------------------


def test_bound_forward_backward(benchmark, bench_problem, row_bound: RowBound, ratios):
    """The bound: a plain forward + backward of one batch at the fastest batch size."""
    size = row_bound.batch_size
    x_t, t, eps = row_bound._inputs(size)
    model = bench_problem.model

    def step() -> None:
        model.zero_grad(set_to_none=True)
        (eps - model(x_t, t)).square().mean(dim=(1, 2, 3)).sum().backward()

    with _Trainable(model):
        _, seconds = run_timed(benchmark, step, rounds=5, warmup_rounds=1)
    model.zero_grad(set_to_none=True)
    benchmark.extra_info["bound sweep us/row"] = {
        str(k): v * 1e6 for k, v in row_bound.sweep.items()
    }
    benchmark.extra_info["bound batch size"] = size
    ratios.record(
        benchmark,
        f"bound fwd+bwd (batch {size})",
        seconds / size * 1e6,
        unit="us/row",
        detail="sweep us/row: "
        + ", ".join(f"{k}: {v * 1e6:.0f}" for k, v in row_bound.sweep.items()),
    )


def test_gradients_batched(benchmark, bench_problem, row_bound: RowBound, ratios, bench_store):
    """Our batched path: per-example gradients of 16 examples x 64 samples (one chunk)."""
    rows = CHUNK * bench_problem.grad_samples
    (grads, seconds), bound = row_bound.around(
        lambda: run_timed(benchmark, lambda: _batched(bench_problem, CHUNK), rounds=3)
    )
    assert grads.shape[0] == CHUNK and torch.isfinite(grads).all()
    per_row = seconds / rows
    bench_store["grad_batched"] = grads
    bench_store["grad_batched_per_row"] = per_row
    ratios.record(benchmark, "grads batched", per_row * 1e6, unit="us/row")
    ratios.record(
        benchmark,
        "grads batched / bound",
        per_row / bound,
        detail=f"{per_row * 1e6:.0f} vs {bound * 1e6:.0f} us/row ({CHUNK} x "
        f"{bench_problem.grad_samples} rows)",
    )


def test_gradients_per_example_batched(
    benchmark, bench_problem, row_bound: RowBound, ratios, bench_store
):
    """The simple approach: loop over examples, batch the 64 samples of one example."""
    rows = CHUNK * bench_problem.grad_samples
    grads, seconds = run_timed(
        benchmark, lambda: _per_example_batched(bench_problem, CHUNK), rounds=2
    )
    reference, batched_per_row = _reference_batched(bench_problem, bench_store)
    _assert_same_gradients(grads, reference, "per-example batching")
    per_row = seconds / rows
    ratios.record(benchmark, "grads per-example batching", per_row * 1e6, unit="us/row")
    if batched_per_row is not None:
        ratios.record(
            benchmark,
            "grads batched speedup over per-example batching",
            per_row / batched_per_row,
            at_least=1.0,
            detail=f"{per_row * 1e6:.0f} vs {batched_per_row * 1e6:.0f} us/row",
        )


def test_gradients_sample_loop(benchmark, bench_problem, row_bound: RowBound, ratios, bench_store):
    """The one-sample-at-a-time loop over (example, sample) rows."""
    rows = LOOP_EXAMPLES * bench_problem.grad_samples
    grads, seconds = run_timed(
        benchmark, lambda: _sample_loop(bench_problem, LOOP_EXAMPLES), rounds=1
    )
    reference, batched_per_row = _reference_batched(bench_problem, bench_store)
    _assert_same_gradients(grads, reference[:LOOP_EXAMPLES], "one-sample loop")
    per_row = seconds / rows
    ratios.record(benchmark, "grads one-sample loop", per_row * 1e6, unit="us/row")
    if batched_per_row is not None:
        ratios.record(
            benchmark,
            "grads batched speedup over one-sample loop",
            per_row / batched_per_row,
            at_least=12.0,
            detail=f"{per_row * 1e6:.0f} vs {batched_per_row * 1e6:.0f} us/row; 12x = a probe's "
            "per-example batching",
        )


# ---------------------------------------------------------------------------------------------
# K-FAC
# ---------------------------------------------------------------------------------------------


def _factor_flops_per_row(model: torch.nn.Module, image_shape) -> tuple[float, float]:
    """(FLOPs of K-FAC expand's input-factor products, FLOPs of the layers' forward) per row.

    Per Linear/Conv2d layer with ``L`` shared positions, ``d_in`` inputs (+1 bias column) and
    ``d_out`` outputs: ``2 L d_in^2`` for ``A = sum a a^T`` and ``2 L d_in d_out`` forward.
    """
    totals = {"a": 0.0, "fwd": 0.0}

    def hook(module, args, out):
        if isinstance(module, torch.nn.Conv2d):
            positions = out.shape[2] * out.shape[3]
            d_in = module.weight[0].numel() + (module.bias is not None)
        else:
            positions = args[0].shape[1:-1].numel()
            d_in = module.in_features + (module.bias is not None)
        d_out = module.weight.shape[0]
        totals["a"] += 2.0 * positions * d_in * d_in
        totals["fwd"] += 2.0 * positions * d_in * d_out

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *image_shape), torch.zeros(1, dtype=torch.long))
    finally:
        for handle in handles:
            handle.remove()
    return totals["a"], totals["fwd"]


def _gemm_flops_per_second(dtype: torch.dtype) -> float:
    """Best-of-3 rate of 16 ``[4096, 145]`` Gram products (the input factor's product groups,
    ``methods.kfac_curvature._GRAM_GROUP_ROWS`` patch vectors of a 16-channel 3x3 convolution)."""
    from methods.kfac_curvature import _GRAM_GROUP_ROWS

    x = torch.randn(_GRAM_GROUP_ROWS, 145, dtype=dtype)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(16):
            x.T @ x
        best = min(best, (time.perf_counter() - start) / 16)
    return 2.0 * x.shape[0] * x.shape[1] ** 2 / best


def test_kfac_fit(benchmark, bench_problem, row_bound: RowBound, ratios, request):
    """K-FAC curvature (GGN^model, MC-Fisher, expand) alone, on ``--bench-fit-examples`` x 64.

    Linear in the examples, so the per-row ratio to the bound is that of the full set (whose
    fit is also timed, as a phase of ``test_kfac_score``).
    """
    from methods.kfac_curvature import fit_kfac

    p = bench_problem
    n_fit = int(request.config.getoption("--bench-fit-examples")) or p.n_train
    images = p.train_images[: min(n_fit, p.n_train)]

    def fit():
        return fit_kfac(
            p.model,
            p.schedule,
            images,
            n_samples=p.fit_samples,
            seed=p.seed,
            batch_size=p.batch_size,
        )

    (curvature, seconds), bound = row_bound.around(lambda: run_timed(benchmark, fit, rounds=1))
    for i, eig in enumerate(curvature.eig):
        assert torch.isfinite(eig).all() and eig.max() > 0, f"block {i}: degenerate K-FAC factors"
    rows = images.shape[0] * p.fit_samples
    benchmark.extra_info["fit examples"] = int(images.shape[0])
    ratios.record(benchmark, f"kfac fit ({images.shape[0]} examples)", seconds, unit="s")
    ratios.record(
        benchmark,
        "kfac fit / bound",
        seconds / (rows * bound),
        detail=f"{seconds:.1f} s vs {rows} rows x {bound * 1e6:.0f} us",
    )
    # What no K-FAC expand fit can beat: the input-factor Gram products alone, at this machine's
    # GEMM rate, on top of the forward + backward.
    a_flops, fwd_flops = _factor_flops_per_row(p.model, p.train_images.shape[1:])
    ratios.record(
        benchmark,
        "kfac fit: input-factor FLOPs / layer forward FLOPs",
        a_flops / fwd_flops,
        detail=f"{a_flops / 1e6:.1f} vs {fwd_flops / 1e6:.1f} MFLOP per row",
    )
    # Ours multiplies in float32 (summing groups in float64); float64 products for comparison.
    for dtype, label in ((torch.float32, "f32"), (torch.float64, "f64")):
        floor = bound + a_flops / _gemm_flops_per_second(dtype)
        ratios.record(
            benchmark,
            f"kfac fit floor ({label} factor GEMMs) / bound",
            floor / bound,
            detail=f"{floor * 1e6:.0f} us/row = bound + input-factor GEMMs in {label}",
        )
        if dtype == torch.float32:
            ratios.record(
                benchmark,
                "kfac fit / its f32 floor",
                seconds / rows / floor,
                detail="the fit's cost beyond forward + backward + input-factor GEMMs",
            )


def _phase_name(*args, **kwargs) -> str:
    return str(kwargs.get("desc", "gradients"))


def test_kfac_score(
    benchmark, bench_problem, row_bound: RowBound, ratios, bench_store, monkeypatch
):
    """The whole ``KFACInfluence.score(ctx)`` without cache: fit + 32 queries x 357 examples."""
    import methods.kfac as kfac_module
    from methods.kfac import KFACInfluence

    p = bench_problem
    ctx = p.context()
    phases = Phases()
    if hasattr(kfac_module, "fit_kfac"):
        monkeypatch.setattr(
            kfac_module, "fit_kfac", timed_function(kfac_module.fit_kfac, phases, "fit")
        )
    if hasattr(kfac_module, "iter_gradient_chunks"):
        monkeypatch.setattr(
            kfac_module,
            "iter_gradient_chunks",
            timed_generator(kfac_module.iter_gradient_chunks, phases, _phase_name),
        )

    def score() -> np.ndarray:
        phases.seconds.clear()
        return KFACInfluence().score(ctx)

    (scores, seconds), bound = row_bound.around(lambda: run_timed(benchmark, score, rounds=1))
    assert scores.shape == (p.n_queries, p.n_train) and np.isfinite(scores).all()
    bench_store["kfac_scores"] = scores
    bench_store["kfac_seconds"] = seconds
    bench_store["kfac_bound"] = bound

    fit_rows = p.n_train * p.fit_samples
    train_rows = p.n_train * p.grad_samples
    query_rows = p.n_queries * p.query_samples
    rows = fit_rows + train_rows + query_rows
    ratios.record(benchmark, "kfac score", seconds, unit="s")
    ratios.record(
        benchmark,
        "kfac score / bound",
        seconds / (rows * bound),
        at_most=1.3,
        detail=f"{seconds:.1f} s vs ({fit_rows} fit + {train_rows} train + {query_rows} query) "
        f"rows x {bound * 1e6:.0f} us",
    )
    phase_rows = {"fit": fit_rows, "query gradients": query_rows, "training gradients": train_rows}
    accounted = 0.0
    for name, value in sorted(phases.seconds.items()):
        accounted += value
        benchmark.extra_info[f"phase {name} s"] = value
        if name in phase_rows:
            ratios.record(
                benchmark,
                f"kfac score: {name} / bound",
                value / (phase_rows[name] * bound),
                detail=f"{value:.1f} s vs {phase_rows[name]} rows",
            )
    if phases.seconds:
        ratios.record(
            benchmark,
            "kfac score: time outside fit and gradients",
            seconds - accounted,
            unit="s",
            detail="preconditioning, quantisation, products, bookkeeping",
        )


# ---------------------------------------------------------------------------------------------
# TRAK
# ---------------------------------------------------------------------------------------------


def test_trak_featurise(benchmark, bench_problem, row_bound: RowBound, ratios, monkeypatch):
    """TRAK scoring (proj_dim 4096, CPU projector): featurisation of 357 x 64 timed inside."""
    try:
        import trak.traker as traker_module
    except ImportError:  # pragma: no cover - traker is a dependency
        pytest.skip("traker is not installed")
    from methods.trak import TRAK, TRAKConfig

    p = bench_problem
    phases = Phases()
    cls = traker_module.TRAKer
    monkeypatch.setattr(cls, "featurize", timed_function(cls.featurize, phases, "featurise"))
    monkeypatch.setattr(
        cls, "finalize_features", timed_function(cls.finalize_features, phases, "finalise")
    )
    config = TRAKConfig(proj_dim=p.proj_dim)

    def score() -> np.ndarray:
        phases.seconds.clear()
        return TRAK(config).score(p.context())

    (scores, seconds), bound = row_bound.around(lambda: run_timed(benchmark, score, rounds=1))
    assert scores.shape == (p.n_queries, p.n_train) and np.isfinite(scores).all()
    featurise = phases.seconds.get("featurise", float("nan"))
    train_rows = p.n_train * p.grad_samples
    rows = train_rows + p.n_queries * p.query_samples  # TRAK queries use query_samples
    for name, value in phases.seconds.items():
        benchmark.extra_info[f"phase {name} s"] = value
    ratios.record(benchmark, f"trak featurise (proj_dim {p.proj_dim})", featurise, unit="s")
    ratios.record(
        benchmark,
        "trak featurise / bound",
        featurise / (train_rows * bound),
        detail=f"{featurise:.1f} s vs {train_rows} rows x {bound * 1e6:.0f} us",
    )
    ratios.record(
        benchmark,
        "trak score / bound",
        seconds / (rows * bound),
        detail=f"{seconds:.1f} s (featurise + finalise + queries) vs {rows} rows",
    )
