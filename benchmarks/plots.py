"""The paper's figures, drawn from stored result tables and arrays (never recomputed here).

Every ``plot_*`` function takes tables/arrays plus an output path, draws on a fresh
:class:`matplotlib.figure.Figure` (no pyplot state, no backend selection: PNGs are rendered by
Agg), writes the PNG atomically and returns its path. Pure selection helpers
(:func:`select_influential`, :func:`timestep_matrix`, :func:`retrain_summary`, ...) are separate
from drawing so they can be tested exactly.

LDS values in tables are fractions; figures show percent.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from scipy import stats

from benchmarks.metrics import summarize
from benchmarks.results import (
    NOISE_CEILING_METHOD,
    PAPER_DEFAULT_DAMPING,
    atomic_write_bytes,
    best_and_default,
    format_lds,
    validate_summary,
)

__all__ = [
    "DISPLAY_NAMES",
    "HESSIAN_ABLATION_LABELS",
    "HESSIAN_ABLATION_METHODS",
    "InfluentialSelection",
    "bar_label",
    "correlations",
    "image_for_display",
    "plot_compression",
    "plot_damping_sweep",
    "plot_hessian_ablation",
    "plot_influence_grid",
    "plot_lds_bars",
    "plot_model_correlation",
    "plot_retrain_changes",
    "plot_timestep_heatmap",
    "retrain_summary",
    "select_influential",
    "timestep_matrix",
]

DISPLAY_NAMES: dict[str, str] = {
    "random": "random",
    "clip": "CLIP cosine",
    "trak": "TRAK",
    "dtrak": "D-TRAK",
    "kfac": "K-FAC influence",
    "kfac-reduce": "K-FAC influence (reduce)",
    "kfac-empirical": "K-FAC influence (empirical)",
    "kfac-empirical-reduce": "K-FAC influence (empirical, reduce)",
    "retrain": "exact retraining",
    NOISE_CEILING_METHOD: "noise ceiling",
}
"""Labels of the built-in methods in figures; other methods are shown by their name."""

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
    "retrain": "exact retraining",
}

_METHOD_ORDER: tuple[str, ...] = (
    "random",
    "clip",
    "trak",
    "dtrak",
    "kfac-empirical-reduce",
    "kfac-reduce",
    "kfac-empirical",
    "kfac",
)
_NO_MEASUREMENT = {"", "-", "none", "n/a", "nan"}
_TIMESTEP_RE = re.compile(r"^timestep-loss:(\d+)$")
_PNG_DPI = 120


# ---------------------------------------------------------------- shared helpers


def _short(text: str, width: int) -> str:
    """A reason cut to fit beside a bar (the full text is in the summary CSV)."""
    return text if len(text) <= width else text[: width - 1] + "…"


def _save(fig: Figure, out_path: str | Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_PNG_DPI, bbox_inches="tight")
    return atomic_write_bytes(Path(out_path), buffer.getvalue())


def _substituted(measurement: str, target: str) -> bool:
    return measurement.strip().lower() not in _NO_MEASUREMENT and measurement != target


def bar_label(method: str, measurement: str, target: str, labels: Mapping[str, str]) -> str:
    """Row label of a bar: the method's display name, plus ``(m. <measurement>)`` when the
    method used a measurement other than the target (the paper's "m. loss" rows)."""
    name = labels.get(method, DISPLAY_NAMES.get(method, method))
    return f"{name} (m. {measurement})" if _substituted(measurement, target) else name


def _method_rank(method: str) -> tuple[int, str]:
    if method == "retrain":
        return (len(_METHOD_ORDER) + 1, method)
    if method in _METHOD_ORDER:
        return (_METHOD_ORDER.index(method), method)
    return (len(_METHOD_ORDER), method)


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


# ---------------------------------------------------------------- Figure 2 / Figure 4


def plot_lds_bars(
    summary_df: pd.DataFrame,
    out_path: str | Path,
    *,
    target: str,
    default_damping: Mapping[str, float] = PAPER_DEFAULT_DAMPING,
    methods: Sequence[str] | None = None,
    labels: Mapping[str, str] | None = None,
    preset: str | None = None,
    title: str | None = None,
) -> Path:
    """Figure 2 style: horizontal bars of LDS % per method for one target.

    Bars show the best damping's LDS with an s.e. error bar; a hollow diamond (with its own
    error bar) marks the default damping's LDS where it differs. Rows where the method used a
    measurement other than ``target`` are hatched and labelled "(m. <measurement>)"; exact
    retraining is drawn in dark grey; a :data:`NOISE_CEILING_METHOD` row becomes a dashed
    vertical line with a ±s.e. band; methods that are unavailable or failed get a text row.
    The numbers are written at the right: ``best ± s.e. (default)``.

    Args:
        summary_df: summary table (``benchmarks.results`` schema).
        out_path: PNG path to write.
        target: the ``target`` column value to plot (e.g. ``"loss"``, ``"elbo"``).
        default_damping: method -> default damping (for the bracketed number).
        methods: methods to show, in this order (default: every method, canonical order).
        labels: method -> display label overrides.
        preset: which preset to plot (required when the table holds several).
        title: figure title (default: ``"LDS, target: <target>"``).
    """
    df = _one_preset(validate_summary(summary_df), preset)
    df = df[df["target"] == target]
    if df.empty:
        raise ValueError(f"no summary rows with target {target!r}.")
    table = best_and_default(df, default_damping)
    ceiling = table[table["method"] == NOISE_CEILING_METHOD]
    table = table[table["method"] != NOISE_CEILING_METHOD]
    if methods is not None:
        table = table[table["method"].isin(methods)]
        order = {m: i for i, m in enumerate(methods)}
        rank = [
            (order[m], _substituted(me, target))
            for m, me in zip(table["method"], table["measurement"], strict=True)
        ]
    else:
        rank = [
            (_method_rank(m)[0], _substituted(me, target), m)
            for m, me in zip(table["method"], table["measurement"], strict=True)
        ]
    if table.empty:
        raise ValueError(f"none of the methods {list(methods or [])} has rows for {target!r}.")
    table = table.iloc[sorted(range(len(table)), key=lambda i: rank[i])].reset_index(drop=True)
    labels = dict(labels or {})

    n = len(table)
    fig = Figure(figsize=(7.5, 0.9 + 0.45 * n))
    ax = fig.add_subplot()
    y = np.arange(n)[::-1]  # first row on top
    finite = np.concatenate(
        [
            table["lds_best"].to_numpy() + np.nan_to_num(table["se_best"].to_numpy()),
            table["lds_default"].to_numpy(),
            ceiling["lds_best"].to_numpy(),
            [0.0],
        ]
    )
    finite = finite[np.isfinite(finite)] * 100
    x_max = max(5.0, float(finite.max()) * 1.1)
    x_min = min(0.0, float(finite.min()) * 1.1)

    for yi, row in zip(y, table.itertuples(index=False), strict=True):
        substituted = _substituted(row.measurement, target)
        if row.status != "ok":
            ax.text(
                x_min,
                yi,
                f"  n/a ({row.status}: {_short(str(row.reason), 48)})",
                va="center",
                fontsize=8,
                color="0.4",
            )
            continue
        color = "0.25" if row.method == "retrain" else ("C1" if substituted else "C0")
        ax.barh(
            yi,
            100 * row.lds_best,
            xerr=100 * np.nan_to_num(row.se_best),
            color=color,
            hatch="//" if substituted else None,
            edgecolor="white" if substituted else color,
            height=0.65,
            capsize=3,
            error_kw={"elinewidth": 1},
        )
        show_default = np.isfinite(row.lds_default) and not (
            row.damping_default == row.damping_best
            or (np.isnan(row.damping_default) and np.isnan(row.damping_best))
        )
        if show_default:
            ax.errorbar(
                100 * row.lds_default,
                yi,
                xerr=100 * np.nan_to_num(row.se_default),
                fmt="D",
                mfc="white",
                mec="black",
                ecolor="0.5",
                ms=6,
                capsize=2,
                zorder=3,
            )
        text = format_lds(row.lds_best, row.se_best)
        if np.isfinite(row.lds_default) and row.method in default_damping:
            text += f" ({100 * row.lds_default:.1f})"
        ax.annotate(
            text, xy=(1.01, yi), xycoords=("axes fraction", "data"), va="center", fontsize=8
        )

    for row in ceiling.itertuples(index=False):
        if np.isfinite(row.lds_best):
            c, se = 100 * row.lds_best, 100 * np.nan_to_num(row.se_best)
            ax.axvline(c, color="0.3", ls="--", lw=1)
            ax.axvspan(c - se, c + se, color="0.85", zorder=0)

    ax.set_yticks(y)
    ax.set_yticklabels(
        [bar_label(r.method, r.measurement, target, labels) for r in table.itertuples()]
    )
    ax.set_xlim(x_min, x_max)
    ax.set_ylim(-0.7, n - 0.3)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_xlabel("Rank correlation % (LDS)")
    ax.grid(axis="x", alpha=0.3)
    handles = [Patch(color="C0", label="best damping")]
    if (table["status"] == "ok").any() and table["method"].isin(list(default_damping)).any():
        handles.append(ax.plot([], [], "D", mfc="white", mec="black", label="default damping")[0])
    if any(_substituted(m, target) for m in table["measurement"]):
        handles.append(
            Patch(facecolor="C1", hatch="//", edgecolor="white", label="substituted measurement")
        )
    if not ceiling.empty:
        handles.append(ax.plot([], [], ls="--", color="0.3", label="noise ceiling")[0])
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.1 - 0.9 / (n + 2)),
        ncol=len(handles),
        fontsize=7,
        frameon=False,
    )
    ax.set_title(title or f"LDS, target: {target}")
    return _save(fig, out_path)


