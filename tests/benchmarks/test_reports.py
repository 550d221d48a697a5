"""Tests of the figures (benchmarks.plots) and the report CLI (benchmarks.reports)."""

from __future__ import annotations

import math
import struct

import numpy as np
import pandas as pd
import pytest

from benchmarks import plots, reports, results
from benchmarks.results import RunRecord, per_query_frame, result_row, write_results
from datasets import load_dataset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _assert_png(path, min_size=(150, 100), max_size=(5000, 5000)):
    assert path.is_file() and path.stat().st_size > 2000
    width, height = _png_size(path)
    assert min_size[0] <= width <= max_size[0], width
    assert min_size[1] <= height <= max_size[1], height
    return width, height


def _summary(rng=None) -> pd.DataFrame:
    rng = rng or np.random.default_rng(0)
    rows = []

    def add(method, measurement, target, damping, mu, **kw):
        lds = rng.normal(mu, 0.05, size=12)
        rows.append(result_row(method, measurement, target, damping, lds, preset="smoke", **kw))

    for damping, mu in [(1e-8, 0.21), (1e-4, 0.23), (1e-1, 0.1)]:
        add("kfac", "loss", "loss", damping, mu)
        add("kfac", "elbo", "elbo", damping, mu / 2)
        add("kfac", "loss", "elbo", damping, mu * 1.1)
    for damping, mu in [(1e-9, 0.01), (1e-4, 0.1)]:
        add("trak", "loss", "loss", damping, mu)
        add("dtrak", "square-norm", "loss", damping, 2 * mu)
    add("kfac-reduce", "loss", "loss", 1e-8, 0.06)
    add("kfac-empirical", "loss", "loss", 1e-8, 0.18)
    add("clip", "-", "loss", None, 0.05)
    add("retrain", "loss", "loss", None, 0.5)
    add("retrain", "elbo", "elbo", None, 0.4)
    add("noise-ceiling", "loss", "loss", None, 0.6)
    rows.append(
        result_row(
            "clip",
            "-",
            "elbo",
            None,
            None,
            preset="smoke",
            status="unavailable",
            reason="no CLIP weights",
        )
    )
    for a in (10, 500):
        for b in (10, 100, 500):
            add("kfac", f"timestep-loss:{a}", f"timestep-loss:{b}", 1e-8, 0.3 if a == b else 0.05)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- pure selection helpers


def test_select_influential_picks_exact_indices():
    scores = np.array([0.5, -2.0, 0.01, 3.0, -0.02, 3.0, -2.0, 0.0])
    sel = plots.select_influential(scores, 3)
    np.testing.assert_array_equal(sel.positive, [3, 5, 0])  # ties: lower index first
    np.testing.assert_array_equal(sel.negative, [1, 6, 4])
    np.testing.assert_array_equal(sel.neutral, [7, 2, 4])
    assert sel.positive.dtype == np.int64


def test_select_influential_matches_brute_force_sort():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=50)
    sel = plots.select_influential(scores, 7)
    idx = list(range(50))
    assert list(sel.positive) == sorted(idx, key=lambda j: -scores[j])[:7]
    assert list(sel.negative) == sorted(idx, key=lambda j: scores[j])[:7]
    assert list(sel.neutral) == sorted(idx, key=lambda j: abs(scores[j]))[:7]
    assert scores[sel.positive].min() >= np.sort(scores)[-7]


@pytest.mark.parametrize(
    ("scores", "k", "match"),
    [
        (np.zeros(4), 0, "k must be"),
        (np.zeros(4), 5, "k must be"),
        (np.zeros((2, 2)), 1, "1-D"),
        (np.array([0.0, np.nan]), 1, "NaN"),
    ],
)
def test_select_influential_rejects_bad_input(scores, k, match):
    with pytest.raises(ValueError, match=match):
        plots.select_influential(scores, k)


