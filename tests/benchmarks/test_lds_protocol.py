"""The LDS runner's protocol: damping chosen on held-out subsets, pairs at the default damping,
bootstrap intervals from one set of resamples (issue 11, items 4 and 6)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from benchmarks import lds
from benchmarks.metrics import (
    bootstrap_interval,
    cross_fitted_lds,
    fold_averaged_lds,
    paired_difference,
    subset_folds,
    summarize,
)
from benchmarks.pipeline import derived_seed
from tests.benchmarks.tiny import TINY_OVERRIDES

SWEEP = (1e-7, 1e-3, 1e1)


@pytest.fixture(scope="module")
def evaluated(tiny_cache, tmp_path_factory):
    cache = tmp_path_factory.mktemp("lds-protocol") / "cache"
    shutil.copytree(tiny_cache, cache)
    config = lds.LDSConfig(
        methods=("kfac", "random"),
        preset="smoke",
        overrides=TINY_OVERRIDES,
        damping_sweep=True,
        sweep=SWEEP,
        cache_dir=str(cache),
        out=str(tmp_path_factory.mktemp("out")),
        progress=False,
    )
    prepared = lds.prepare(config)
    cells = lds.evaluate_cells(config, prepared)
    lds.add_held_out_damping(cells, prepared)
    return prepared, cells


def test_the_sweep_includes_the_default_damping(evaluated):
    _, cells = evaluated
    dampings = {d for (n, t, d) in cells.lds if n == "kfac"}
    assert dampings == {*SWEEP, 1e-8}


def test_held_out_row_is_the_cross_fit_of_the_sweep_on_the_runs_folds(evaluated):
    prepared, cells = evaluated
    setting = prepared.setting
    by_damping = {d: p for (n, t, d), p in cells.predictions.items() if n == "kfac"}
    folds = subset_folds(setting.n_subsets, derived_seed(setting.seed, "damping-folds"))
    expected = cross_fitted_lds(by_damping, prepared.truth.mean_over_seeds("loss"), folds)
    np.testing.assert_array_equal(cells.held_out[("kfac", "loss")], expected.per_query)
    (row,) = [r for r in cells.rows if r.get("selection") == lds.HELD_OUT]
    assert row["method"] == "kfac" and np.isnan(row["damping"])
    assert row["chosen_damping"] == " | ".join(
        "-" if v is None else f"{v:g}" for v in expected.chosen
    )
    assert row["lds_mean"] == pytest.approx(summarize(expected.per_query).mean, nan_ok=True)
    assert ("random", "loss") not in cells.held_out  # no damping, nothing to choose
    # what tuning buys, like for like: the default damping scored on the same two folds
    default = fold_averaged_lds(by_damping[1e-8], prepared.truth.mean_over_seeds("loss"), folds)
    gain = paired_difference(expected.per_query, default)
    assert row["tuning_gain"] == pytest.approx(gain.mean, nan_ok=True)
    assert row["se_tuning_gain"] == pytest.approx(gain.standard_error, nan_ok=True)


def test_pairs_use_the_reference_at_its_default_damping(evaluated):
    _, cells = evaluated
    paired = lds.paired_differences(cells, "kfac")
    row = paired[(paired["method"] == "random") & paired["damping"].isna()].iloc[0]
    expected = paired_difference(
        cells.lds[("random", "loss", None)], cells.lds[("kfac", "loss", 1e-8)]
    )
    assert row["diff_mean"] == pytest.approx(expected.mean, nan_ok=True)
    assert not (paired["method"] == "kfac").any()


def test_every_ok_row_has_the_bootstrap_interval_of_the_runs_resamples(evaluated):
    prepared, cells = evaluated
    seed = derived_seed(prepared.setting.seed, "bootstrap")
    targets = prepared.truth.mean_over_seeds("loss")
    for (name, _, damping), predictions in cells.predictions.items():
        (row,) = [
            r
            for r in cells.rows
            if r["method"] == name
            and r.get("selection") != lds.HELD_OUT
            and (np.isnan(r["damping"]) if damping is None else r["damping"] == damping)
        ]
        expected = bootstrap_interval(predictions, targets, seed=seed)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(tuple(expected), nan_ok=True)
    ceiling = next(r for r in cells.rows if r["method"] == "noise-ceiling")
    assert "ci_low" in ceiling and "ci_high" in ceiling
