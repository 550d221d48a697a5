"""The field's other methods on the ``quick`` problem: seconds against the gradient bound.

One case per method (issue 13: ``das``, ``journey-trak``, ``tracin``, ``unlearn``,
``trak-ensemble``, ``dtrak-ensemble``), and the same-run references ``kfac`` (the seconds of
``test_bench_scoring.py::test_kfac_score`` when it ran first; else timed here) and ``trak``.
Each method is built as a quick run builds it (``benchmarks.runner.build_method`` with the
preset's ``method_options``: TRAK's family gets ``proj_dim=4096`` and one 2 GiB projector
block) with its registry defaults, and its whole ``score(ctx)`` is timed once, with the bound
re-measured around it. Each case records:

- ``<name> seconds per query`` and ``<name> seconds per training example``: the seconds of the
  whole call divided by the 32 queries and by the 357 training examples;
- ``<name> / per-example gradient bound``: those seconds over ``(357 x 64 + 32 x 64)`` rows of
  the bound, what one Monte Carlo gradient of every training example and query costs at the
  forward + backward bound. The same denominator for every method, so the ratios compare
  methods; the detail string lists the passes the method makes beyond those rows.

What each method needs beyond the problem is prepared outside the timed call and its seconds
recorded apart:

- ``journey-trak``: the queries' sampling trajectories. The queries are sampled here with the
  harness sampler (``diffusion.sampling.sample``, as ``benchmarks.pipeline.get_queries`` samples
  a run's queries), 32 of them with their trajectories: in a run Journey-TRAK attributes sampled
  images along their own chains. The cost does not depend on the trajectories' content, only on
  their shape, so stand-in noising trajectories would time the same; sampling costs ~20 s.
- ``tracin``: the base model's checkpoints. TracIn-CP's real cost includes a rerun of the base
  model's training only when the base model was trained without them (the runner stores them
  on first use): the bench model's training is rerun with checkpoints once
  (``benchmarks.pipeline.train_base_model``, the pipeline's own call), checked bitwise against
  the bench model, and its seconds recorded as ``tracin: checkpoint training``.
- ``trak-ensemble``, ``dtrak-ensemble``: ``ctx.train_fn`` trains a member with the bench
  recipe (``--bench-train-steps`` steps, ``diffusion.train.train_model``) on its subset, inside
  the timed call (the method trains its members itself); the member training is timed inside
  the call and recorded as ``<name>: member training``, and the rest against the bound too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from conftest import BenchProblem, RatioRecorder, RowBound, run_timed

from benchmarks.pipeline import train_base_model
from benchmarks.runner import build_method
from diffusion.sampling import sample
from diffusion.train import evenly_spaced_steps, train_model
from diffusion.unet import UNet
from methods.base import AttributionMethod
from methods.context import MethodContext
from methods.das import DAS
from methods.journey_trak import JourneyTRAK
from methods.kfac import KFACInfluence
from methods.tracin import TracIn
from methods.trak import TRAK
from methods.trak_ensemble import TRAKEnsemble
from methods.unlearn import Unlearn

REFERENCES = ("kfac", "trak")
"""Same-run references: K-FAC influence (the paper's method) and TRAK (the new methods' base)."""
NEW_METHODS = ("das", "journey-trak", "tracin", "unlearn", "trak-ensemble", "dtrak-ensemble")
"""The methods issue 13 adds, by registry name."""


# ---------------------------------------------------------------------------------------------
# What a method needs beyond the problem, prepared outside the timed call
# ---------------------------------------------------------------------------------------------


class TimedTrainFn:
    """``ctx.train_fn`` for ensemble members: the bench recipe on a subset, seconds summed.

    Args:
        problem: the bench problem (its setting holds the U-Net, recipe and schedule).
    """

    def __init__(self, problem: BenchProblem) -> None:
        self.problem = problem
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, positions: torch.Tensor, seed: int) -> UNet:
        setting = self.problem.setting
        start = time.perf_counter()
        model = train_model(
            self.problem.train_images[torch.as_tensor(positions)],
            setting.unet,
            setting.train,
            seed=int(seed),
            schedule=setting.schedule,
        )
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return model


def bench_checkpoints(problem: BenchProblem, n_checkpoints: int) -> list[tuple[float, UNet]]:
    """The bench model's ``n_checkpoints`` evenly spaced training checkpoints (TracIn-CP).

    Reruns the bench model's training with checkpoints (``train_base_model``, the pipeline's
    call) and checks that the last one is the bench model bitwise, as the pipeline does.

    Args:
        problem: the bench problem.
        n_checkpoints: how many checkpoints K.

    Returns:
        K pairs ``(learning rate, model)`` in training order, as ``ctx.checkpoints_fn`` gives.
    """
    setting = problem.setting
    checkpoints = []
    train_base_model(
        setting,
        problem.train_images,
        device=torch.device("cpu"),
        progress=False,
        checkpoint_steps=evenly_spaced_steps(setting.train.steps, n_checkpoints),
        on_checkpoint=checkpoints.append,
    )
    final = problem.model.state_dict()
    differing = [n for n, v in checkpoints[-1].state_dict.items() if not torch.equal(final[n], v)]
    assert not differing, f"the checkpoint rerun is not the bench model's training: {differing}"
    models = []
    for checkpoint in checkpoints:
        model = UNet(setting.unet)
        model.load_state_dict(checkpoint.state_dict)
        models.append((checkpoint.learning_rate, model.eval()))
    return models


def _context(
    problem: BenchProblem, method: AttributionMethod, prepared: dict[str, Any]
) -> MethodContext:
    """The method's context: the problem plus what it needs, prepared (seconds in ``prepared``)."""
    overrides: dict[str, Any] = {}
    if method.needs_query_trajectories:
        start = time.perf_counter()
        result = sample(
            problem.model,
            problem.schedule,
            problem.n_queries,
            image_shape=tuple(problem.train_images.shape[1:]),
            generator=torch.Generator().manual_seed(problem.seed),
            return_trajectory=True,
        )
        overrides["query_images"] = result.images  # [n_queries, C, H, W]
        overrides["query_trajectories"] = result.trajectory  # [n_queries, T + 1, C, H, W]
        prepared["sampling seconds"] = time.perf_counter() - start
    if isinstance(method, TracIn):
        n_checkpoints = method.config.n_checkpoints
        start = time.perf_counter()
        checkpoints = bench_checkpoints(problem, n_checkpoints)
        prepared["checkpoint training seconds"] = time.perf_counter() - start

        def checkpoints_fn(n: int) -> list[tuple[float, UNet]]:
            assert n == n_checkpoints, f"checkpoints of count {n_checkpoints} prepared, {n} asked"
            return checkpoints

        overrides["checkpoints_fn"] = checkpoints_fn
    if isinstance(method, TRAKEnsemble):
        prepared["train_fn"] = overrides["train_fn"] = TimedTrainFn(problem)
    return problem.context(**overrides)


