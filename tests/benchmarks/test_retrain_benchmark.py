"""The retraining-without-top-influences benchmark (benchmarks.retrain) end to end on the tiny
preset with two retrain queries."""

from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from benchmarks import retrain
from benchmarks.pipeline import (
    count_trainings,
    derived_seed,
    get_base_model,
    get_queries,
    load_train_set,
    measure_queries,
)
from benchmarks.retrain import (
    RANDOM_REMOVAL,
    RetrainBenchmarkConfig,
    RetrainTask,
    run_retrain_task,
)
from benchmarks.store import ArtifactStore
from methods import AttributionMethod
from methods.registry import REGISTRY, register_method
from tests.benchmarks.tiny import TINY_OVERRIDES, tiny_setting

CPU = torch.device("cpu")
OVERRIDES = {**TINY_OVERRIDES, "n_retrain_queries": 2}
FRACTIONS = (0.1, 0.25)


@dataclass(frozen=True)
class _NoOptions:
    """No options."""


class _NaNScores(AttributionMethod):
    """A broken method: NaN scores."""

    Config = _NoOptions

    def score(self, ctx):
        return np.full((ctx.n_queries, ctx.n_train), np.nan)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_cache):
    """One run with ``random`` and a broken method; the second run of the same config."""
    register_method("test-retrain-nan")(_NaNScores)
    root = tmp_path_factory.mktemp("retrain")
    shutil.copytree(tiny_cache, root / "cache")  # the base model and the queries
    config = RetrainBenchmarkConfig(
        methods=("random", "test-retrain-nan"),
        fractions=FRACTIONS,
        preset="smoke",
        overrides=OVERRIDES,
        cache_dir=str(root / "cache"),
        out=str(root / "out"),
        device="cpu",
        threads=1,
        progress=False,
    )
    try:
        table = retrain.run(config)
        trainings = count_trainings(ArtifactStore(root / "cache"))
        again = retrain.run(config)
    finally:
        REGISTRY.remove("test-retrain-nan")
    return config, table, trainings, again


def test_table_has_a_row_per_method_fraction_and_query(finished):
    _, table, _, _ = finished
    assert list(table.columns) == [
        "method",
        "fraction",
        "query",
        "measurement",
        "base",
        "retrained",
        "delta_loss",
    ]
    cells = set(zip(table["method"], table["fraction"], table["query"], strict=True))
    assert cells == set(itertools.product(["random", RANDOM_REMOVAL], FRACTIONS, [0, 1]))
    assert len(table) == len(cells) == 8  # the broken method has no rows
    assert (table["measurement"] == "loss").all()
    np.testing.assert_array_equal(table["delta_loss"], table["retrained"] - table["base"])
    assert table["retrained"].nunique() > 1


def test_base_column_is_the_base_models_own_measurement(finished):
    config, table, _, _ = finished
    setting = tiny_setting().replace(n_retrain_queries=2)
    store = ArtifactStore(config.cache_dir)
    model = get_base_model(setting, store, load_train_set(setting), device=CPU, progress=False)
    queries = get_queries(setting, store, model, device=CPU, progress=False)
    base = measure_queries(
        model,
        setting,
        queries,
        "loss",
        n_samples=setting.gt_mc_samples,
        device=CPU,
    )
    for q in (0, 1):
        assert (table.loc[table["query"] == q, "base"] == base[q]).all()
    assert base[0] != base[1]


def test_run_record_and_table_file(finished):
    config, table, _, _ = finished
    run_dir = Path(config.out) / "retrain" / tiny_setting().name
    records = sorted(run_dir.glob("*.run.json"))
    assert records and len(records) == len(list(run_dir.glob("*.retrain.csv")))
    doc = json.loads(records[-1].read_text())
    assert list(doc) == ["config", "setting", "provenance", "stages", "files", "result"]
    assert doc["config"]["methods"] == ["random", "test-retrain-nan"]
    assert doc["setting"]["n_retrain_queries"] == 2
    assert {"git_commit", "packages", "device"} <= set(doc["provenance"])
    assert {"data", "base_model", "queries", "methods", "retraining"} <= set(doc["stages"])
    assert doc["stages"]["retraining"]["seconds"] > 0
    assert doc["result"]["failed_tasks"] == []
    assert "non-finite" in doc["result"]["failed_methods"]["test-retrain-nan"]
    assert {r["method"] for r in doc["result"]["summary"]} == {"random", RANDOM_REMOVAL}
    csv = run_dir / doc["files"]["retrain"]
    assert csv.name.endswith(".retrain.csv")
    pd.testing.assert_frame_equal(pd.read_csv(csv), table, check_dtype=False)


