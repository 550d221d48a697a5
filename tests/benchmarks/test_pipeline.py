"""The shared inputs (benchmarks.pipeline): stored once and reused, seeds, the measurement
protocol, and the one get-or-train path of every model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import pipeline
from benchmarks.groundtruth import get_or_train_model
from benchmarks.pipeline import (
    BASE_CHECKPOINTS_KIND,
    BaseCheckpointsMismatchError,
    QuerySet,
    base_checkpoints_spec,
    base_model_spec,
    count_trainings,
    derived_seed,
    get_base_checkpoints,
    get_base_model,
    get_queries,
    load_train_set,
    measure_queries,
    measurement_draws,
)
from benchmarks.store import ArtifactStore
from diffusion.measurements import measure_many
from diffusion.train import evenly_spaced_steps, learning_rate
from methods import MethodUnavailableError
from tests.benchmarks.tiny import tiny_setting

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    setting = tiny_setting()
    store = ArtifactStore(tmp_path_factory.mktemp("pipeline") / "cache")
    train_set = load_train_set(setting)
    model = get_base_model(setting, store, train_set, device=CPU, progress=False)
    queries = get_queries(setting, store, model, device=CPU, progress=False)
    return setting, store, train_set, model, queries


def _weights(model) -> list[torch.Tensor]:
    return [t for _, t in sorted(model.state_dict().items())]


def test_base_model_is_stored_and_reused(prepared):
    setting, store, train_set, model, _ = prepared
    assert count_trainings(store) == 1
    again = get_base_model(setting, store, train_set, device=CPU, progress=False)
    assert count_trainings(store) == 1  # loaded, not trained
    for a, b in zip(_weights(model), _weights(again), strict=True):
        assert torch.equal(a, b)


def test_queries_are_stored_and_reused(prepared, monkeypatch):
    setting, store, _, model, queries = prepared
    assert queries.images.shape == (setting.n_queries, 1, 8, 8) and queries.trajectories is None

    def no_sampling(*args, **kwargs):
        raise AssertionError("stored queries must be loaded, not sampled again")

    monkeypatch.setattr(pipeline, "sample", no_sampling)
    again = get_queries(setting, store, model, device=CPU, progress=False)
    assert torch.equal(again.images, queries.images)


def test_derived_seed_is_deterministic_and_distinct():
    seeds = [
        derived_seed(0, "queries"),
        derived_seed(1, "queries"),
        derived_seed(0, "measure", 0),
        derived_seed(0, "measure", 1),
        derived_seed(0, "measure", "1"),
    ]
    assert seeds[0] == derived_seed(0, "queries")
    assert len(set(seeds)) == len(seeds)
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in seeds)


def test_measure_queries_uses_each_querys_own_draws(prepared):
    setting, _, _, model, queries = prepared
    n_samples = setting.gt_mc_samples
    values = measure_queries(model, setting, queries, "loss", n_samples=n_samples, device=CPU)
    assert values.shape == (setting.n_queries,) and values.dtype == np.float64
    for q in range(setting.n_queries):
        draws = measurement_draws(setting, q, n_samples, queries.images.shape[1:])
        with torch.no_grad():
            expected = measure_many(
                ("loss",), model, setting.schedule, queries.images[q : q + 1], draws
            )["loss"]
        assert values[q] == float(expected[0])
    # The draws depend on the query's index, not on its image: the same image measured as
    # query 0 and as query 1 gives two different values.
    twice = QuerySet(queries.images[[0, 0]], None)
    both = measure_queries(model, setting, twice, "loss", n_samples=n_samples, device=CPU)
    assert both[0] == values[0] and both[1] != both[0]


def test_get_or_train_model_trains_once_and_keep_false_stores_nothing(prepared):
    setting, store, train_set, _, _ = prepared
    positions = np.arange(0, 24, 2)
    before = count_trainings(store)
    args = (setting, store, train_set.images, positions, 5, "subset_model")
    first = get_or_train_model(*args, device=CPU)
    second = get_or_train_model(*args, device=CPU)
    assert count_trainings(store) == before + 1
    for a, b in zip(_weights(first), _weights(second), strict=True):
        assert torch.equal(a, b)  # the stored copy is the trained model, bitwise
    get_or_train_model(
        setting, store, train_set.images, positions, 6, "subset_model", device=CPU, keep=False
    )
    assert count_trainings(store) == before + 2
    assert len(store.list("model")) == 1


def test_base_checkpoints_are_the_base_training_and_stored_once(prepared):
    setting, store, train_set, model, _ = prepared
    before = count_trainings(store)
    checkpoints = get_base_checkpoints(setting, store, train_set.images, 3, device=CPU)
    assert count_trainings(store) == before + 1  # the base training rerun with checkpoints
    again = get_base_checkpoints(setting, store, train_set.images, 3, device=CPU)
    assert count_trainings(store) == before + 1  # loaded, not trained
    steps = evenly_spaced_steps(setting.train.steps, 3)
    assert steps == (4, 8, 12)
    assert [lr for lr, _ in checkpoints] == [learning_rate(setting.train, s - 1) for s in steps]
    for (lr, a), (lr_again, b) in zip(checkpoints, again, strict=True):
        assert lr == lr_again
        assert all(torch.equal(x, y) for x, y in zip(_weights(a), _weights(b), strict=True))
    # the last checkpoint is the stored base model, the first one differs from it
    assert all(
        torch.equal(x, y)
        for x, y in zip(_weights(checkpoints[-1][1]), _weights(model), strict=True)
    )
    assert not all(
        torch.equal(x, y) for x, y in zip(_weights(checkpoints[0][1]), _weights(model), strict=True)
    )
    assert store.exists(BASE_CHECKPOINTS_KIND, base_checkpoints_spec(setting, 3))
    assert base_checkpoints_spec(setting, 3)["setting"] == base_model_spec(setting)["setting"]
    assert not store.exists(BASE_CHECKPOINTS_KIND, base_checkpoints_spec(setting, 2))


def test_base_checkpoints_refuse_another_base_model(prepared, tmp_path):
    setting, _, train_set, model, _ = prepared
    store = ArtifactStore(tmp_path / "cache")
    other = {name: value + 1 for name, value in model.state_dict().items()}
    store.save_state_dict("base-model", base_model_spec(setting), other)
    # a MethodUnavailableError: the runner reports TracIn as unavailable here, with this reason
    assert issubclass(BaseCheckpointsMismatchError, MethodUnavailableError)
    with pytest.raises(BaseCheckpointsMismatchError, match="did not reproduce the stored base"):
        get_base_checkpoints(setting, store, train_set.images, 2, device=CPU)
    assert not store.exists(BASE_CHECKPOINTS_KIND, base_checkpoints_spec(setting, 2))


def test_base_checkpoints_store_the_base_model_when_absent(prepared, tmp_path):
    setting, _, train_set, model, _ = prepared
    store = ArtifactStore(tmp_path / "cache")
    get_base_checkpoints(setting, store, train_set.images, 1, device=CPU, progress=False)
    assert count_trainings(store) == 1
    loaded = get_base_model(setting, store, train_set, device=CPU, progress=False)
    assert count_trainings(store) == 1  # the checkpoints' training stored the base model
    assert all(torch.equal(x, y) for x, y in zip(_weights(loaded), _weights(model), strict=True))