# ---------------------------------------------------------------------------------------------
# The passes each method makes beyond one gradient of every example and query
# ---------------------------------------------------------------------------------------------


def _passes(method: AttributionMethod, ctx: MethodContext, prepared: dict[str, Any]) -> str:
    """What ``method.score(ctx)`` computes, in rows of passes (the detail of its bound ratio)."""
    n, q = ctx.n_train, ctx.n_queries
    counts = ctx.sample_counts(getattr(method, "config", None))
    grads = f"{n} x {counts.grad} training + {q} x {counts.query} query gradient rows"
    cfg = getattr(method, "config", None)
    if isinstance(method, TRAKEnsemble):
        train = prepared["train_fn"]
        recipe = train.problem.setting.train
        return (
            f"{cfg.n_models} members (registry default) x ({grads}, proj_dim {cfg.proj_dim}); "
            f"member training {train.calls} x {recipe.steps} steps x {recipe.batch_size} rows = "
            f"{train.seconds:.1f} s inside the call"
        )
    if isinstance(method, JourneyTRAK):
        n_steps = len(method.timesteps(ctx.schedule.num_timesteps))
        return (
            f"{n} x {counts.grad} training gradient rows once + per step ({n_steps} steps): "
            f"{q} x {counts.query} query gradient rows + {q} forward rows (x0 prediction); "
            f"proj_dim {cfg.proj_dim}; queries sampled with trajectories outside the call "
            f"({prepared['sampling seconds']:.1f} s)"
        )
    if isinstance(method, TRAK):  # TRAK, D-TRAK, DAS
        extra = ""
        if isinstance(method, DAS):
            extra = f" + {n} x {counts.grad} forward rows (training-error weights)"
        return f"{grads}, proj_dim {cfg.proj_dim}{extra}"
    if isinstance(method, TracIn):
        return (
            f"per checkpoint ({cfg.n_checkpoints}): {grads}; checkpoint training outside the "
            f"call ({prepared['checkpoint training seconds']:.1f} s)"
        )
    if isinstance(method, Unlearn):
        forward = f"{n} x {cfg.loss_timesteps} forward rows"
        return (
            f"Fisher {n} x {counts.fit} per-draw gradient rows + {forward} (before) + per query "
            f"({q}): {cfg.steps} ascent step(s) x {counts.query} gradient rows + {forward}"
        )
    if isinstance(method, KFACInfluence):
        return f"{grads} + K-FAC fit {n} x {counts.fit} rows"
    return grads


