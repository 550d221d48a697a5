"""Every LDS table pairs each method with the best similarity baseline of the run and carries
the regime diagnostic (issue 16, items 1 and 2)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from benchmarks import lds, reports
from benchmarks.pipeline import derived_seed, load_held_out_set, load_train_set
from benchmarks.regime import footer_text, regime_diagnostic
from benchmarks.results import format_table, load_influence_examples, result_row
from tests.benchmarks.tiny import TINY_OVERRIDES, tiny_setting


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of ``a - b`` (written out: numpy, ddof 1)."""
    d = a - b
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))


def _cells() -> lds.Cells:
    rng = np.random.default_rng(0)
    lds_of = {
        ("pixel", "loss", None): rng.normal(0.1, 0.1, 8),
        ("pixel-l2", "loss", None): rng.normal(0.3, 0.1, 8),
        ("kfac", "loss", 1e-8): rng.normal(0.5, 0.1, 8),
        ("kfac", "loss", 1e-3): rng.normal(0.4, 0.1, 8),
        ("pixel", "elbo", None): rng.normal(0.2, 0.1, 8),  # the best on elbo
        ("pixel-l2", "elbo", None): rng.normal(0.0, 0.1, 8),
        ("kfac", "elbo", 1e-8): rng.normal(0.5, 0.1, 8),
    }
    cells = lds.Cells(lds=dict(lds_of), default_damping={"kfac": 1e-8})
    for (name, target, damping), values in lds_of.items():
        cells.rows.append(result_row(name, target, target, damping, values, preset="p"))
    cells.held_out[("kfac", "loss")] = rng.normal(0.45, 0.1, 8)
    cells.rows.append(
        result_row(
            "kfac", "loss", "loss", None, cells.held_out[("kfac", "loss")], preset="p",
            selection=lds.HELD_OUT,
        )
    )  # fmt: skip
    cells.rows.append(
        result_row("trak", "loss", "loss", None, None, preset="p", status="failed", reason="x")
    )
    return cells


def test_rows_carry_the_paired_difference_to_the_best_similarity_baseline_per_target():
    cells = _cells()
    table = lds.add_similarity_differences(cells)
    assert cells.similarity_reference == {"loss": "pixel-l2", "elbo": "pixel"}
    for row in cells.rows:
        key = (row["method"], row["target"])
        reference = cells.similarity_reference[row["target"]]
        assert row["similarity_reference"] == reference
        if row["status"] != "ok":
            assert math.isnan(row["vs_similarity_mean"])
            continue
        if row["method"] == reference:
            assert (row["vs_similarity_mean"], row["vs_similarity_se"]) == (0.0, 0.0)
            continue
        mine = (
            cells.held_out[key]
            if row.get("selection") == lds.HELD_OUT
            else cells.lds[(*key, None if np.isnan(row["damping"]) else row["damping"])]
        )
        expected = _pair(mine, cells.lds[(reference, row["target"], None)])
        assert (row["vs_similarity_mean"], row["vs_similarity_se"]) == pytest.approx(expected)
    assert set(table["reference"]) == {"pixel-l2", "pixel"}
    assert len(table) == 6  # loss: pixel, kfac x2, held-out kfac; elbo: pixel-l2, kfac
    text = format_table(pd.DataFrame(cells.rows))
    assert "Δ vs best sim." in text.splitlines()[0]
    kfac_default = next(
        r for r in cells.rows if r["method"] == "kfac" and r["damping"] == 1e-8
    )  # the loss row
    shown = f"{100 * kfac_default['vs_similarity_mean']:+.1f} ± "
    assert shown in text and " ref " in text


def test_no_similarity_baseline_leaves_the_columns_empty_and_the_footer_says_so():
    cells = lds.Cells(lds={("kfac", "loss", 1e-8): np.ones(3)})
    cells.rows.append(result_row("kfac", "loss", "loss", 1e-8, np.ones(3), preset="p"))
    assert lds.add_similarity_differences(cells).empty
    assert cells.rows[0]["similarity_reference"] == ""
    assert math.isnan(cells.rows[0]["vs_similarity_mean"])
    assert "n/a" in lds.similarity_footer(cells.similarity_reference)