def test_image_for_display_maps_range_and_layout():
    gray = np.array([[[-1.0, 0.0], [1.0, 2.0]]])  # [1, 2, 2]
    np.testing.assert_allclose(plots.image_for_display(gray), [[0.0, 0.5], [1.0, 1.0]])
    rgb = np.stack([np.full((2, 3), -1.0), np.zeros((2, 3)), np.ones((2, 3))])  # [3, 2, 3]
    out = plots.image_for_display(rgb)
    assert out.shape == (2, 3, 3)
    np.testing.assert_allclose(out[0, 0], [0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="C in"):
        plots.image_for_display(np.zeros((2, 4, 4)))


def test_timestep_matrix_rows_are_measurements_and_columns_targets():
    rows = [
        result_row("kfac", f"timestep-loss:{a}", f"timestep-loss:{b}", 1e-8, [v, v], preset="p")
        for a, b, v in [(100, 5, 0.1), (5, 5, 0.2), (5, 100, 0.3), (100, 100, 0.4)]
    ]
    rows.append(result_row("kfac", "loss", "loss", 1e-8, [0.9, 0.9], preset="p"))
    matrix = plots.timestep_matrix(pd.DataFrame(rows), method="kfac")
    assert list(matrix.index) == [5, 100] and list(matrix.columns) == [5, 100]
    np.testing.assert_allclose(matrix.to_numpy(), [[0.2, 0.3], [0.1, 0.4]])

    rows.append(
        result_row("kfac", "timestep-loss:5", "timestep-loss:5", 1.0, [0.0, 0.0], preset="p")
    )
    with pytest.raises(ValueError, match="damping"):
        plots.timestep_matrix(pd.DataFrame(rows), method="kfac")
    chosen = plots.timestep_matrix(pd.DataFrame(rows), method="kfac", damping=1.0)
    assert chosen.shape == (1, 1) and chosen.iloc[0, 0] == 0.0


def test_retrain_summary_arithmetic():
    df = pd.DataFrame(
        {
            "method": ["kfac"] * 3 + ["random"] * 2,
            "fraction": [0.02] * 3 + [0.1] * 2,
            "query": [0, 1, 2, 0, 1],
            "delta_loss": [1.0, 2.0, 4.0, -1.0, 1.0],
        }
    )
    out = plots.retrain_summary(df).set_index("method")
    assert list(out.index) == ["random", "kfac"]  # the random baseline first
    assert out.loc["kfac", "mean"] == pytest.approx(7.0 / 3.0)
    assert out.loc["kfac", "se"] == pytest.approx(math.sqrt(7.0 / 3.0 / 3.0))
    assert out.loc["random", "mean"] == 0.0 and out.loc["random", "n"] == 2
    with pytest.raises(ValueError, match="delta_loss"):
        plots.retrain_summary(df.drop(columns=["delta_loss"]))


def test_retrain_summary_pairs_each_method_with_random_removal_of_the_same_query():
    rng = np.random.default_rng(3)
    rows = []
    for method in ("kfac", "random-removal"):
        for fraction in (0.02, 0.1):
            for query in range(5):
                rows.append((method, fraction, query, float(rng.normal())))
    df = pd.DataFrame(rows, columns=["method", "fraction", "query", "delta_loss"])
    df = df.drop(index=3)  # kfac, 2%, query 3 missing: that pair is left out
    out = plots.retrain_summary(df).set_index(["method", "fraction"])
    kfac = df[df["method"] == "kfac"].set_index(["fraction", "query"])["delta_loss"]
    rand = df[df["method"] == "random-removal"].set_index(["fraction", "query"])["delta_loss"]
    for fraction in (0.02, 0.1):
        diffs = [
            kfac[(fraction, q)] - rand[(fraction, q)] for q in range(5) if (fraction, q) in kfac
        ]
        row = out.loc[("kfac", fraction)]
        assert row["n_pairs"] == len(diffs)
        assert row["vs_random_mean"] == pytest.approx(np.mean(diffs))
        assert row["vs_random_se"] == pytest.approx(np.std(diffs, ddof=1) / math.sqrt(len(diffs)))
    assert np.isnan(out.loc[("random-removal", 0.1), "vs_random_mean"])
    assert "minus random removal" in reports.retrain_markdown(df)


def test_correlations_match_definitions():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    b = np.array([1.0, 4.0, 9.0, 16.0])
    r, rho = plots.correlations(a, b)
    ac, bc = a - a.mean(), b - b.mean()
    assert r == pytest.approx(ac @ bc / math.sqrt((ac @ ac) * (bc @ bc)))
    assert rho == pytest.approx(1.0)


def test_bar_label_marks_substituted_measurements():
    assert plots.bar_label("kfac", "loss", "elbo", {}) == "K-FAC influence (m. loss)"
    assert plots.bar_label("kfac", "elbo", "elbo", {}) == "K-FAC influence"
    assert plots.bar_label("clip", "-", "elbo", {}) == "CLIP cosine"
    assert plots.bar_label("mine", "loss", "loss", {"mine": "Mine"}) == "Mine"


# ---------------------------------------------------------------- figures write PNGs


def test_lds_bars_and_hessian_ablation_write_pngs(tmp_path):
    summary = _summary()
    w_loss, h_loss = _assert_png(plots.plot_lds_bars(summary, tmp_path / "a.png", target="loss"))
    _assert_png(plots.plot_lds_bars(summary, tmp_path / "b.png", target="elbo"))
    w_abl, h_abl = _assert_png(plots.plot_hessian_ablation(summary, tmp_path / "c.png"))
    assert h_loss > h_abl  # more rows -> a taller figure
    with pytest.raises(ValueError, match="target"):
        plots.plot_lds_bars(summary, tmp_path / "d.png", target="nothing")
    mixed = pd.concat([summary, summary.assign(preset="quick")])
    with pytest.raises(ValueError, match="preset"):
        plots.plot_lds_bars(mixed, tmp_path / "e.png", target="loss")


def test_damping_sweep_and_timestep_heatmap_write_pngs(tmp_path):
    summary = _summary()
    width, _ = _assert_png(plots.plot_damping_sweep(summary, tmp_path / "d.png"))
    assert width > 800  # two panels: loss and elbo
    _assert_png(plots.plot_timestep_heatmap(summary, tmp_path / "t.png", method="kfac"))
    no_damping = summary[summary["damping"].isna()]
    with pytest.raises(ValueError, match="positive damping"):
        plots.plot_damping_sweep(no_damping, tmp_path / "x.png")


def test_retrain_compression_and_correlation_figures_write_pngs(tmp_path):
    rng = np.random.default_rng(2)
    retrain = pd.DataFrame(
        [
            {"method": m, "fraction": f, "query": q, "delta_loss": rng.normal(0.003, 0.001)}
            for m in ("random", "trak", "kfac")
            for f in (0.02, 0.1)
            for q in range(5)
        ]
    )
    _assert_png(plots.plot_retrain_changes(retrain, tmp_path / "r.png"))
    compression = pd.DataFrame(
        {"bits": [4, 8, 16, np.nan], "metric": "rank", "value": [0.9, 0.99, 1.0, 1.0]}
    )
    _assert_png(plots.plot_compression(compression, tmp_path / "c.png"))
    a = rng.normal(size=50)
    _assert_png(
        plots.plot_model_correlation(a, a + rng.normal(size=50), tmp_path / "m.png"),
        min_size=(200, 200),
    )


@pytest.mark.parametrize("channels", [1, 3])
def test_influence_grid_writes_png(tmp_path, channels):
    rng = np.random.default_rng(3)
    queries = rng.uniform(-1, 1, size=(2, channels, 8, 8))
    train = rng.uniform(-1, 1, size=(20, channels, 8, 8))
    scores = rng.normal(size=(2, 20))
    width, height = _assert_png(
        plots.plot_influence_grid(queries, train, scores, tmp_path / "g.png", k=3)
    )
    assert width > 2 * height  # 1 + 3 * 3 images per row, 2 rows
    with pytest.raises(ValueError, match="n_queries, n_train"):
        plots.plot_influence_grid(queries, train, scores[:, :5], tmp_path / "x.png", k=3)


# ---------------------------------------------------------------- Markdown and CLI


def test_lds_markdown_shows_best_and_default():
    text = reports.lds_markdown(_summary(np.random.default_rng(4)), "loss", {"kfac": 1e-8})
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()}
    kfac = lines["K-FAC influence"]
    assert "1e-04" in kfac and "1e-08" in kfac  # best damping 1e-4, default 1e-8
    assert kfac.count("(") == 1  # "best ± s.e. (default)"
    assert "noise ceiling" in lines