# ---------------------------------------------------------------------------------------------
# The rows of one method
# ---------------------------------------------------------------------------------------------


def _record(
    ratios: RatioRecorder,
    benchmark: Any,
    problem: BenchProblem,
    name: str,
    seconds: float,
    bound: float,
    passes: str,
) -> None:
    """The three rows every method gets (module docstring)."""
    rows = problem.n_train * problem.grad_samples + problem.n_queries * problem.query_samples
    for unit, units, count in (
        ("query", "queries", problem.n_queries),
        ("training example", "training examples", problem.n_train),
    ):
        ratios.record(
            benchmark,
            f"{name} seconds per {unit}",
            seconds / count,
            unit="s",
            detail=f"{seconds:.1f} s / {count} {units}",
        )
    ratios.record(
        benchmark,
        f"{name} / per-example gradient bound",
        seconds / (rows * bound),
        detail=f"{seconds:.1f} s vs ({problem.n_train} x {problem.grad_samples} + "
        f"{problem.n_queries} x {problem.query_samples}) = {rows} rows x {bound * 1e6:.0f} us; "
        f"the method: {passes}",
    )


def _build(problem: BenchProblem, name: str) -> AttributionMethod:
    """Method ``name`` as a quick run builds it (the preset's options its config has)."""
    return build_method(name, dict(problem.setting.method_options))


def _timed_score(
    benchmark: Any, row_bound: RowBound, score: Callable[[], np.ndarray]
) -> tuple[np.ndarray, float, float]:
    """``(scores, seconds, per-row bound)`` of one timed call, the bound measured around it."""
    (scores, seconds), bound = row_bound.around(lambda: run_timed(benchmark, score, rounds=1))
    return scores, seconds, bound


@pytest.mark.parametrize("name", REFERENCES + NEW_METHODS)
def test_method_cost(
    name: str,
    benchmark,
    bench_problem: BenchProblem,
    row_bound: RowBound,
    ratios: RatioRecorder,
    bench_store: dict,
):
    """The whole ``score(ctx)`` of method ``name``, once; its rows against the bound."""
    p = bench_problem
    method = _build(p, name)
    available, reason = method.availability()
    if not available:
        pytest.skip(f"{name} is unavailable: {reason}")
    if name == "kfac" and "kfac_seconds" in bench_store:
        seconds, bound = bench_store["kfac_seconds"], bench_store["kfac_bound"]
        _record(ratios, None, p, name, seconds, bound, _passes(method, p.context(), {}))
        # Rows recorded from the same run's K-FAC case: nothing is timed again.
        pytest.skip("kfac: rows recorded from test_bench_scoring.py::test_kfac_score's seconds")

    prepared: dict[str, Any] = {}
    ctx = _context(p, method, prepared)
    scores, seconds, bound = _timed_score(benchmark, row_bound, lambda: method.score(ctx))
    assert scores.shape == (p.n_queries, p.n_train), f"{name}: scores of shape {scores.shape}"
    assert np.isfinite(scores).all(), f"{name}: non-finite scores"
    bench_store[f"{name}_seconds"] = seconds
    passes = _passes(method, ctx, prepared)
    benchmark.extra_info["passes"] = passes
    _record(ratios, benchmark, p, name, seconds, bound, passes)

    rows = p.n_train * p.grad_samples + p.n_queries * p.query_samples
    if "checkpoint training seconds" in prepared:
        ratios.record(
            benchmark,
            f"{name}: checkpoint training (outside the timed call)",
            prepared["checkpoint training seconds"],
            unit="s",
            detail=f"the bench model's {p.setting.train.steps}-step training rerun with "
            f"{method.config.n_checkpoints} checkpoints (stored and reused in a run)",
        )
    if "train_fn" in prepared:
        training = prepared["train_fn"].seconds
        ratios.record(
            benchmark,
            f"{name}: member training (inside the timed call)",
            training,
            unit="s",
            detail=f"{prepared['train_fn'].calls} members x {p.setting.train.steps} steps "
            f"(--bench-train-steps) on their subsets",
        )
        ratios.record(
            benchmark,
            f"{name} without member training / per-example gradient bound",
            (seconds - training) / (rows * bound),
            detail=f"{seconds - training:.1f} s (featurisation + scoring of every member) vs "
            f"{rows} rows x {bound * 1e6:.0f} us",
        )
