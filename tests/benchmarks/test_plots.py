"""The figures show the numbers of the tables: values read back from the drawn matplotlib
Figures (bar lengths, error-bar extents, line points, heatmap cells) against the summary rows."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.container import BarContainer, ErrorbarContainer

from benchmarks import plots
from benchmarks.results import NOISE_CEILING_LABEL, best_and_default, result_row
from methods.registry import default_dampings, methods_in_table_order


def _summary() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    rows = []

    def add(method, measurement, target, damping, mu, n=10):
        lds = rng.normal(mu, 0.05, size=n)
        rows.append(result_row(method, measurement, target, damping, lds, preset="p"))

    for damping, mu in [(1e-9, 0.1), (1e-8, 0.21), (1e-4, 0.25), (1e-1, 0.05)]:
        add("kfac", "loss", "loss", damping, mu)
        add("kfac", "elbo", "elbo", damping, mu / 2)
        add("kfac", "loss", "elbo", damping, mu * 1.1)
        add("trak", "loss", "loss", damping, mu / 3)
    add("kfac-reduce", "loss", "loss", 1e-8, 0.12)
    add("grad-dot", "loss", "loss", 1e-8, 0.08)
    add("random", "-", "loss", None, 0.01)
    add("retrain", "loss", "loss", None, 0.45)
    add("retrain", "elbo", "elbo", None, 0.3)
    add("noise-ceiling", "loss", "loss", None, 0.5)
    add("noise-ceiling", "elbo", "elbo", None, 0.35)
    rows.append(
        result_row(
            "clip", "-", "loss", None, None, preset="p", status="unavailable", reason="no weights"
        )
    )
    return pd.DataFrame(rows)


def _tick_positions(ax, axis="y") -> dict[str, float]:
    ticks = ax.get_yticks() if axis == "y" else ax.get_xticks()
    labels = ax.get_yticklabels() if axis == "y" else ax.get_xticklabels()
    return {label.get_text(): float(t) for t, label in zip(ticks, labels, strict=True)}


def _bars(ax, horizontal=True) -> list[tuple[float, float]]:
    """(centre on the category axis, length) of every bar."""
    out = []
    for container in ax.containers:
        if isinstance(container, BarContainer):
            for p in container.patches:
                if horizontal:
                    out.append((p.get_y() + p.get_height() / 2, p.get_width()))
                else:
                    out.append((p.get_x() + p.get_width() / 2, p.get_height()))
    return out


def _error_segments(ax, label: str) -> list[np.ndarray]:
    containers = [
        c for c in ax.containers if isinstance(c, ErrorbarContainer) and c.get_label() == label
    ]
    assert len(containers) == 1, [c.get_label() for c in ax.containers]
    return list(containers[0].lines[2][0].get_segments())


def _at(items, centre):
    found = [item for item in items if np.isclose(item[0], centre)]
    assert len(found) == 1, (centre, items)
    return found[0]


def test_method_labels_and_order_come_from_the_registry():
    assert plots.method_label("kfac") == "K-FAC influence"
    assert plots.method_label("noise-ceiling") == NOISE_CEILING_LABEL
    assert plots.method_label("not-registered") == "not-registered"
    assert plots.bar_label("kfac-mloss", "loss", "elbo", {}) == "K-FAC influence (m. loss)"
    order = methods_in_table_order()
    methods = ["zzz-unknown", "kfac", "retrain", "noise-ceiling", "random", "trak"]
    ranked = sorted(methods, key=plots.method_sort_key)
    assert ranked == ["noise-ceiling"] + [m for m in order if m in methods] + ["zzz-unknown"]
    table = pd.DataFrame(
        {"method": ["kfac", "kfac", "random"], "measurement": ["loss", "elbo", "-"]}
    )
    ordered = plots.in_table_order(table, "elbo")
    assert list(zip(ordered["method"], ordered["measurement"], strict=True)) == [
        ("random", "-"),
        ("kfac", "elbo"),
        ("kfac", "loss"),  # the substituted measurement after the method's own
    ]


@pytest.mark.parametrize("target", ["loss", "elbo"])
def test_lds_bars_show_the_best_and_default_rows(target):
    summary = _summary()
    fig = plots.lds_bars_figure(summary, target=target)
    ax = fig.axes[0]
    table = best_and_default(summary[summary["target"] == target], default_dampings())
    rows = table[(table["method"] != "noise-ceiling") & (table["status"] == "ok")]
    ticks = _tick_positions(ax)
    bars, errors = _bars(ax), _error_segments(ax, "s.e. at the best damping")
    assert len(bars) == len(errors) == len(rows)
    diamonds = []
    for row in rows.itertuples(index=False):
        y = ticks[plots.bar_label(row.method, row.measurement, target, {})]
        assert _at(bars, y)[1] == pytest.approx(100 * row.lds_best)
        segment = _at([(s[0, 1], s) for s in errors], y)[1]
        assert segment[:, 0] == pytest.approx(
            100 * (row.lds_best + np.array([-1, 1]) * row.se_best)
        )
        if np.isfinite(row.damping_default) and row.damping_default != row.damping_best:
            diamonds.append((y, 100 * row.lds_default, 100 * row.se_default))
    assert diamonds  # kfac's default 1e-8 is not its best damping
    drawn = [(s[0, 1], s) for s in _error_segments(ax, "default damping")]
    assert len(drawn) == len(diamonds)
    for y, value, se in diamonds:
        assert _at(drawn, y)[1][:, 0] == pytest.approx([value - se, value + se])
    assert "CLIP cosine" in ticks if target == "loss" else "CLIP cosine" not in ticks
    ceiling = table[table["method"] == "noise-ceiling"].iloc[0]
    bar_patches = {id(p) for c in ax.containers if isinstance(c, BarContainer) for p in c}
    (band,) = [p for p in ax.patches if id(p) not in bar_patches]  # the noise-ceiling band
    expected = 100 * (ceiling["lds_best"] + np.array([-1, 1]) * ceiling["se_best"])
    assert [band.get_x(), band.get_x() + band.get_width()] == pytest.approx(expected)


def test_hessian_ablation_uses_its_labels_and_order():
    fig = plots.lds_bars_figure(
        _summary(),
        target="loss",
        methods=plots.HESSIAN_ABLATION_METHODS,
        labels=plots.HESSIAN_ABLATION_LABELS,
    )
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == [
        plots.HESSIAN_ABLATION_LABELS["kfac-reduce"],
        plots.HESSIAN_ABLATION_LABELS["kfac"],
        "exact retraining",
    ]


def test_damping_sweep_lines_bands_and_default_markers_match_the_table():
    summary = _summary()
    fig = plots.damping_sweep_figure(summary)
    try:
        panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
        assert set(panels) == {"target: loss", "target: elbo"}
        for target in ("loss", "elbo"):
            ax = panels[f"target: {target}"]
            lines = {line.get_label(): line for line in ax.get_lines()}
            rows = summary[(summary["target"] == target) & summary["damping"].notna()]
            bands = np.concatenate(
                [
                    p.vertices
                    for c in ax.collections
                    if isinstance(c, PolyCollection)
                    for p in c.get_paths()
                ]
            )
            for (method, measurement), series in rows.groupby(["method", "measurement"]):
                series = series.sort_values("damping")
                line = lines[plots.bar_label(method, measurement, target, {})]
                np.testing.assert_allclose(line.get_xdata(), series["damping"])
                np.testing.assert_allclose(line.get_ydata(), 100 * series["lds_mean"])
                for d, m, se in zip(
                    series["damping"], series["lds_mean"], series["lds_se"], strict=True
                ):
                    for edge in (100 * (m - se), 100 * (m + se)):
                        at_d = np.isclose(bands[:, 0], d, rtol=1e-9, atol=0.0)
                        assert np.isclose(bands[at_d, 1], edge).any()
            marker = lines["default damping"]
            defaults = rows[
                [
                    np.isclose(d, default_dampings([m])[m], rtol=1e-9, atol=0.0)
                    for m, d in zip(rows["method"], rows["damping"], strict=True)
                ]
            ]
            assert sorted(marker.get_ydata()) == pytest.approx(sorted(100 * defaults["lds_mean"]))
            references = summary[(summary["target"] == target) & summary["damping"].isna()]
            retrain = references[references["method"] == "retrain"]["lds_mean"].item()
            assert lines["exact retraining"].get_ydata()[0] == pytest.approx(100 * retrain)
    finally:
        plt.close(fig)


def test_the_held_out_tuned_lds_is_a_dash_dotted_line_in_the_methods_colour_with_a_legend_entry():
    lds = np.array([0.1, 0.2, 0.3, 0.2])
    held_out = result_row("kfac", "loss", "loss", None, lds, preset="p", selection="held-out")
    summary = pd.concat([_summary(), pd.DataFrame([held_out])], ignore_index=True)
    fig = plots.damping_sweep_figure(summary, targets=["loss"])
    try:
        (ax,) = [ax for ax in fig.axes if ax.get_title() == "target: loss"]
        label = plots.bar_label("kfac", "loss", "loss", {})
        sweep, tuned = [line for line in ax.get_lines() if line.get_label() == label]
        assert tuned.get_linestyle() == "-." and tuned.get_color() == sweep.get_color()
        assert list(tuned.get_ydata()) == pytest.approx([100 * lds.mean()] * 2)
        random = plots.bar_label("random", "-", "loss", {})
        (reference,) = [line for line in ax.get_lines() if line.get_label() == random]
        assert reference.get_linestyle() == ":"  # a method without damping stays dotted
        texts = [t.get_text() for t in fig.legends[0].get_texts()]
        assert "held-out-tuned damping" in texts
        no_held_out = plots.damping_sweep_figure(_summary(), targets=["loss"])
        assert "held-out-tuned damping" not in [
            t.get_text() for t in no_held_out.legends[0].get_texts()
        ]
        plt.close(no_held_out)
    finally:
        plt.close(fig)


def test_retrain_bars_match_retrain_summary():
    rng = np.random.default_rng(2)
    retrain = pd.DataFrame(
        [
            {"method": m, "fraction": f, "query": q, "delta_loss": rng.normal(0.003, 0.002)}
            for m in ("kfac", "random", "trak")
            for f in (0.02, 0.1)
            for q in range(6)
        ]
    )
    table = plots.retrain_summary(retrain)
    ax = plots.retrain_figure(retrain).axes[0]
    ticks = _tick_positions(ax)
    assert list(ticks) == ["random", "TRAK", "K-FAC influence"]  # table order
    bars, errors = _bars(ax), [(s[0, 1], s) for s in _error_segments(ax, "s.e.")]
    assert len(bars) == len(errors) == len(table)
    for row in table.itertuples(index=False):
        y0 = ticks[plots.method_label(row.method)]
        ((centre, length),) = [
            b for b in bars if abs(b[0] - y0) < 0.5 and np.isclose(b[1], row.mean)
        ]
        segment = _at(errors, centre)[1]
        assert segment[:, 0] == pytest.approx([row.mean - row.se, row.mean + row.se])
    assert len({c for c, _ in bars}) == len(bars)  # dodged, not stacked


def test_compression_bars_match_the_table():
    table = pd.DataFrame(
        {
            "bits": [4, 8, np.nan, 4, 8, np.nan],
            "metric": ["rank"] * 3 + ["LDS"] * 3,
            "value": [0.9, 0.99, 1.0, 0.2, 0.25, 0.26],
            "se": [np.nan] * 3 + [0.01, 0.02, 0.03],
        }
    )
    ax = plots.compression_figure(table).axes[0]
    ticks = _tick_positions(ax, axis="x")
    assert list(ticks) == ["int4", "int8", "none"]
    bars = _bars(ax, horizontal=False)
    errors = [(s[0, 0], s) for s in _error_segments(ax, "s.e.")]
    assert len(bars) == 6 and len(errors) == 3
    for row in table.itertuples(index=False):
        x0 = ticks["none" if np.isnan(row.bits) else f"int{int(row.bits)}"]
        ((centre, height),) = [
            b for b in bars if abs(b[0] - x0) < 0.5 and np.isclose(b[1], 100 * row.value)
        ]
        if np.isfinite(row.se):
            segment = _at(errors, centre)[1]
            assert segment[:, 1] == pytest.approx(100 * (row.value + np.array([-1, 1]) * row.se))


def test_timestep_heatmap_cells_match_the_matrix():
    rows = [
        result_row("kfac", f"timestep-loss:{a}", f"timestep-loss:{b}", 1e-8, [v, v], preset="p")
        for a, b, v in [(100, 5, 0.1), (5, 5, 0.2), (5, 100, 0.3), (100, 100, 0.4)]
    ]
    fig = plots.timestep_heatmap_figure(pd.DataFrame(rows), method="kfac")
    cells = fig.axes[0].collections[0].get_array().reshape(2, 2)
    np.testing.assert_allclose(cells, [[20.0, 30.0], [10.0, 40.0]])
    assert fig.axes[0].get_title() == "K-FAC influence: per-timestep LDS"


def test_a_held_out_tuned_row_is_the_bar_and_the_in_sample_best_a_cross():
    summary = _summary()
    lds = np.array([0.1, 0.2, 0.3, 0.2])
    held_out = result_row(
        "kfac",
        "loss",
        "loss",
        None,
        lds,
        preset="p",
        selection="held-out",
        tuning_gain=0.05,
        se_tuning_gain=0.02,
    )
    summary = pd.concat([summary, pd.DataFrame([held_out])], ignore_index=True)
    fig = plots.lds_bars_figure(summary, target="loss")
    ax = fig.axes[0]
    table = best_and_default(summary[summary["target"] == "loss"], default_dampings())
    kfac = table[(table["method"] == "kfac") & (table["measurement"] == "loss")].iloc[0]
    assert kfac["lds_tuned"] == pytest.approx(lds.mean())
    assert (kfac["tuning_gain"], kfac["se_tuning_gain"]) == (0.05, 0.02)
    y = _tick_positions(ax)[plots.bar_label("kfac", "loss", "loss", {})]
    assert _at(_bars(ax), y)[1] == pytest.approx(100 * lds.mean())
    (crosses,) = [c for c in ax.collections if c.get_label().startswith("in-sample best")]
    assert list(crosses.get_offsets()[0]) == pytest.approx([100 * kfac["lds_best"], y])
    plt.close(fig)
