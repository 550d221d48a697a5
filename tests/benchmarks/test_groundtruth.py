"""Ground truth: subsets, resumption, and identical results on every executor."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from benchmarks.executors import (
    AutoExecutor,
    LocalExecutor,
    PoolExecutor,
    RayExecutor,
    make_executor,
)
from benchmarks.groundtruth import compute_ground_truth, subset_masks
from benchmarks.pipeline import count_trainings, get_base_model, get_queries, load_train_set
from benchmarks.store import ArtifactStore
from tests.benchmarks.tiny import tiny_setting


def _prepare(root):
    setting = tiny_setting()
    store = ArtifactStore(root)
    train_set = load_train_set(setting)
    model = get_base_model(setting, store, train_set, device=torch.device("cpu"), progress=False)
    get_queries(setting, store, model, device=torch.device("cpu"), progress=False)
    return setting, store, len(train_set)


def test_subset_masks_are_half_and_seeded():
    setting = tiny_setting()
    masks = subset_masks(24, setting)
    assert masks.shape == (setting.n_subsets, 24) and masks.dtype == bool
    assert (masks.sum(axis=1) == 12).all()
    assert np.array_equal(masks, subset_masks(24, setting))
    assert not np.array_equal(masks, subset_masks(24, setting.replace(seed=1)))
    assert len({m.tobytes() for m in masks}) == setting.n_subsets  # distinct subsets


def test_ground_truth_resumes_without_retraining(tmp_path):
    setting, store, n_train = _prepare(tmp_path)
    before = count_trainings(store)
    first = compute_ground_truth(
        setting, store, ["loss"], n_train=n_train, executor=LocalExecutor(progress=False)
    )
    trained = count_trainings(store) - before
    assert trained == setting.n_subsets * setting.n_seeds
    again = compute_ground_truth(
        setting, store, ["loss", "elbo"], n_train=n_train, executor=LocalExecutor(progress=False)
    )
    assert count_trainings(store) - before == trained  # elbo measured on stored models
    np.testing.assert_array_equal(first.values["loss"], again.values["loss"])
    assert again.values["elbo"].shape == (setting.n_seeds, setting.n_subsets, 2)
    # The target differs between models trained on different subsets.
    assert np.ptp(first.values["loss"], axis=1).min() > 0


@pytest.mark.slow
def test_pool_and_ray_match_in_process(tmp_path):
    """Acceptance (issue 6): a local Ray cluster (2 CPUs) computes the same ground truth as
    the in-process executor; so does the process pool."""
    results = {}
    executors = {
        "local": LocalExecutor(progress=False),
        "pool": PoolExecutor(workers=2, progress=False),
        "ray": RayExecutor(num_cpus=2, progress=False),
    }
    for name, executor in executors.items():
        setting, store, n_train = _prepare(tmp_path / name)
        truth = compute_ground_truth(setting, store, ["loss"], n_train=n_train, executor=executor)
        results[name] = truth.values["loss"]
        assert count_trainings(store) == 1 + setting.n_subsets * setting.n_seeds
    np.testing.assert_array_equal(results["local"], results["pool"])
    np.testing.assert_array_equal(results["local"], results["ray"])


def _flaky(task):
    if task == 1:
        raise RuntimeError("boom")
    return task * 10


def test_failed_tasks_are_reported_by_key_and_others_finish():
    outcomes = LocalExecutor(max_retries=2, progress=False).map(_flaky, [0, 1, 2], ["a", "b", "c"])
    assert [o.ok for o in outcomes] == [True, False, True]
    assert outcomes[1].key == "b" and "boom" in outcomes[1].error and outcomes[1].attempts == 3
    assert outcomes[2].value == 20


def test_the_auto_executor_uses_a_pool_only_for_several_tasks_and_cores():
    auto = AutoExecutor(workers=4, progress=False)
    assert isinstance(auto.choose(1), LocalExecutor)
    assert isinstance(auto.choose(0), LocalExecutor)
    pool = auto.choose(3)
    assert isinstance(pool, PoolExecutor) and pool.workers == 3
    assert isinstance(AutoExecutor(workers=1).choose(8), LocalExecutor)
    assert isinstance(make_executor("auto", workers=2), AutoExecutor)


def test_a_stored_ground_truth_sends_no_task_to_the_executor(tiny_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    setting, store = tiny_setting(), ArtifactStore(cache)
    first = compute_ground_truth(
        setting, store, ["loss"], n_train=24, executor=LocalExecutor(progress=False)
    )
    calls = []

    class Recorder(LocalExecutor):
        def map(self, fn, tasks, keys, desc=""):
            calls.append(len(tasks))
            return super().map(fn, tasks, keys, desc)

    again = compute_ground_truth(setting, store, ["loss"], n_train=24, executor=Recorder())
    assert calls == [0]
    np.testing.assert_array_equal(again.values["loss"], first.values["loss"])


def test_shared_subset_seeds_are_common_random_numbers_across_subsets(tmp_path):
    """``subset_seeds="shared"``: the k-th model of every subset has seed k's seed, so the
    models of one seed index start from the same weights (through the real ensemble trainer),
    and the scheme changes no other seed; an unknown scheme is a usage error naming both."""
    from benchmarks.errors import UsageError
    from benchmarks.groundtruth import get_or_train_models, ground_truth_seed

    independent = tiny_setting().replace(n_subsets=4, n_seeds=3)
    shared = independent.replace(subset_seeds="shared")
    grid = [[ground_truth_seed(shared, m, k) for m in range(4)] for k in range(3)]
    assert all(len(set(row)) == 1 for row in grid) and len({row[0] for row in grid}) == 3
    per_model = {ground_truth_seed(independent, m, k) for m in range(4) for k in range(3)}
    assert len(per_model) == 12 and not per_model & {row[0] for row in grid}

    # One step at a negligible learning rate: each model is its initial weights to ~1e-9.
    frozen = shared.replace(subset_train={"steps": 1, "warmup_steps": 0, "lr": 1e-12})
    train_set = load_train_set(frozen)
    masks = subset_masks(len(train_set), frozen)
    members = [
        (np.flatnonzero(masks[m]), ground_truth_seed(frozen, m, k))
        for k, m in ((0, 0), (0, 1), (1, 0))
    ]
    a, b, c = (
        torch.cat([p.detach().flatten() for p in model.parameters()])
        for model in get_or_train_models(
            frozen,
            ArtifactStore(tmp_path),
            train_set.images,
            members,
            "subset_model",
            device=torch.device("cpu"),
            keep=False,
        )
    )
    assert not np.array_equal(masks[0], masks[1])
    torch.testing.assert_close(a, b, rtol=0, atol=1e-8)  # subsets 0 and 1, seed index 0
    assert (a - c).abs().max() > 1e-3  # seed index 1 starts elsewhere

    with pytest.raises(UsageError, match="independent, shared"):
        independent.replace(subset_seeds="common")


def test_the_ensemble_size_option_reaches_the_ground_truth(monkeypatch):
    """``--ensemble-size`` (RunOptions) is passed to ``compute_ground_truth``; 0 is a usage
    error."""
    from benchmarks import runner
    from benchmarks.bundle import main as groundtruth_main

    seen = {}
    monkeypatch.setattr(
        runner,
        "compute_ground_truth",
        lambda *a, **kw: seen.setdefault("size", kw["ensemble_size"]),
    )
    experiment = runner.Experiment(
        tiny_setting(),
        None,
        None,
        torch.zeros(24, 1, 8, 8),
        None,
        torch.device("cpu"),
        ensemble_size=32,
    )
    experiment.ground_truth(["loss"])
    assert seen["size"] == 32
    with pytest.raises(SystemExit) as exit_info:
        groundtruth_main(["--preset", "smoke", "--ensemble-size", "0"])
    assert exit_info.value.code == 2
