"""The paper's figures, drawn with seaborn from tidy tables of stored results (never recomputed).

Every ``plot_*`` function takes tables/arrays plus an output path, writes the PNG atomically and
returns its path; the matching ``*_figure`` function draws the same figure and returns the
:class:`matplotlib.figure.Figure`, so the plotted values can be read back and compared with the
tables. Bars, lines and heatmaps are seaborn plots of one tidy frame per figure (one row per
bar, point or cell); matplotlib adds what seaborn does not draw: precomputed s.e. error bars
(seaborn computes its own from raw data), the noise-ceiling band, text, the Figure 1 image grid.
Figures are drawn on fresh Figures (no backend selection: PNGs are rendered by Agg); the one
seaborn grid that makes its figure through pyplot (the damping sweep's FacetGrid) is closed once
saved. Pure selection helpers (:func:`select_influential`, :func:`timestep_matrix`,
:func:`retrain_summary`, ...) are separate from drawing so they can be tested exactly.

Labels, table order and default dampings of methods come from the method registry
(:mod:`methods.registry`); LDS values in tables are fractions, figures show percent.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from scipy import stats

from benchmarks.io import atomic_write_bytes
from benchmarks.results import (
    NOISE_CEILING_LABEL,
    NOISE_CEILING_METHOD,
    best_and_default,
    format_lds,
    method_sort_key,
    retrain_summary,
    validate_summary,
)
from methods.registry import REGISTRY, default_dampings

__all__ = [
    "HESSIAN_ABLATION_LABELS",
    "HESSIAN_ABLATION_METHODS",
    "InfluentialSelection",
    "bar_label",
    "compression_figure",
    "correlations",
    "damping_sweep_figure",
    "image_for_display",
    "in_table_order",
    "influence_grid_figure",
    "lds_bars_figure",
    "method_label",
    "method_sort_key",
    "model_correlation_figure",
    "plot_compression",
    "plot_damping_sweep",
    "plot_hessian_ablation",
    "plot_influence_grid",
    "plot_lds_bars",
    "plot_model_correlation",
    "plot_retrain_changes",
    "plot_timestep_heatmap",
    "retrain_figure",
    "retrain_summary",
    "select_influential",
    "timestep_heatmap_figure",
    "timestep_matrix",
]

HESSIAN_ABLATION_METHODS: tuple[str, ...] = (
    "kfac-empirical-reduce",
    "kfac-reduce",
    "kfac-empirical",
    "kfac",
    "retrain",
)
"""Methods of the Hessian ablation (Figure 4), in the paper's order."""

HESSIAN_ABLATION_LABELS: dict[str, str] = {
    "kfac-empirical-reduce": "GGN$^{loss}$ (empirical), reduce",
    "kfac-reduce": "GGN$^{model}$ (MC-Fisher), reduce",
    "kfac-empirical": "GGN$^{loss}$ (empirical), expand",
    "kfac": "GGN$^{model}$ (MC-Fisher), expand",
}
"""Figure 4's axis labels (the Hessian approximation of each K-FAC variant)."""

_LDS_AXIS_LABEL = "Rank correlation % (LDS)"
_BAR_COLORS: dict[str, str] = {
    "best damping": "C0",
    "substituted measurement": "C1",
    "exact retraining": "0.25",
}
"""Bar colour of each kind of Figure 2 row (tidy column ``kind``)."""
_CEILING_COLOR, _CEILING_BAND = "0.3", "0.85"
_NO_MEASUREMENT = {"", "-", "none", "n/a", "nan"}
_TIMESTEP_RE = re.compile(r"^timestep-loss:(\d+)$")
_PNG_DPI = 120


# ---------------------------------------------------------------- shared helpers


def _short(text: str, width: int) -> str:
    """A reason cut to fit beside a bar (the full text is in the summary CSV)."""
    return text if len(text) <= width else text[: width - 1] + "…"


def _save(fig: Figure, out_path: str | Path) -> Path:
    """Render ``fig`` to PNG, write it atomically, and release it (also from pyplot)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_PNG_DPI, bbox_inches="tight")
    plt.close(fig)  # a no-op for figures pyplot does not manage
    return atomic_write_bytes(Path(out_path), buffer.getvalue())


def _substituted(measurement: str, target: str) -> bool:
    return measurement.strip().lower() not in _NO_MEASUREMENT and measurement != target


def method_label(method: str) -> str:
    """Label of a method in tables and figures.

    Its registry display name, the noise ceiling's label, or the name itself for a method not
    registered here.
    """
    if method == NOISE_CEILING_METHOD:
        return NOISE_CEILING_LABEL
    return REGISTRY.get(method).display_name if method in REGISTRY else method


def bar_label(method: str, measurement: str, target: str, labels: Mapping[str, str]) -> str:
    """Row label of a bar: the method's display name, plus ``(m. <measurement>)`` if substituted.

    The suffix is added when the method used a measurement other than the target (the paper's
    "m. loss" rows) and its name does not already say so.

    Args:
        method: the method's registry name.
        measurement: the measurement the method used.
        target: the target the row predicts.
        labels: method -> label overrides of the display name.

    Returns:
        The label.
    """
    name = labels.get(method, method_label(method))
    suffix = f" (m. {measurement})"
    substituted = _substituted(measurement, target) and not name.endswith(suffix)
    return name + suffix if substituted else name


def in_table_order(table: pd.DataFrame, target: str) -> pd.DataFrame:
    """Rows of a table with ``method`` and ``measurement`` columns in table order.

    By method (:func:`method_sort_key`), a method's own measurement before a substituted one
    (stable).
    """
    keys = [
        (method_sort_key(m), _substituted(me, target))
        for m, me in zip(table["method"], table["measurement"], strict=True)
    ]
    order = sorted(range(len(table)), key=lambda i: keys[i])
    return table.iloc[order].reset_index(drop=True)


def _unique(labels: Sequence[str], methods: Sequence[str]) -> list[str]:
    """``labels`` made unique for a categorical axis.

    A repeated label gets ``[<method>]``, then a running number if it still repeats.
    """
    counts = pd.Series(labels).value_counts()
    out = [
        f"{lab} [{m}]" if counts[lab] > 1 else lab for lab, m in zip(labels, methods, strict=True)
    ]
    seen: dict[str, int] = {}
    for i, lab in enumerate(out):
        seen[lab] = seen.get(lab, 0) + 1
        out[i] = lab if seen[lab] == 1 else f"{lab} #{seen[lab]}"
    return out


def _one_preset(df: pd.DataFrame, preset: str | None) -> pd.DataFrame:
    if preset is not None:
        out = df[df["preset"] == preset]
        if out.empty:
            raise ValueError(
                f"no rows for preset {preset!r}; presets present: {sorted(df['preset'].unique())}."
            )
        return out
    presets = df["preset"].unique()
    if len(presets) > 1:
        raise ValueError(
            f"the table mixes presets {sorted(presets)}; pass preset=... to choose one."
        )
    return df


def _bar_centre(patch: Rectangle, *, horizontal: bool) -> float:
    """Position of a bar's centre on the category axis."""
    if horizontal:
        return patch.get_y() + patch.get_height() / 2
    return patch.get_x() + patch.get_width() / 2


