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