def plot_hessian_ablation(
    summary_df: pd.DataFrame,
    out_path: str | Path,
    *,
    target: str = "loss",
    default_damping: Mapping[str, float] = PAPER_DEFAULT_DAMPING,
    preset: str | None = None,
) -> Path:
    """Figure 4 style: LDS % of the K-FAC Hessian variants (:data:`HESSIAN_ABLATION_METHODS`)
    and exact retraining, best damping with the default marked (as :func:`plot_lds_bars`)."""
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


def plot_damping_sweep(
    summary_df: pd.DataFrame,
    out_path: str | Path,
    *,
    preset: str | None = None,
    targets: Sequence[str] | None = None,
) -> Path:
    """Figures 7-10 style: LDS % against damping (log x axis), one panel per target, one line
    (± s.e. band) per (method, measurement); methods without damping are dotted horizontal
    reference lines. Only ``ok`` rows are used."""
    df = _one_preset(validate_summary(summary_df), preset)
    df = df[(df["status"] == "ok") & df["lds_mean"].notna()]
    df = df[~df["target"].str.startswith("timestep-loss:")]
    if targets is not None:
        df = df[df["target"].isin(targets)]
    swept = df[np.isfinite(df["damping"]) & (df["damping"] > 0)]
    if swept.empty:
        raise ValueError("no 'ok' rows with a positive damping to sweep over.")
    panel_targets = list(dict.fromkeys(swept["target"]))
    all_keys = sorted(
        {(m, me) for m, me in zip(df["method"], df["measurement"], strict=True)},
        key=lambda k: (_method_rank(k[0]), k[1]),
    )
    colors = {key: f"C{i % 10}" for i, key in enumerate(all_keys)}  # same colour in every panel
    fig = Figure(figsize=(5.0 * len(panel_targets), 3.8))
    axes = fig.subplots(1, len(panel_targets), squeeze=False)[0]
    for ax, target in zip(axes, panel_targets, strict=True):
        sub = df[df["target"] == target]
        keys = sorted(
            {(m, me) for m, me in zip(sub["method"], sub["measurement"], strict=True)},
            key=lambda k: (_method_rank(k[0]), k[1]),
        )
        for method, measurement in keys:
            rows = sub[(sub["method"] == method) & (sub["measurement"] == measurement)]
            label = bar_label(method, measurement, target, {})
            color = colors[(method, measurement)]
            with_d = rows[np.isfinite(rows["damping"]) & (rows["damping"] > 0)]
            with_d = with_d.sort_values("damping")
            if len(with_d):
                x = with_d["damping"].to_numpy()
                m = 100 * with_d["lds_mean"].to_numpy()
                se = 100 * np.nan_to_num(with_d["lds_se"].to_numpy())
                ax.plot(x, m, "o-", color=color, label=label, ms=4)
                ax.fill_between(x, m - se, m + se, color=color, alpha=0.2, lw=0)
            else:
                ax.axhline(100 * rows["lds_mean"].max(), color=color, ls=":", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("Damping factor")
        ax.set_ylabel("Rank correlation % (LDS)")
        ax.set_title(f"target: {target}")
        ax.grid(alpha=0.3)
        ax.legend(
            fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False
        )
    return _save(fig, out_path)


# ---------------------------------------------------------------- Figure 3


def retrain_summary(retrain_df: pd.DataFrame) -> pd.DataFrame:
    """Mean ± s.e. over queries of the change in loss after retraining without top influences.

    Args:
        retrain_df: long table with columns ``method``, ``fraction`` (removed fraction of the
            training set, e.g. 0.02), ``query``, ``delta_loss`` (retrained minus original loss).

    Returns:
        Columns ``method, fraction, mean, se, n``, sorted by method order then fraction.
    """
    missing = [c for c in ("method", "fraction", "query", "delta_loss") if c not in retrain_df]
    if missing:
        raise ValueError(
            f"retrain table is missing column(s) {missing}; need method, fraction, query, "
            "delta_loss."
        )
    records = []
    for (method, fraction), group in retrain_df.groupby(["method", "fraction"], sort=False):
        mean, se, n = summarize(group["delta_loss"].to_numpy(dtype=np.float64))
        records.append(
            {"method": str(method), "fraction": float(fraction), "mean": mean, "se": se, "n": n}
        )
    out = pd.DataFrame.from_records(records, columns=["method", "fraction", "mean", "se", "n"])
    if out.empty:
        return out
    order = [(_method_rank(m), f) for m, f in zip(out["method"], out["fraction"], strict=True)]
    return out.iloc[sorted(range(len(out)), key=lambda i: order[i])].reset_index(drop=True)


def plot_retrain_changes(retrain_df: pd.DataFrame, out_path: str | Path) -> Path:
    """Figure 3 style: change in loss after retraining without the top influences; grouped
    horizontal bars per method, one bar per removal fraction, error bars = s.e."""
    table = retrain_summary(retrain_df)
    if table.empty:
        raise ValueError("the retrain table has no rows.")
    methods = list(dict.fromkeys(table["method"]))
    fractions = sorted(table["fraction"].unique())
    n_f = len(fractions)
    height = 0.8 / n_f
    fig = Figure(figsize=(7.0, 1.0 + 0.35 * len(methods) * n_f))
    ax = fig.add_subplot()
    base = np.arange(len(methods))[::-1]
    for i, fraction in enumerate(fractions):
        sub = table[table["fraction"] == fraction].set_index("method")
        present = [m for m in methods if m in sub.index]
        y = np.array([base[methods.index(m)] for m in present]) + 0.4 - height * (i + 0.5)
        ax.barh(
            y,
            sub.loc[present, "mean"],
            xerr=np.nan_to_num(sub.loc[present, "se"]),
            height=height * 0.9,
            color=f"C{i}",
            capsize=2,
            label=f"{100 * fraction:g}% removed",
        )
    ax.set_yticks(base)
    ax.set_yticklabels([DISPLAY_NAMES.get(m, m) for m in methods])
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_xlabel("Change in loss after retraining (mean ± s.e. over queries)")
    ax.set_title("Retraining without top influences")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_path)


