"""End-to-end ground-truth retraining: one model at a time vs vmapped ensembles.

Run with ``.venv/bin/python -m pytest perf/test_bench_groundtruth.py --benchmark-only``.

What the LDS pays for on the ``quick`` preset, end to end: ``benchmarks.groundtruth.
compute_ground_truth`` trains 8 subset models (4 subsets x 2 seeds; the preset has 32 x 2) with
the preset's subset recipe (750 Adam steps, ``--bench-gt-steps``), measures the loss and the
ELBO of the 32 stored queries on each (256 common MC draws) and stores models and measurements,
in a fresh artifact store every round. Once with ``ensemble_size=None`` (``train_model``, one
model per task) and once with the harness default (``DEFAULT_ENSEMBLE_SIZE`` members per
``train_ensemble`` task), in-process on one CPU thread. Times are CPU seconds of this process
(``process_time``), which other processes on a shared machine disturb less than wall time.
The base model (trained briefly here: it only generates the queries) is not timed.
"""

from __future__ import annotations

import dataclasses
import shutil
import time

import pytest
import torch

from benchmarks.groundtruth import DEFAULT_ENSEMBLE_SIZE, compute_ground_truth
from benchmarks.pipeline import get_base_model, get_queries, load_train_set
from benchmarks.settings import get_preset
from benchmarks.store import ArtifactStore

TARGET_SPEEDUP = 1.5  # the target, end to end on the quick preset (not asserted)
TARGETS = ("loss", "elbo")
_SECONDS: dict[str, float] = {}

pytestmark = pytest.mark.benchmark(timer=time.process_time)


@pytest.fixture(scope="module")
def gt_problem(request, tmp_path_factory):
    """(setting with 4 subsets x 2 seeds, store holding the base model and the queries)."""
    quick = get_preset("quick")
    steps = int(request.config.getoption("--bench-gt-steps"))
    setting = dataclasses.replace(
        quick,
        n_subsets=4,
        n_seeds=2,
        train=dataclasses.replace(quick.train, steps=150),  # the query generator only
        subset_train=dataclasses.replace(
            quick.subset_train,
            steps=steps,
            warmup_steps=min(quick.subset_train.warmup_steps, steps),
        ),
    )
    store = ArtifactStore(tmp_path_factory.mktemp("gt-store"))
    train_set = load_train_set(setting)
    with torch.random.fork_rng(devices=[]):
        base = get_base_model(setting, store, train_set, device=torch.device("cpu"), progress=False)
        get_queries(setting, store, base, device=torch.device("cpu"), progress=False)
    return setting, store, len(train_set)


def _run(benchmark, gt_problem, ensemble_size):
    setting, store, n_train = gt_problem

    def fresh_store():  # every round retrains: no stored model or measurement
        for kind in ("model", "measurement"):
            shutil.rmtree(store.root / kind, ignore_errors=True)

    def run():
        return compute_ground_truth(
            setting, store, TARGETS, n_train=n_train, ensemble_size=ensemble_size
        )

    gt = benchmark.pedantic(run, setup=fresh_store, rounds=1, iterations=1)
    for target in TARGETS:
        values = gt.values[target]  # [n_seeds, n_subsets, n_queries]
        assert (
            values.shape == (2, 4, setting.n_queries)
            and torch.isfinite(torch.as_tensor(values)).all()
        )
    models = setting.n_subsets * setting.n_seeds
    seconds = benchmark.stats.stats.min
    benchmark.extra_info["models"] = models
    benchmark.extra_info["steps per model"] = setting.subset_train.steps
    benchmark.extra_info["cpu seconds per model"] = seconds / models
    return seconds


def test_groundtruth_one_at_a_time(benchmark, gt_problem) -> None:
    _SECONDS["single"] = _run(benchmark, gt_problem, None)


def test_groundtruth_ensembles(benchmark, gt_problem, ratios) -> None:
    seconds = _run(benchmark, gt_problem, DEFAULT_ENSEMBLE_SIZE)
    baseline = _SECONDS.get("single")
    if baseline is None:
        pytest.skip("needs test_groundtruth_one_at_a_time in the same session for the ratio")
    models = 8
    ratios.record(
        benchmark,
        f"ground truth end to end: ensembles of {DEFAULT_ENSEMBLE_SIZE} / one at a time",
        baseline / seconds,
        at_least=TARGET_SPEEDUP,
        detail=f"{baseline / models:.1f} vs {seconds / models:.1f} CPU s per model "
        f"({models} models, train + measure + store)",
    )