def test_every_markdown_table_of_a_plumbing_preset_says_first_that_it_cannot_rank_methods():
    smoke = _summary(np.random.default_rng(4))
    quick = smoke.assign(preset="quick")
    for table in (
        reports.lds_markdown(smoke, "loss", {"kfac": 1e-8}),
        reports.summary_markdown(smoke),
    ):
        first = table.splitlines()[0]
        assert first.startswith("**preset smoke is a plumbing check") and "cannot rank" in first
    for table in (
        reports.lds_markdown(quick, "loss", {"kfac": 1e-8}),
        reports.summary_markdown(quick),
    ):
        assert "cannot rank" not in table and table.startswith("|")


def test_npz_inputs_round_trip(tmp_path):
    a, b = np.arange(3.0), np.arange(3.0) + 1
    results.save_model_correlation(
        tmp_path / "x.model_correlation.npz", a, b, label_a="A", label_b="B", measurement="elbo"
    )
    data = results.load_model_correlation(tmp_path / "x.model_correlation.npz")
    np.testing.assert_array_equal(data["b"], b)
    assert (data["label_a"], data["measurement"]) == ("A", "elbo")
    with pytest.raises(ValueError, match="scores"):
        results.save_influence_examples(
            tmp_path / "y.influence_examples.npz",
            np.zeros((1, 1, 4, 4)),
            np.zeros((2, 3)),
            dataset="digits",
        )