def _bar_patches(
    ax: Axes, categories: Sequence[str], hue_levels: Sequence[str], *, horizontal: bool
) -> dict[tuple[str, str], Rectangle]:
    """(category, hue level) -> the bar seaborn drew for it on ``ax``.

    seaborn's barplot adds one BarContainer per hue level, in ``hue_order``; a bar's category
    is the nearest category position to its centre (dodged bars stay within +-0.4 of it).
    """
    containers = [c for c in ax.containers if isinstance(c, BarContainer)]
    if len(containers) != len(hue_levels):
        raise RuntimeError(
            f"expected one bar container per hue level {list(hue_levels)}, got "
            f"{len(containers)}; has seaborn's barplot changed?"
        )
    return {
        (categories[round(_bar_centre(patch, horizontal=horizontal))], level): patch
        for level, container in zip(hue_levels, containers, strict=True)
        for patch in container.patches
    }


def _bars_with_errors(
    ax: Axes,
    bars: pd.DataFrame,
    *,
    category: str,
    hue: str,
    categories: Sequence[str],
    hue_levels: Sequence[str],
    horizontal: bool,
    palette: Mapping[str, object] | Sequence[object],
    error_label: str = "s.e.",
    **barplot_kws: object,
) -> dict[tuple[str, str], Rectangle]:
    """Draw seaborn bars of ``bars["value"]`` with the precomputed ``bars["se"]`` as error bars.

    One row of ``bars`` per bar, keyed by ``category`` and ``hue``; no error bar where the s.e.
    is NaN.

    Returns:
        (category, hue level) -> the bar drawn for it.
    """
    value_axis, category_axis = ("x", "y") if horizontal else ("y", "x")
    sns.barplot(
        data=bars,
        **{value_axis: "value", category_axis: category},
        hue=hue,
        order=categories,
        hue_order=hue_levels,
        palette=palette,
        errorbar=None,  # the s.e. is precomputed, not estimated from these rows
        orient="h" if horizontal else "v",
        saturation=1.0,  # the palette's colours, as in the legends
        ax=ax,
        **barplot_kws,
    )
    patches = _bar_patches(ax, categories, hue_levels, horizontal=horizontal)
    shown = bars[np.isfinite(bars["se"].to_numpy(dtype=float))]
    if len(shown):
        centres = [
            _bar_centre(patches[key], horizontal=horizontal)
            for key in zip(shown[category], shown[hue], strict=True)
        ]
        values, errors = shown["value"].to_numpy(), shown["se"].to_numpy()
        ax.errorbar(
            *((values, centres) if horizontal else (centres, values)),
            **{"xerr" if horizontal else "yerr": errors},
            fmt="none",
            ecolor="black",
            elinewidth=1,
            capsize=3,
            label=error_label,
        )
    return patches


def _draw_noise_ceiling(ax: Axes, value: float, se: float, *, vertical: bool) -> None:
    """The noise ceiling (percent) as a dashed line with a ± s.e. band behind the data."""
    se = float(np.nan_to_num(se))
    if vertical:
        ax.axvline(value, color=_CEILING_COLOR, ls="--", lw=1)
        ax.axvspan(value - se, value + se, color=_CEILING_BAND, zorder=0)
    else:
        ax.axhline(value, color=_CEILING_COLOR, ls="--", lw=1)
        ax.axhspan(value - se, value + se, color=_CEILING_BAND, zorder=0)


def _ceiling_legend_entry() -> dict[str, object]:
    return {
        f"{NOISE_CEILING_LABEL} ± s.e.": (
            Patch(color=_CEILING_BAND),
            Line2D([], [], ls="--", color=_CEILING_COLOR),
        )
    }


# ---------------------------------------------------------------- Figure 2 / Figure 4


