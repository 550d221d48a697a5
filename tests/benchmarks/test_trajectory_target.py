"""``--target trajectory-logprob`` end to end: queries stored with their trajectories, a ground
truth that measures it, K-FAC and TRAK that predict it (issue 11, item 3)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from benchmarks import lds
from benchmarks.groundtruth import (
    compute_ground_truth,
    ground_truth_seed,
    model_spec,
    subset_masks,
)
from benchmarks.pipeline import (
    TRAINING_LOG,
    QuerySet,
    load_train_set,
    measure_queries,
    queries_spec,
)
from benchmarks.store import ArtifactStore
from diffusion.ensemble import train_ensemble
from tests.benchmarks.tiny import TINY_OVERRIDES, tiny_setting

TARGET = "trajectory-logprob"


@pytest.fixture(scope="module")
def trajectory_run(tiny_cache, tmp_path_factory):
    cache = tmp_path_factory.mktemp("trajectory-target") / "cache"
    shutil.copytree(tiny_cache, cache)
    config = lds.LDSConfig(
        methods=("kfac", "trak"),
        preset="smoke",
        overrides=TINY_OVERRIDES,
        targets=(TARGET,),
        cache_dir=str(cache),
        out=str(tmp_path_factory.mktemp("out")),
        progress=False,
    )
    return lds.run(config), ArtifactStore(cache)


def test_kfac_and_trak_predict_the_trajectory_logprob(trajectory_run):
    result, _ = trajectory_run
    rows = result.summary[result.summary["method"].isin(["kfac", "trak"])]
    assert set(rows["method"]) == {"kfac", "trak"}
    assert (rows["status"] == "ok").all(), rows[["method", "status", "reason"]]
    assert (rows["target"] == TARGET).all()
    assert np.isfinite(rows["lds_mean"].to_numpy(dtype=float)).all()


def test_the_trajectory_queries_have_the_plain_queries_images(trajectory_run):
    _, store = trajectory_run
    setting = tiny_setting()
    plain = store.load_tensors("queries", queries_spec(setting, with_trajectories=False))
    with_trajectories = store.load_tensors("queries", queries_spec(setting, True))
    assert torch.equal(plain["images"], with_trajectories["images"])
    assert torch.equal(with_trajectories["trajectories"][:, -1], plain["images"])


def test_the_ground_truth_is_a_direct_measurement_of_a_retrained_model(trajectory_run):
    _, store = trajectory_run
    setting = tiny_setting()
    train_set = load_train_set(setting)
    truth = compute_ground_truth(setting, store, (TARGET,), n_train=len(train_set))  # cached
    subset, seed_index = 1, 1
    positions = np.flatnonzero(subset_masks(len(train_set), setting)[subset])
    seed = ground_truth_seed(setting, subset, seed_index)
    (model,) = train_ensemble(  # a member's weights do not depend on its ensemble's others
        train_set.images,
        [torch.as_tensor(positions)],
        setting.unet,
        setting.subset_train,
        seeds=[seed],
        schedule=setting.schedule,
        device=torch.device("cpu"),
    )
    stored = store.load_tensors("queries", queries_spec(setting, with_trajectories=True))
    queries = QuerySet(stored["images"], stored["trajectories"])
    direct = measure_queries(
        model, setting, queries, TARGET, n_samples=setting.gt_mc_samples, device=torch.device("cpu")
    )
    np.testing.assert_array_equal(truth.values[TARGET][seed_index, subset], direct)
    assert np.isfinite(direct).all()


def test_missing_trajectories_fail_before_any_training(tiny_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)  # plain queries only
    setting, store = tiny_setting(), ArtifactStore(cache)
    trainings = (cache / TRAINING_LOG).read_text()  # the base model's
    with pytest.raises(ValueError, match="trajectories"):
        compute_ground_truth(setting, store, ("loss", TARGET), n_train=setting.n_train)
    assert (cache / TRAINING_LOG).read_text() == trainings
    positions = np.flatnonzero(subset_masks(setting.n_train, setting)[0])
    seed = ground_truth_seed(setting, 0, 0)
    spec = model_spec(setting, "subset_model", positions, seed, trainer="ensemble")
    assert not store.exists("model", spec)