def _influence_inputs(n_queries=3, n_train=40):
    """Digits queries and ``# [Q, n_train]`` scores against the first ``n_train`` digits."""
    digits = load_dataset("digits").images.numpy()
    rng = np.random.default_rng(5)
    return digits[-n_queries:], rng.normal(size=(n_queries, n_train)), digits[:n_train]


def test_influence_examples_store_a_reference_not_the_training_set(tmp_path):
    queries, scores, _ = _influence_inputs()
    path = results.save_influence_examples(
        tmp_path / "r.kfac.influence_examples.npz",
        queries,
        scores,
        dataset="digits",
        data_dir=tmp_path / "data",
    )
    with np.load(path, allow_pickle=False) as raw:
        assert "train_images" not in raw.files
        assert all(raw[key].ndim <= 2 for key in raw.files if key != "query_images")
    data = results.load_influence_examples(path)
    np.testing.assert_array_equal(data["query_images"], queries)
    np.testing.assert_array_equal(data["scores"], scores)
    assert (data["dataset"], data["n_train"]) == ("digits", 40)
    assert data["data_dir"] == str((tmp_path / "data").resolve())
    path = results.save_influence_examples(path, queries, scores, dataset="digits")
    assert results.load_influence_examples(path)["data_dir"] is None


def test_old_influence_examples_with_training_images_still_load(tmp_path):
    queries, scores, train = _influence_inputs()
    path = tmp_path / "old.influence_examples.npz"
    np.savez(path, query_images=queries, train_images=train, scores=scores)
    data = results.load_influence_examples(path)
    np.testing.assert_array_equal(data["train_images"], train)
    assert (data["dataset"], data["n_train"]) == (None, 40)


def test_figure1_draws_the_training_images_by_position(tmp_path, monkeypatch):
    queries, scores, train = _influence_inputs()
    res = tmp_path / "res"
    results.save_influence_examples(
        res / "new.influence_examples.npz", queries, scores, dataset="digits"
    )
    old_file = res / "old.influence_examples.npz"  # the format that stored the pixels
    np.savez(old_file, query_images=queries, train_images=train, scores=scores)
    drawn = {}
    draw = plots.plot_influence_grid

    def spy(query_images, train_images, scores, out_path, **kwargs):
        drawn[out_path.name] = np.array(train_images)
        return draw(query_images, train_images, scores, out_path, **kwargs)

    monkeypatch.setattr(reports.plots, "plot_influence_grid", spy)
    out = reports.build_reports(
        reports.ReportConfig(results_dir=res, out_dir=tmp_path / "out", top_k=3), log=None
    )
    assert sorted(drawn) == ["fig1_influences.new.png", "fig1_influences.old.png"]
    np.testing.assert_array_equal(drawn["fig1_influences.new.png"], train)  # positions 0..39
    np.testing.assert_array_equal(
        drawn["fig1_influences.new.png"], drawn["fig1_influences.old.png"]
    )
    for name in drawn:
        _assert_png(tmp_path / "out" / name)
        assert tmp_path / "out" / name in out.built