def _lds_bar_rows(
    summary_df: pd.DataFrame,
    *,
    target: str,
    defaults: Mapping[str, float],
    methods: Sequence[str] | None,
    labels: Mapping[str, str],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Figure 2's tidy frame and its noise-ceiling rows, both from ``best_and_default``.

    The frame has one row per method row to show (``methods`` in that order, else table
    order), with ``label`` (unique), ``kind`` (bar colour), ``value``/``se`` (the headline, in
    percent: the LDS at the damping chosen on held-out subsets where the run has one, else the
    best damping's), ``optimistic`` (the in-sample best where the bar is held-out-tuned, else
    NaN) and ``default``/``default_se`` (default damping, percent).
    """
    table = best_and_default(summary_df, defaults)
    ceiling = table[table["method"] == NOISE_CEILING_METHOD]
    table = table[table["method"] != NOISE_CEILING_METHOD]
    if methods is not None:
        position = {m: i for i, m in enumerate(methods)}
        table = table[table["method"].isin(methods)]
        keys = [
            (position[m], _substituted(me, target))
            for m, me in zip(table["method"], table["measurement"], strict=True)
        ]
        table = table.iloc[sorted(range(len(table)), key=lambda i: keys[i])]
    else:
        table = in_table_order(table, target)
    if table.empty:
        raise ValueError(f"none of the methods {list(methods or [])} has rows for {target!r}.")
    rows = table.reset_index(drop=True)
    pairs = list(zip(rows["method"], rows["measurement"], strict=True))
    rows["label"] = _unique([bar_label(m, me, target, labels) for m, me in pairs], rows["method"])
    rows["kind"] = [
        "exact retraining"
        if m == "retrain"
        else ("substituted measurement" if _substituted(me, target) else "best damping")
        for m, me in pairs
    ]
    tuned = np.isfinite(rows["lds_tuned"].to_numpy(dtype=float))
    rows["value"] = 100 * np.where(tuned, rows["lds_tuned"], rows["lds_best"])
    rows["se"] = 100 * np.where(tuned, rows["se_tuned"], rows["se_best"])
    rows["optimistic"] = np.where(tuned, 100 * rows["lds_best"], np.nan)
    rows["default"], rows["default_se"] = 100 * rows["lds_default"], 100 * rows["se_default"]
    return rows, ceiling


def _draw_optimistic(ax: Axes, rows: pd.DataFrame) -> None:
    """Small crosses at the in-sample best damping's LDS (optimistic) where a bar is tuned."""
    marked = rows[np.isfinite(rows["optimistic"].to_numpy(dtype=float))]
    if not marked.empty:
        ax.scatter(
            marked["optimistic"],
            marked.index,
            marker="x",
            color="0.3",
            zorder=3,
            label="in-sample best damping (optimistic)",
        )


def _shows_default(row: NamedTuple) -> bool:
    """Whether a Figure 2 row gets a default-damping diamond (a default that is not the best)."""
    return bool(
        row.status == "ok"
        and np.isfinite(row.lds_default)
        and not (
            row.damping_default == row.damping_best
            or (np.isnan(row.damping_default) and np.isnan(row.damping_best))
        )
    )


def _draw_defaults(ax: Axes, rows: pd.DataFrame) -> None:
    """Hollow diamonds (± s.e.) at the default damping's LDS where it is not the best's."""
    marked = [(y, r) for y, r in enumerate(rows.itertuples(index=False)) if _shows_default(r)]
    if marked:
        ax.errorbar(
            [r.default for _, r in marked],
            [y for y, _ in marked],
            xerr=[np.nan_to_num(r.default_se) for _, r in marked],
            fmt="D",
            mfc="white",
            mec="black",
            ecolor="0.5",
            ms=6,
            capsize=2,
            zorder=3,
            label="default damping",
        )


def _annotate_rows(
    ax: Axes, rows: pd.DataFrame, defaults: Mapping[str, float], x_min: float
) -> None:
    """``best ± s.e. (default)`` right of each row; ``n/a (<why>)`` on rows without a bar."""
    for y, row in enumerate(rows.itertuples(index=False)):
        if row.status != "ok":
            reason = f"  n/a ({row.status}: {_short(str(row.reason), 48)})"
            ax.text(x_min, y, reason, va="center", fontsize=8, color="0.4")
            continue
        text = format_lds(row.value / 100, row.se / 100)
        if np.isfinite(row.lds_default) and row.method in defaults:
            text += f" ({row.default:.1f})"
        if np.isfinite(row.optimistic):
            text += f" [optimistic {row.optimistic:.1f}]"
        ax.annotate(text, xy=(1.01, y), xycoords=("axes fraction", "data"), va="center", fontsize=8)


def _x_range(rows: pd.DataFrame, ceiling: pd.DataFrame) -> tuple[float, float]:
    """The LDS % axis: from min(0, lowest) to the highest bar, error bar, diamond or ceiling."""
    ends = np.concatenate(
        [
            rows["value"].to_numpy() + np.nan_to_num(rows["se"].to_numpy()),
            rows["default"].to_numpy(),
            rows["optimistic"].to_numpy(dtype=float),
            100 * ceiling["lds_best"].to_numpy(),
            [0.0],
        ]
    )
    ends = ends[np.isfinite(ends)]
    return min(0.0, float(ends.min()) * 1.1), max(5.0, float(ends.max()) * 1.1)


def lds_bars_figure(
    summary_df: pd.DataFrame,
    *,
    target: str,
    default_damping: Mapping[str, float] | None = None,
    methods: Sequence[str] | None = None,
    labels: Mapping[str, str] | None = None,
    preset: str | None = None,
    title: str | None = None,
) -> Figure:
    """The figure of :func:`plot_lds_bars` (same arguments, no output path).

    Args:
        summary_df: summary table (``benchmarks.results`` schema).
        target: the ``target`` column value to plot (e.g. ``"loss"``, ``"elbo"``).
        default_damping: method -> default damping (for the bracketed number); None: the
            registry's (:func:`methods.registry.default_dampings`).
        methods: methods to show, in this order (default: every method, in table order).
        labels: method -> display label overrides (default: the registry's display names).
        preset: which preset to plot (required when the table holds several).
        title: figure title (default: ``"LDS, target: <target>"``).

    Returns:
        The figure (not managed by pyplot).
    """
    df = _one_preset(validate_summary(summary_df), preset)
    df = df[df["target"] == target]
    if df.empty:
        raise ValueError(f"no summary rows with target {target!r}.")
    defaults = dict(default_dampings(df["method"]) if default_damping is None else default_damping)
    rows, ceiling = _lds_bar_rows(
        df, target=target, defaults=defaults, methods=methods, labels=labels or {}
    )
    bars = rows[rows["status"] == "ok"]
    categories = list(rows["label"])
    kinds = [k for k in _BAR_COLORS if k in set(bars["kind"])]
    x_min, x_max = _x_range(rows, ceiling)

    n = len(rows)
    fig = Figure(figsize=(7.5, 0.9 + 0.45 * n))
    ax = fig.add_subplot()
    if len(bars):
        patches = _bars_with_errors(
            ax,
            bars,
            category="label",
            hue="kind",
            categories=categories,
            hue_levels=kinds,
            horizontal=True,
            palette=_BAR_COLORS,
            error_label="s.e. at the best damping",
            dodge=False,
            width=0.65,
            legend=False,
        )
        for (_, kind), patch in patches.items():
            if kind == "substituted measurement":
                patch.set_hatch("//")
                patch.set_edgecolor("white")
    _draw_defaults(ax, rows)
    _draw_optimistic(ax, rows)
    _annotate_rows(ax, rows, defaults, x_min)
    for row in ceiling.itertuples(index=False):
        if np.isfinite(row.lds_best):
            _draw_noise_ceiling(ax, 100 * row.lds_best, 100 * row.se_best, vertical=True)

    ax.set_ylim(n - 0.5, -0.5)  # first row on top, also when the last rows have no bar
    ax.set_xlim(x_min, x_max)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_xlabel(_LDS_AXIS_LABEL)
    ax.set_ylabel("")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    legend: dict[str, object] = {"best damping": Patch(color=_BAR_COLORS["best damping"])}
    if len(bars) and bars["method"].isin(list(defaults)).any():
        legend["default damping"] = Line2D([], [], marker="D", ls="", mfc="white", mec="black")
    if "substituted measurement" in kinds:
        legend["substituted measurement"] = Patch(
            facecolor=_BAR_COLORS["substituted measurement"], hatch="//", edgecolor="white"
        )
    if not ceiling.empty:
        legend.update(_ceiling_legend_entry())
    ax.legend(
        handles=list(legend.values()),
        labels=list(legend),
        loc="upper center",
        bbox_to_anchor=(0.5, -0.1 - 0.9 / (n + 2)),
        ncol=len(legend),
        fontsize=7,
        frameon=False,
    )
    ax.set_title(title or f"LDS, target: {target}")
    return fig


def plot_lds_bars(
    summary_df: pd.DataFrame,
    out_path: str | Path,
    *,
    target: str,
    default_damping: Mapping[str, float] | None = None,
    methods: Sequence[str] | None = None,
    labels: Mapping[str, str] | None = None,
    preset: str | None = None,
    title: str | None = None,
) -> Path:
    """Figure 2 style: horizontal bars of LDS % per method for one target.

    Bars (seaborn) show the best damping's LDS with an s.e. error bar; a hollow diamond (with
    its own error bar) marks the default damping's LDS where it differs. Rows where the method
    used a measurement other than ``target`` are hatched and labelled "(m. <measurement>)";
    exact retraining is drawn in dark grey; a :data:`NOISE_CEILING_METHOD` row becomes a dashed
    vertical line with a ±s.e. band; methods that are unavailable or failed get a text row.
    The numbers are written at the right: ``best ± s.e. (default)``.

    Args:
        summary_df: summary table (``benchmarks.results`` schema).
        out_path: PNG path to write.
        target: the ``target`` column value to plot (e.g. ``"loss"``, ``"elbo"``).
        default_damping: method -> default damping (for the bracketed number); None: the
            registry's (:func:`methods.registry.default_dampings`).
        methods: methods to show, in this order (default: every method, in table order).
        labels: method -> display label overrides (default: the registry's display names).
        preset: which preset to plot (required when the table holds several).
        title: figure title (default: ``"LDS, target: <target>"``).

    Returns:
        ``out_path``.
    """
    fig = lds_bars_figure(
        summary_df,
        target=target,
        default_damping=default_damping,
        methods=methods,
        labels=labels,
        preset=preset,
        title=title,
    )
    return _save(fig, out_path)


def plot_hessian_ablation(
    summary_df: pd.DataFrame,
    out_path: str | Path,
    *,
    target: str = "loss",
    default_damping: Mapping[str, float] | None = None,
    preset: str | None = None,
) -> Path:
    """Figure 4 style: LDS % of the K-FAC Hessian variants and exact retraining.

    The variants are :data:`HESSIAN_ABLATION_METHODS`; bars show the best damping with the
    default marked (as :func:`plot_lds_bars`).

    Args:
        summary_df: summary table (``benchmarks.results`` schema).
        out_path: PNG path to write.
        target: the ``target`` column value to plot.
        default_damping: method -> default damping; None: the registry's.
        preset: which preset to plot (required when the table holds several).

    Returns:
        ``out_path``.
    """
    return plot_lds_bars(
        summary_df,
        out_path,
        target=target,
        default_damping=default_damping,
        methods=HESSIAN_ABLATION_METHODS,
        labels=HESSIAN_ABLATION_LABELS,
        preset=preset,
        title=f"Hessian approximation ablation, target: {target}",
    )


# ---------------------------------------------------------------- damping sweep (Figs 7-10)


_HELD_OUT_STYLE = "-."
"""Line style of a swept method's held-out-tuned LDS in the damping sweep (in its colour)."""


def _sweep_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The sweep's tidy frame: one row per ``ok`` summary row, with label, values and flags.

    Columns added: ``label`` (per target), ``value``/``lo``/``hi`` (LDS % and ± s.e.) and
    ``swept`` (positive damping); rows sorted by target, table order and damping.
    """
    rows = df.copy()
    rows["label"] = [
        bar_label(m, me, t, {})
        for m, me, t in zip(rows["method"], rows["measurement"], rows["target"], strict=True)
    ]
    rows["value"] = 100 * rows["lds_mean"]
    se = 100 * np.nan_to_num(rows["lds_se"].to_numpy())
    rows["lo"], rows["hi"] = rows["value"] - se, rows["value"] + se
    rows["swept"] = np.isfinite(rows["damping"]) & (rows["damping"] > 0)
    rows["rank"] = [
        (method_sort_key(m), _substituted(me, t))
        for m, me, t in zip(rows["method"], rows["measurement"], rows["target"], strict=True)
    ]
    rows = rows.sort_values(["rank", "damping"], kind="stable").drop(columns="rank")
    return rows.reset_index(drop=True)


def _series_colors(n: int) -> list[tuple[float, float, float]]:
    """``n`` distinct line colours: tab10, then Dark2, then evenly spaced hues."""
    colors = sns.color_palette("tab10") + sns.color_palette("Dark2")
    return colors[:n] if n <= len(colors) else sns.color_palette("husl", n)


def _band(data: pd.DataFrame, color: str, label: str | None = None, **_: object) -> None:
    """FacetGrid map function: the ± s.e. band of one sweep line (``data`` sorted by damping)."""
    plt.gca().fill_between(data["damping"], data["lo"], data["hi"], color=color, alpha=0.2, lw=0)


def _finish_sweep_panel(
    ax: Axes, panel: pd.DataFrame, palette: Mapping[str, object], defaults: Mapping[str, float]
) -> None:
    """Add to one sweep panel what the FacetGrid does not draw; then the log damping axis.

    The panel holds one target's rows of :func:`_sweep_rows`; added are the methods without
    damping (dotted lines), the held-out-tuned LDS of swept methods (dash-dotted lines in the
    method's colour), the noise ceiling and the default-damping diamonds.
    """
    swept_labels = set(panel.loc[panel["swept"], "label"])
    for label, rows in panel[~panel["swept"]].groupby("label", sort=False):
        if label == NOISE_CEILING_LABEL:
            for c in rows.itertuples(index=False):
                _draw_noise_ceiling(ax, c.value, c.hi - c.value, vertical=False)
        else:
            style = _HELD_OUT_STYLE if label in swept_labels else ":"
            ax.axhline(rows["value"].max(), color=palette[label], ls=style, label=label)
    at_default = [
        swept and m in defaults and bool(np.isclose(d, defaults[m], rtol=1e-9, atol=0.0))
        for m, d, swept in zip(panel["method"], panel["damping"], panel["swept"], strict=True)
    ]
    marked = panel[np.array(at_default, dtype=bool)]
    ax.plot(
        marked["damping"],
        marked["value"],
        "D",
        mfc="none",
        mec="black",
        ms=7,
        zorder=4,
        label="default damping",
    )
    ax.set_xscale("log")
    ax.grid(alpha=0.3)


def damping_sweep_figure(
    summary_df: pd.DataFrame,
    *,
    preset: str | None = None,
    targets: Sequence[str] | None = None,
    default_damping: Mapping[str, float] | None = None,
) -> Figure:
    """The figure of :func:`plot_damping_sweep` (same arguments, no output path).

    Args:
        summary_df: summary table (``benchmarks.results`` schema).
        preset: which preset to plot (required when the table holds several).
        targets: targets to show, one panel each (default: every target with swept rows;
            per-timestep targets are never shown).
        default_damping: method -> default damping (the diamonds); None: the registry's.

    Returns:
        The FacetGrid's figure.
    """
    df = _one_preset(validate_summary(summary_df), preset)
    df = df[(df["status"] == "ok") & df["lds_mean"].notna()]
    df = df[~df["target"].str.startswith("timestep-loss:")]
    if targets is not None:
        df = df[df["target"].isin(targets)]
    rows = _sweep_rows(df)
    swept = rows[rows["swept"] & (rows["method"] != NOISE_CEILING_METHOD)]
    if swept.empty:
        raise ValueError("no 'ok' rows with a positive damping to sweep over.")
    defaults = dict(default_dampings(df["method"]) if default_damping is None else default_damping)
    panels = list(dict.fromkeys(swept["target"]))
    series = [lab for lab in dict.fromkeys(rows["label"]) if lab != NOISE_CEILING_LABEL]
    palette = dict(zip(series, _series_colors(len(series)), strict=True))

    grid = sns.FacetGrid(
        swept,
        col="target",
        col_order=panels,
        hue="label",
        hue_order=[s for s in series if s in set(swept["label"])],
        palette=palette,
        sharex=False,
        sharey=False,
        height=3.8,
        aspect=1.3,
    )
    grid.map_dataframe(_band)
    grid.map_dataframe(sns.lineplot, x="damping", y="value", marker="o", ms=4, errorbar=None)
    for target, ax in grid.axes_dict.items():
        _finish_sweep_panel(ax, rows[rows["target"] == target], palette, defaults)
        ax.set_title(f"target: {target}")
    grid.set_axis_labels("Damping factor", _LDS_AXIS_LABEL)
    legend = {
        lab: Line2D(
            [],
            [],
            color=palette[lab],
            **({"marker": "o", "ms": 4} if lab in set(swept["label"]) else {"ls": ":"}),
        )
        for lab in series
    }
    legend["default damping"] = Line2D([], [], marker="D", ls="", mfc="none", mec="black")
    if (~rows["swept"] & rows["label"].isin(set(swept["label"]))).any():
        legend["held-out-tuned damping"] = Line2D([], [], color="black", ls=_HELD_OUT_STYLE)
    if (rows["label"] == NOISE_CEILING_LABEL).any():
        legend.update(_ceiling_legend_entry())
    grid.add_legend(legend_data=legend, label_order=list(legend), title="", fontsize=7)
    return grid.figure


def plot_damping_sweep(
    summary_df: pd.DataFrame,
    out_path: str | Path,
    *,
    preset: str | None = None,
    targets: Sequence[str] | None = None,
    default_damping: Mapping[str, float] | None = None,
) -> Path:
    """Figures 7-10 style: LDS % against damping (log x axis), one panel per target.

    A seaborn FacetGrid with one line (± s.e. band) per (method, measurement); a hollow diamond
    marks each method's default damping; methods without damping are dotted horizontal
    reference lines, the noise ceiling a dashed line with a ± s.e. band. Only ``ok`` rows are
    used.

    Args:
        summary_df: summary table (``benchmarks.results`` schema).
        out_path: PNG path to write.
        preset: which preset to plot (required when the table holds several).
        targets: targets to show, one panel each (default: every target with swept rows;
            per-timestep targets are never shown).
        default_damping: method -> default damping (the diamonds); None: the registry's.

    Returns:
        ``out_path``.
    """
    fig = damping_sweep_figure(
        summary_df, preset=preset, targets=targets, default_damping=default_damping
    )
    return _save(fig, out_path)


# ---------------------------------------------------------------- Figure 3


def retrain_figure(retrain_df: pd.DataFrame) -> Figure:
    """The figure of :func:`plot_retrain_changes` (no output path)."""
    table = retrain_summary(retrain_df)
    if table.empty:
        raise ValueError("the retrain table has no rows.")
    methods = list(dict.fromkeys(table["method"]))
    label_of = dict(zip(methods, _unique([method_label(m) for m in methods], methods), strict=True))
    bars = pd.DataFrame(
        {
            "label": [label_of[m] for m in table["method"]],
            "removed": [f"{100 * f:g}% removed" for f in table["fraction"]],
            "value": table["mean"],
            "se": table["se"],
        }
    )
    categories = list(dict.fromkeys(bars["label"]))
    levels = [f"{100 * f:g}% removed" for f in sorted(table["fraction"].unique())]
    fig = Figure(figsize=(7.0, 1.0 + 0.35 * len(categories) * len(levels)))
    ax = fig.add_subplot()
    _bars_with_errors(
        ax,
        bars,
        category="label",
        hue="removed",
        categories=categories,
        hue_levels=levels,
        horizontal=True,
        palette=sns.color_palette("tab10", len(levels)),
    )
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_xlabel("Change in loss after retraining (mean ± s.e. over queries)")
    ax.set_ylabel("")
    ax.set_title("Retraining without top influences")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    sns.move_legend(ax, "best", title=None, fontsize=8)
    return fig


def plot_retrain_changes(retrain_df: pd.DataFrame, out_path: str | Path) -> Path:
    """Figure 3 style: change in loss after retraining without the top influences.

    Seaborn bars grouped by method (table order), one bar per removal fraction, error bars =
    s.e.
    """
    return _save(retrain_figure(retrain_df), out_path)


# ---------------------------------------------------------------- Figure 6


def _compression_rows(compression_df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Figure 6's tidy frame and the bit-width categories in axis order.

    The frame's columns: ``bits`` (``int<b>`` or ``none``), ``metric``, ``value`` and ``se``
    (in percent).
    """
    missing = [c for c in ("bits", "metric", "value") if c not in compression_df]
    if missing:
        raise ValueError(f"compression table is missing column(s) {missing}.")
    df = compression_df.copy()
    if df.empty:
        raise ValueError("the compression table has no rows.")
    df["bits"] = pd.to_numeric(df["bits"], errors="raise")
    if "se" not in df:
        df["se"] = np.nan
    bits = sorted(b for b in df["bits"].unique() if np.isfinite(b))
    categories = [f"int{int(b)}" for b in bits] + (["none"] if df["bits"].isna().any() else [])
    rows = pd.DataFrame(
        {
            "bits": ["none" if math.isnan(b) else f"int{int(b)}" for b in df["bits"]],
            "metric": df["metric"].astype(str),
            "value": 100 * df["value"].astype(float),
            "se": 100 * pd.to_numeric(df["se"], errors="coerce").astype(float),
        }
    )
    rows = rows.drop_duplicates(["bits", "metric"])  # the first value of a (bits, metric) pair
    return rows.reset_index(drop=True), categories


def compression_figure(compression_df: pd.DataFrame) -> Figure:
    """The figure of :func:`plot_compression` (no output path)."""
    rows, categories = _compression_rows(compression_df)
    metrics = list(dict.fromkeys(rows["metric"]))
    fig = Figure(figsize=(1.5 + 1.1 * len(categories) * max(1, len(metrics) / 2), 3.6))
    ax = fig.add_subplot()
    if not (rows["se"].fillna(0) > 0).any():
        rows["se"] = np.nan  # no error bars at all rather than zero-length ones
    _bars_with_errors(
        ax,
        rows,
        category="bits",
        hue="metric",
        categories=categories,
        hue_levels=metrics,
        horizontal=False,
        palette=sns.color_palette("tab10", len(metrics)),
    )
    ax.set_xlabel("Query-gradient quantisation")
    lowest = float(rows["value"].min())
    ax.set_ylim(bottom=max(0.0, lowest - 10.0) if lowest > 0 else None)
    ax.set_ylabel("%")
    ax.set_title("Compression ablation")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    sns.move_legend(ax, "best", title=None, fontsize=8)
    return fig


def plot_compression(compression_df: pd.DataFrame, out_path: str | Path) -> Path:
    """Figure 6 style: a metric per quantisation bit width, seaborn bars grouped by metric.

    A metric is the LDS, or the rank/Pearson correlation with the uncompressed scores; error
    bars come from an optional ``se``.

    Args:
        compression_df: columns ``bits`` (int; NaN = uncompressed, shown as "none"), ``metric``
            (text), ``value`` (fraction), optional ``se``.
        out_path: PNG path to write.

    Returns:
        ``out_path``.
    """
    return _save(compression_figure(compression_df), out_path)


# ---------------------------------------------------------------- Figure 11


def _timestep(value: str) -> int | None:
    match = _TIMESTEP_RE.match(value)
    return int(match.group(1)) if match else None


def timestep_matrix(
    summary_df: pd.DataFrame,
    *,
    method: str,
    damping: float | None = None,
    preset: str | None = None,
) -> pd.DataFrame:
    """LDS of each per-timestep loss measurement (rows) against each per-timestep target (cols).

    Uses the ``ok`` rows of ``method`` whose ``measurement`` and ``target`` are both
    ``"timestep-loss:<t>"``; rows and columns are sorted by ``t``. When a cell has rows for
    several dampings, ``damping`` must choose one (ValueError otherwise).

    Args:
        summary_df: summary table (``benchmarks.results`` schema).
        method: the method whose rows are used.
        damping: the damping to use when a cell has several; None: the only one.
        preset: which preset to use (required when the table holds several).

    Returns:
        DataFrame of LDS fractions, index = measurement timesteps, columns = target timesteps
        (NaN where a pair was not evaluated).
    """
    df = _one_preset(validate_summary(summary_df), preset)
    df = df[(df["method"] == method) & (df["status"] == "ok")].copy()
    df["t_measurement"] = [_timestep(v) for v in df["measurement"]]
    df["t_target"] = [_timestep(v) for v in df["target"]]
    df = df[df["t_measurement"].notna() & df["t_target"].notna()]
    if damping is not None:
        df = df[np.isclose(df["damping"], damping, rtol=1e-9, atol=0.0)]
    if df.empty:
        raise ValueError(f"no 'ok' timestep-loss:<t> rows for method {method!r}.")
    counts = df.groupby(["t_measurement", "t_target"]).size()
    if (counts > 1).any():
        raise ValueError(
            f"method {method!r} has several rows per (measurement, target) timestep pair "
            f"(dampings {sorted(df['damping'].unique())}); pass damping=... to choose one."
        )
    matrix = df.pivot(index="t_measurement", columns="t_target", values="lds_mean")
    matrix = matrix.sort_index(axis=0).sort_index(axis=1)
    matrix.index = matrix.index.astype(int)
    matrix.columns = matrix.columns.astype(int)
    matrix.index.name, matrix.columns.name = "measurement t", "target t"
    return matrix


def timestep_heatmap_figure(
    summary_df: pd.DataFrame,
    *,
    method: str,
    damping: float | None = None,
    preset: str | None = None,
) -> Figure:
    """The figure of :func:`plot_timestep_heatmap` (same arguments, no output path).

    Args:
        summary_df: summary table (``benchmarks.results`` schema).
        method: the method whose rows are shown.
        damping: the damping to use when a cell has several; None: the only one.
        preset: which preset to plot (required when the table holds several).

    Returns:
        The figure (not managed by pyplot).
    """
    matrix = 100 * timestep_matrix(summary_df, method=method, damping=damping, preset=preset)
    fig = Figure(figsize=(1.5 + 0.7 * matrix.shape[1], 1.2 + 0.55 * matrix.shape[0]))
    ax = fig.add_subplot()
    sns.heatmap(
        matrix,
        ax=ax,
        annot=True,
        fmt=".1f",
        cmap="viridis",
        cbar_kws={"label": "LDS %"},
        annot_kws={"fontsize": 7},
    )
    ax.set_xlabel("target: loss at timestep t")
    ax.set_ylabel("measurement: loss at timestep t")
    ax.set_title(f"{method_label(method)}: per-timestep LDS")
    return fig


def plot_timestep_heatmap(
    summary_df: pd.DataFrame,
    out_path: str | Path,
    *,
    method: str,
    damping: float | None = None,
    preset: str | None = None,
) -> Path:
    """Figure 11 style: seaborn heatmap of LDS % of per-timestep measurements against targets.

    Annotated cells; rows are per-timestep loss measurements, columns per-timestep targets,
    from :func:`timestep_matrix`.

    Args:
        summary_df: summary table (``benchmarks.results`` schema).
        out_path: PNG path to write.
        method: the method whose rows are shown.
        damping: the damping to use when a cell has several; None: the only one.
        preset: which preset to plot (required when the table holds several).

    Returns:
        ``out_path``.
    """
    fig = timestep_heatmap_figure(summary_df, method=method, damping=damping, preset=preset)
    return _save(fig, out_path)


# ---------------------------------------------------------------- Figure 17


def correlations(values_a: np.ndarray, values_b: np.ndarray) -> tuple[float, float]:
    """Pearson r and Spearman rho of two ``[n_queries]`` arrays."""
    a = np.asarray(values_a, dtype=np.float64)
    b = np.asarray(values_b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size < 2:
        raise ValueError(f"need two 1-D arrays of the same length >= 2, got {a.shape}, {b.shape}.")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("the measurements contain NaN or inf.")
    return float(stats.pearsonr(a, b).statistic), float(stats.spearmanr(a, b).statistic)


def model_correlation_figure(
    values_a: np.ndarray,
    values_b: np.ndarray,
    *,
    label_a: str = "model A",
    label_b: str = "model B",
    measurement: str = "elbo",
) -> Figure:
    """The figure of :func:`plot_model_correlation` (same arguments, no output path).

    Args:
        values_a: ``# [n_queries]`` measurements by the first model.
        values_b: ``# [n_queries]`` measurements by the second model.
        label_a: name of the first model (x axis).
        label_b: name of the second model (y axis).
        measurement: name of the measurement (axis labels).

    Returns:
        The figure (not managed by pyplot).
    """
    r, rho = correlations(values_a, values_b)
    fig = Figure(figsize=(4.0, 4.0))
    ax = fig.add_subplot()
    sns.scatterplot(x=np.asarray(values_a), y=np.asarray(values_b), s=10, alpha=0.7, ax=ax)
    lo = float(min(np.min(values_a), np.min(values_b)))
    hi = float(max(np.max(values_a), np.max(values_b)))
    ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls="--")
    ax.set_xlabel(f"{measurement}: {label_a}")
    ax.set_ylabel(f"{measurement}: {label_b}")
    ax.set_title(f"r = {r:.3f}, ρ = {rho:.3f}")
    ax.grid(alpha=0.3)
    return fig


def plot_model_correlation(
    values_a: np.ndarray,
    values_b: np.ndarray,
    out_path: str | Path,
    *,
    label_a: str = "model A",
    label_b: str = "model B",
    measurement: str = "elbo",
) -> Path:
    """Figure 17 style: scatter of one measurement on the same queries by two models.

    The two models are trained separately; Pearson r and Spearman rho are in the title.

    Args:
        values_a: ``[n_queries]`` measurements by the first model.
        values_b: ``[n_queries]`` measurements by the second model.
        out_path: PNG path to write.
        label_a: name of the first model (x axis).
        label_b: name of the second model (y axis).
        measurement: name of the measurement (axis labels).

    Returns:
        ``out_path``.
    """
    fig = model_correlation_figure(
        values_a, values_b, label_a=label_a, label_b=label_b, measurement=measurement
    )
    return _save(fig, out_path)


# ---------------------------------------------------------------- Figure 1


class InfluentialSelection(NamedTuple):
    """Indices into the training set, each ``[k]`` int64."""

    positive: np.ndarray
    """Largest scores first (removal most increases the query's loss)."""
    negative: np.ndarray
    """Most negative scores first (removal most decreases the loss)."""
    neutral: np.ndarray
    """Smallest ``|score|`` first (removal changes the loss least)."""


def select_influential(scores_row: np.ndarray, k: int) -> InfluentialSelection:
    """The ``k`` most positive, most negative and most neutral training examples of one query.

    Ties are broken by the lower training index (stable sort). The three lists may overlap when
    ``3 * k`` exceeds the training-set size.

    Args:
        scores_row: ``[n_train]`` finite scores of one query.
        k: how many of each, ``1 <= k <= n_train``.
    """
    s = np.asarray(scores_row, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores_row must be 1-D [n_train], got shape {s.shape}.")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores_row contains NaN or inf.")
    if not isinstance(k, int | np.integer) or not 1 <= k <= s.size:
        raise ValueError(f"k must be an integer in [1, {s.size}], got {k!r}.")
    return InfluentialSelection(
        positive=np.argsort(-s, kind="stable")[:k].astype(np.int64),
        negative=np.argsort(s, kind="stable")[:k].astype(np.int64),
        neutral=np.argsort(np.abs(s), kind="stable")[:k].astype(np.int64),
    )


def image_for_display(image: np.ndarray) -> np.ndarray:
    """``[C, H, W]`` in [-1, 1] (C = 1 or 3) -> ``[H, W]`` or ``[H, W, 3]`` in [0, 1]."""
    x = np.asarray(image, dtype=np.float64)
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"image must be [C, H, W] with C in (1, 3), got shape {x.shape}.")
    x = np.clip((x + 1.0) / 2.0, 0.0, 1.0)
    return x[0] if x.shape[0] == 1 else np.transpose(x, (1, 2, 0))


def _image_caption(score: float, label: str | None) -> str:
    """The text under a training image: its (shortened) label over its score."""
    return f"{score:.2g}" if label is None else f"{_short(label, 14)}\n{score:.2g}"


def influence_grid_figure(
    query_images: np.ndarray,
    train_images: np.ndarray,
    scores: np.ndarray,
    *,
    k: int = 5,
    train_labels: Sequence[str] | None = None,
) -> Figure:
    """The figure of :func:`plot_influence_grid` (same arguments, no output path).

    Args:
        query_images: ``# [Q, C, H, W]`` (or one ``[C, H, W]``) in [-1, 1], C = 1 or 3.
        train_images: ``# [N, C, H, W]`` in [-1, 1].
        scores: ``# [Q, N]`` (or ``[N]`` for one query) attribution scores.
        k: training images per group.
        train_labels: ``N`` names (e.g. file names) shown above each image's score; None shows
            the score only.

    Returns:
        The figure (not managed by pyplot).
    """
    queries = np.asarray(query_images)
    train = np.asarray(train_images)
    sc = np.asarray(scores, dtype=np.float64)
    if queries.ndim == 3:
        queries = queries[None]
    if sc.ndim == 1:
        sc = sc[None]
    if queries.ndim != 4 or train.ndim != 4:
        raise ValueError(
            f"images must be [N, C, H, W]; got queries {queries.shape}, train {train.shape}."
        )
    if sc.shape != (queries.shape[0], train.shape[0]):
        raise ValueError(
            f"scores must be [n_queries, n_train] = {(queries.shape[0], train.shape[0])}, "
            f"got {sc.shape}."
        )
    if train_labels is not None and len(train_labels) != train.shape[0]:
        raise ValueError(f"train_labels has {len(train_labels)} names for {train.shape[0]} images.")
    groups = ("Top influences", "Most negative", "Most neutral")
    gap = 0.25
    ratios = [1.0] + [v for _ in groups for v in [gap] + [1.0] * k]
    n_rows = queries.shape[0]
    fig = Figure(figsize=(0.95 * sum(ratios), 1.25 * n_rows + 0.4))
    axes = fig.subplots(
        n_rows,
        len(ratios),
        squeeze=False,
        gridspec_kw={"width_ratios": ratios, "wspace": 0.05, "hspace": 0.35},
    )
    gray = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}
    for q in range(n_rows):
        row = axes[q]
        for ax in row:
            ax.axis("off")
        img = image_for_display(queries[q])
        row[0].imshow(img, **(gray if img.ndim == 2 else {}))
        if q == 0:
            row[0].set_title("Generated\nsample", fontsize=8)
        selection = select_influential(sc[q], k)
        for g, (name, idx) in enumerate(zip(groups, selection, strict=True)):
            start = 1 + g * (k + 1) + 1
            for i, j in enumerate(idx):
                ax = row[start + i]
                img = image_for_display(train[j])
                ax.imshow(img, **(gray if img.ndim == 2 else {}))
                ax.text(
                    0.5,
                    -0.08,
                    _image_caption(sc[q, j], None if train_labels is None else train_labels[j]),
                    transform=ax.transAxes,
                    ha="center",
                    va="top",
                    fontsize=6,
                )
            if q == 0:
                row[start + (k - 1) // 2].set_title(name, fontsize=8)
    return fig


def plot_influence_grid(
    query_images: np.ndarray,
    train_images: np.ndarray,
    scores: np.ndarray,
    out_path: str | Path,
    *,
    k: int = 5,
    train_labels: Sequence[str] | None = None,
) -> Path:
    """Figure 1 style (a matplotlib image grid): each generated sample with its influences.

    Each sample's row shows its ``k`` top, most negative and most neutral training images
    (:func:`select_influential`), the score (and the image's label, if given) under each image.

    Args:
        query_images: ``[Q, C, H, W]`` (or one ``[C, H, W]``) in [-1, 1], C = 1 or 3.
        train_images: ``[N, C, H, W]`` in [-1, 1].
        scores: ``[Q, N]`` (or ``[N]`` for one query) attribution scores.
        out_path: PNG path to write.
        k: training images per group.
        train_labels: ``N`` names (e.g. file names) shown under the images; None: none.

    Returns:
        ``out_path``.
    """
    figure = influence_grid_figure(
        query_images, train_images, scores, k=k, train_labels=train_labels
    )
    return _save(figure, out_path)