# ---------------------------------------------------------------- Figure 6


def plot_compression(compression_df: pd.DataFrame, out_path: str | Path) -> Path:
    """Figure 6 style: a metric (LDS, or rank/Pearson correlation with the uncompressed scores)
    per quantisation bit width, grouped bars per metric, error bars from an optional ``se``.

    Args:
        compression_df: columns ``bits`` (int; NaN = uncompressed, shown as "none"), ``metric``
            (text), ``value`` (fraction), optional ``se``.
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
    has_none = df["bits"].isna().any()
    categories = [f"int{int(b)}" for b in bits] + (["none"] if has_none else [])
    metrics = list(dict.fromkeys(df["metric"]))
    width = 0.8 / len(metrics)
    fig = Figure(figsize=(1.5 + 1.1 * len(categories) * max(1, len(metrics) / 2), 3.6))
    ax = fig.add_subplot()
    for i, metric in enumerate(metrics):
        sub = df[df["metric"] == metric]
        xs, ys, es = [], [], []
        for j, b in enumerate([*bits, math.nan] if has_none else bits):
            hit = sub[sub["bits"].isna()] if math.isnan(b) else sub[sub["bits"] == b]
            if len(hit):
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(100 * float(hit["value"].iloc[0]))
                es.append(100 * float(np.nan_to_num(hit["se"].iloc[0])))
        ax.bar(
            xs,
            ys,
            yerr=es if any(e > 0 for e in es) else None,
            width=width * 0.9,
            color=f"C{i}",
            capsize=2,
            label=str(metric),
        )
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories)
    ax.set_xlabel("Query-gradient quantisation")
    lowest = 100 * float(df["value"].min())
    ax.set_ylim(bottom=max(0.0, lowest - 10.0) if lowest > 0 else None)
    ax.set_ylabel("%")
    ax.set_title("Compression ablation")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_path)


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


def plot_timestep_heatmap(
    summary_df: pd.DataFrame,
    out_path: str | Path,
    *,
    method: str,
    damping: float | None = None,
    preset: str | None = None,
) -> Path:
    """Figure 11 style: heatmap of LDS % (annotated) of per-timestep loss measurements (rows)
    against per-timestep targets (columns), from :func:`timestep_matrix`."""
    import seaborn as sns  # heavy import, only when drawing

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
    ax.set_title(f"{DISPLAY_NAMES.get(method, method)}: per-timestep LDS")
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


def plot_model_correlation(
    values_a: np.ndarray,
    values_b: np.ndarray,
    out_path: str | Path,
    *,
    label_a: str = "model A",
    label_b: str = "model B",
    measurement: str = "elbo",
) -> Path:
    """Figure 17 style: scatter of one measurement on the same queries (``[n_queries]`` each) as
    measured by two separately trained models, with Pearson r and Spearman rho in the title."""
    r, rho = correlations(values_a, values_b)
    fig = Figure(figsize=(4.0, 4.0))
    ax = fig.add_subplot()
    ax.scatter(values_a, values_b, s=10, alpha=0.7)
    lo = float(min(np.min(values_a), np.min(values_b)))
    hi = float(max(np.max(values_a), np.max(values_b)))
    ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8, ls="--")
    ax.set_xlabel(f"{measurement}: {label_a}")
    ax.set_ylabel(f"{measurement}: {label_b}")
    ax.set_title(f"r = {r:.3f}, ρ = {rho:.3f}")
    ax.grid(alpha=0.3)
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


def plot_influence_grid(
    query_images: np.ndarray,
    train_images: np.ndarray,
    scores: np.ndarray,
    out_path: str | Path,
    *,
    k: int = 5,
) -> Path:
    """Figure 1 style: each generated sample with its ``k`` top, most negative and most neutral
    training images (:func:`select_influential`), the score under each image.

    Args:
        query_images: ``[Q, C, H, W]`` (or one ``[C, H, W]``) in [-1, 1], C = 1 or 3.
        train_images: ``[N, C, H, W]`` in [-1, 1].
        scores: ``[Q, N]`` (or ``[N]`` for one query) attribution scores.
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
                    f"{sc[q, j]:.2g}",
                    transform=ax.transAxes,
                    ha="center",
                    va="top",
                    fontsize=6,
                )
            if q == 0:
                row[start + (k - 1) // 2].set_title(name, fontsize=8)
    return _save(fig, out_path)