def test_second_run_retrains_nothing(finished):
    config, table, trainings, again = finished
    assert trainings == 1 + 8  # the base model and one model per cell
    assert count_trainings(ArtifactStore(config.cache_dir)) == trainings
    pd.testing.assert_frame_equal(again, table)


def _task(config: RetrainBenchmarkConfig, query: int) -> RetrainTask:
    setting = tiny_setting().replace(n_retrain_queries=2)
    return RetrainTask(
        setting, config.cache_dir, None, tuple(range(24)), query, "loss", device="cpu"
    )


def test_retraining_on_everything_reproduces_the_base_measurement(finished):
    """Kept = all examples: the retrained model is the base model (same data, seed and
    recipe), so query 0's measurement is the base model's."""
    config, table, _, _ = finished
    base = table.loc[table["query"] == 0, "base"].iloc[0]
    assert run_retrain_task(_task(config, 0)) == base


def test_retrain_task_measures_query_q_with_its_own_draws(finished):
    """Query q >= 1 is measured with its own Monte Carlo draws (issue 11 item 1), those of its
    base value: retraining on everything reproduces it."""
    config, table, _, _ = finished
    base = table.loc[table["query"] == 1, "base"].iloc[0]
    assert run_retrain_task(_task(config, 1)) == base


def test_unchanged_model_gives_zero_delta_for_every_query(tmp_path, tiny_cache, monkeypatch):
    """A "retrained" model identical to the base model changes no query's measurement: every
    delta is exactly 0, so base and retrained values use the same draws for every query."""
    setting = tiny_setting().replace(n_queries=3, n_retrain_queries=3)
    shutil.copytree(tiny_cache, tmp_path / "cache")  # the base model
    store = ArtifactStore(tmp_path / "cache")
    base_model = get_base_model(setting, store, load_train_set(setting), device=CPU, progress=False)
    monkeypatch.setattr(retrain, "get_or_train_model", lambda *args, **kwargs: base_model)
    config = RetrainBenchmarkConfig(
        methods=("random",),
        fractions=(0.25,),
        preset="smoke",
        overrides={**TINY_OVERRIDES, "n_queries": 3, "n_retrain_queries": 3},
        cache_dir=str(tmp_path / "cache"),
        out=str(tmp_path / "out"),
        device="cpu",
        executor="local",  # in-process: the monkeypatched training must apply
        threads=1,
        progress=False,
    )
    table = retrain.run(config)
    assert sorted(set(table["query"])) == [0, 1, 2]
    assert len(table) == 6  # random and random-removal, three queries each
    assert table["base"].nunique() == 3
    assert (table["delta_loss"] == 0.0).all(), table


def test_a_random_removal_is_the_same_whatever_other_cells_the_run_has():
    """Cell (fraction, query) draws from its own seed: asking for more fractions or queries
    does not change it (the draw of the first version depended on the plan order)."""

    def plans(fractions, n_queries):
        setting = tiny_setting().replace(n_queries=4, n_retrain_queries=n_queries)
        prepared = SimpleNamespace(
            setting=setting,
            fractions=fractions,
            n_train=40,
            n_removed=lambda f: max(1, round(f * 40)),
        )
        return {(p.fraction, p.query): p.kept for p in retrain._random_plans(prepared)}

    small, large = plans((0.1,), 2), plans((0.02, 0.1), 4)
    for key, kept in small.items():
        np.testing.assert_array_equal(kept, large[key])
    assert len(small[(0.1, 0)]) == 36 and len(large[(0.02, 0)]) == 39
    assert not np.array_equal(large[(0.1, 0)], large[(0.1, 1)])  # queries differ
    expected_order = np.random.default_rng(derived_seed(0, "random-removal", 0.1, 1)).permutation(
        40
    )
    np.testing.assert_array_equal(large[(0.1, 1)], np.sort(expected_order[4:]))