@pytest.fixture(scope="module")
def tiny_run(tiny_cache, tmp_path_factory):
    cache = tmp_path_factory.mktemp("similarity") / "cache"
    shutil.copytree(tiny_cache, cache)
    config = lds.LDSConfig(
        methods=("random",),
        preset="smoke",
        overrides=TINY_OVERRIDES,
        cache_dir=str(cache),
        out=str(tmp_path_factory.mktemp("out")),
        progress=False,
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = lds.run(config)
    return result, printed.getvalue()


def test_a_run_without_similarity_baseline_adds_pixel_l2_and_pairs_with_it(tiny_run):
    tiny_run, printed = tiny_run
    summary = tiny_run.summary
    assert list(summary["method"]) == ["noise-ceiling", "random", "pixel-l2"]
    random_row = summary[summary["method"] == "random"].iloc[0]
    per_query = tiny_run.per_query
    expected = _pair(
        per_query[per_query["method"] == "random"]["lds"].to_numpy(),
        per_query[per_query["method"] == "pixel-l2"]["lds"].to_numpy(),
    )
    got = (random_row["vs_similarity_mean"], random_row["vs_similarity_se"])
    assert got == pytest.approx(expected, nan_ok=True)
    paired = tiny_run.paired
    assert ((paired["method"] == "random") & (paired["reference"] == "pixel-l2")).any()
    record = json.loads(tiny_run.files["record"].read_text())
    assert record["result"]["similarity_reference"] == {"loss": "pixel-l2"}
    lines = printed.splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if "Δ vs best sim." in line) :]
    assert "Δ vs best sim." in lines[0] and any(" ref " in line for line in lines[2:5])
    assert "Δ vs best similarity: paired per-query LDS difference" in lines[5]
    assert lines[5].endswith("(loss: pixel-l2)")


def test_a_run_records_writes_and_prints_the_regime_of_its_queries(tiny_run):
    tiny_run, printed = tiny_run
    setting = tiny_setting()
    queries = load_influence_examples(tiny_run.files["influence_examples.random"])
    expected = regime_diagnostic(
        torch.from_numpy(queries["query_images"]),
        load_train_set(setting).images,
        load_held_out_set(setting).images,
        seed=derived_seed(setting.seed, "regime"),
    )
    record = json.loads(tiny_run.files["record"].read_text())
    assert record["result"]["regime"] == pytest.approx(expected.summary())
    assert record["result"]["regime"]["n_reference"] == 357 - 24  # digits2 minus n_train
    stored = pd.read_csv(tiny_run.files["regime"])
    np.testing.assert_allclose(stored["ratio"], expected.ratio, rtol=1e-12)
    assert tiny_run.regime.footer() == expected.footer()
    assert expected.footer() in printed.splitlines()


def test_lds_markdown_shows_the_difference_at_the_best_damping_and_names_the_reference():
    cells = _cells()
    lds.add_similarity_differences(cells)
    summary = pd.DataFrame(cells.rows)
    text = reports.lds_markdown(summary, "loss", {"kfac": 1e-8}, footer=["regime: x"])
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()}
    best = summary[(summary["method"] == "kfac") & (summary["target"] == "loss")]
    best = best[best["selection"] != lds.HELD_OUT].sort_values("lds_mean").iloc[-1]
    expected = f"{100 * best['vs_similarity_mean']:+.1f} ± {100 * best['vs_similarity_se']:.1f}"
    assert expected in lines["K-FAC influence"]
    assert "| ref |" in lines["pixel L2"]
    assert "Δ vs best sim. (best)" in text.splitlines()[0]
    assert "best similarity baseline of the run (`pixel-l2`, marked ref)" in text
    assert text.rstrip().endswith("regime: x")


def test_regime_footers_are_read_from_the_runs_of_the_preset(tmp_path):
    regime = {
        "ratio_median": 0.5,
        "near_copy_fraction": 0.25,
        "n_queries": 4,
        "query_nearest_mean": 1.0,
        "reference_nearest_mean": 2.0,
        "reference_kind": "held-out real images",
        "n_reference": 10,
    }
    for name, preset in (("a", "quick"), ("b", "quick"), ("c", "smoke")):
        record = {"setting": {"name": preset}, "result": {"regime": regime}}
        (tmp_path / f"{name}.run.json").write_text(json.dumps(record))
    (tmp_path / "d.run.json").write_text(json.dumps({"setting": {"name": "quick"}}))
    assert reports.regime_footers(tmp_path, "quick") == [footer_text(regime)]
    assert reports.regime_footers(tmp_path, "cifar2") == []