def test_figure1_is_skipped_when_the_training_set_is_unavailable(tmp_path):
    res = tmp_path / "res"
    results.save_influence_examples(
        res / "c.influence_examples.npz",
        np.zeros((2, 3, 32, 32)),
        np.zeros((2, 10)),
        dataset="cifar2",
        data_dir=tmp_path / "no-cifar-here",
    )
    out = reports.build_reports(
        reports.ReportConfig(results_dir=res, out_dir=tmp_path / "out"), log=None
    )
    notes = [note for note in out.skipped if note.startswith("Figure 1 (c.influence_examples")]
    assert len(notes) == 1 and "no-cifar-here" in notes[0]
    assert not list((tmp_path / "out").glob("fig1_*.png"))


def test_cli_on_empty_results_skips_everything(tmp_path, capsys):
    (tmp_path / "res").mkdir()
    assert reports.main(["--results", str(tmp_path / "res"), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    for figure in ("Figure 1", "Figure 3", "Figure 6", "Figure 17", "LDS figures"):
        assert f"skipped {figure}" in printed
    assert not list((tmp_path / "out").glob("*.png"))
    assert "## Skipped" in (tmp_path / "out" / "index.md").read_text()


def test_cli_builds_what_exists_and_skips_the_rest(tmp_path, capsys):
    res = tmp_path / "res"
    summary = pd.DataFrame(
        [result_row("kfac", "loss", "loss", 1e-8, [0.2, 0.3, 0.25], preset="smoke")]
    )
    per_query = per_query_frame("kfac", "loss", "loss", 1e-8, np.array([0.2, 0.3, 0.25]))
    write_results(
        res / "run", summary, per_query, RunRecord({}, provenance={"commit": "abc"}), "lds-smoke"
    )
    pd.DataFrame(
        {
            "method": ["kfac", "kfac"],
            "fraction": [0.1, 0.1],
            "query": [0, 1],
            "delta_loss": [0.1, 0.2],
        }
    ).to_csv(res / "c2.retrain.csv", index=False)
    out = tmp_path / "out"
    assert (
        reports.main(["--results", str(res), "--out", str(out), "--default-damping", "kfac=1e-8"])
        == 0
    )
    printed = capsys.readouterr().out
    built = sorted(p.name for p in out.iterdir())
    assert built == sorted(
        [
            "fig2_lds_loss.smoke.png",
            "lds_loss.smoke.md",
            "summary.md",
            "fig3_retrain.c2.png",
            "retrain.c2.md",
            "index.md",
        ]
    )
    for path in out.glob("*.png"):
        _assert_png(path)
    for figure in (
        "Figure 4 (smoke)",
        "Figures 7-10 (smoke)",
        "Figure 11 (smoke)",
        "Figure 1:",
        "Figure 6:",
        "Figure 17:",
    ):
        assert f"skipped {figure}" in printed
    assert "25.0 ± 2.9 (25.0)" in (out / "lds_loss.smoke.md").read_text()


def test_cli_errors_and_help(tmp_path, capsys):
    assert reports.main(["--results", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        reports.main(
            ["--results", str(tmp_path), "--out", str(tmp_path), "--default-damping", "kfac"]
        )
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        reports.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--results",
        "--out",
        "--default-damping",
        "--top-k",
        "--max-queries",
        "--quiet",
        "retrain.csv",
        "influence_examples.npz",
        "model_correlation.npz",
        "compression.csv",
        "summary.csv",
    ):
        assert option in text
