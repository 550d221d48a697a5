"""Build every figure and Markdown table for which stored results exist.

    python -m benchmarks.reports --results results/ --out results/report/

Reads stored result files only (never recomputes anything) and skips, with a printed note,
every figure whose inputs are missing. Inputs looked for (recursively under ``--results``):

- ``*.summary.csv`` (+ ``*.per_query.csv``, ``*.run.json``), written by
  :func:`benchmarks.results.write_results`: Figure 2 (LDS bars per target), Figure 4 (Hessian
  ablation), Figures 7-10 (damping sweeps), Figure 11 (per-timestep heatmap), Figure 6 from
  rows that carry a ``bits`` column, and the Markdown tables ``summary.md``/``lds_<target>.md``.
- ``*.retrain.csv`` with columns ``method, fraction, query, delta_loss``: Figure 3.
- ``*.compression.csv`` with columns ``bits, metric, value[, se]``: Figure 6.
- ``*.model_correlation.npz`` written by
  :func:`benchmarks.results.save_model_correlation`: Figure 17.
- ``*.influence_examples.npz`` written by
  :func:`benchmarks.results.save_influence_examples`: Figure 1. The training images are read
  from the data set the file names (by position; CIFAR from the stored data directory or the
  download cache, never downloaded), so Figure 1 is skipped when that data set is unavailable.

Outputs (in ``--out``): PNG figures, Markdown tables, and ``index.md`` listing what was built
and what was skipped and why.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks import plots
from benchmarks.io import atomic_write_text
from benchmarks.regime import footer_text
from benchmarks.results import (
    RUN_RECORD_SUFFIX,
    best_and_default,
    format_difference,
    format_lds,
    load_influence_examples,
    load_model_correlation,
    load_results,
    ranking_note,
    validate_summary,
)
from datasets import DatasetUnavailableError, load_dataset
from methods.registry import REGISTRY, default_dampings

__all__ = [
    "ReportConfig",
    "ReportResult",
    "build_reports",
    "lds_markdown",
    "main",
    "markdown_table",
    "regime_footers",
    "resolve_default_damping",
    "retrain_markdown",
    "summary_markdown",
]


# ---------------------------------------------------------------- Markdown tables


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``df`` (cells as ``str``; ``|`` escaped)."""

    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def _damping_text(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.0e}"


def summary_markdown(summary_df: pd.DataFrame) -> str:
    """Every summary row as a Markdown table (LDS in percent), under :func:`_ranking_header`."""
    df = validate_summary(summary_df)
    rows = pd.DataFrame(
        {
            "preset": df["preset"],
            "method": df["method"],
            "measurement": df["measurement"],
            "target": df["target"],
            "damping": [_damping_text(d) for d in df["damping"]],
            "LDS %": [
                format_lds(m, s) if st == "ok" else "—"
                for m, s, st in zip(df["lds_mean"], df["lds_se"], df["status"], strict=True)
            ],
            "n": df["n_queries"],
            "seconds": ["—" if math.isnan(v) else f"{v:.1f}" for v in df["seconds"]],
            "peak MB": ["—" if math.isnan(v) else f"{v:.0f}" for v in df["peak_memory_mb"]],
            "status": [
                st if st == "ok" else f"{st}: {r}"
                for st, r in zip(df["status"], df["reason"], strict=True)
            ],
        }
    )
    return _ranking_header(df) + markdown_table(rows)


def lds_markdown(
    summary_df: pd.DataFrame,
    target: str,
    default_damping: Mapping[str, float],
    footer: Sequence[str] = (),
) -> str:
    """Figure 2's numbers as Markdown: ``best ± s.e. (default)`` per method for one target.

    The noise ceiling comes first, then the methods in table order. When the summary has the
    paired differences to the best similarity baseline (``vs_similarity_mean``), a column
    ``Δ vs best sim.`` shows them at the best damping (and at the held-out-tuned one), with a
    footnote naming the reference.

    Args:
        summary_df: the summary table (one row per method, target, damping, ...).
        target: the measurement target whose LDS is shown (e.g. ``"loss"``).
        default_damping: method -> its default damping; for these methods the LDS at the
            default damping is shown in parentheses after the best.
        footer: further lines under the table (e.g. the runs' regime diagnostics).

    Returns:
        The Markdown table, then its footnotes.
    """
    df = validate_summary(summary_df)
    table = best_and_default(df[df["target"] == target], default_damping)
    table = plots.in_table_order(table, target)
    tuned_any = bool(np.isfinite(table["lds_tuned"].to_numpy(dtype=float)).any())
    references = _similarity_references(df, target)
    rows = []
    for r in table.itertuples(index=False):
        if r.status != "ok":
            value = f"n/a ({r.status}: {r.reason})"
        else:
            value = format_lds(r.lds_best, r.se_best)
            if r.method in default_damping:
                value += " (—)" if math.isnan(r.lds_default) else f" ({100 * r.lds_default:.1f})"
        row = {
            "method": plots.bar_label(r.method, r.measurement, target, {}),
            "measurement": r.measurement,
            "LDS % best (default)": value,
            "best damping": _damping_text(r.damping_best),
            "default damping": _damping_text(r.damping_default),
            "n": r.n_best,
        }
        if tuned_any:
            held_out = "" if math.isnan(r.lds_tuned) else format_lds(r.lds_tuned, r.se_tuned)
            row["LDS % held-out-tuned (chosen)"] = (
                f"{held_out} ({r.chosen_damping_tuned})" if held_out else ""
            )
            row["tuned − default, same folds"] = (
                "" if math.isnan(r.tuning_gain) else format_lds(r.tuning_gain, r.se_tuning_gain)
            )
        if references:
            row.update(_similarity_cells(r, references, tuned_any))
        rows.append(row)
    notes = [_similarity_note(references)] if references else []
    text = markdown_table(pd.DataFrame(rows))
    return _ranking_header(df) + text + "".join(f"\n{line}\n" for line in [*notes, *footer])


def _ranking_header(summary_df: pd.DataFrame) -> str:
    """The bold :func:`benchmarks.results.ranking_note` of each plumbing preset in the table.

    Empty when no row comes from a plumbing preset (smoke): its LDS cannot rank methods, and
    every table made from it says so first.
    """
    notes = [ranking_note(p) for p in dict.fromkeys(summary_df["preset"])]
    return "".join(f"**{note}**\n\n" for note in notes if note)


def _similarity_references(summary: pd.DataFrame, target: str) -> list[str]:
    """The best similarity baselines named by the target's rows (one per run, deduplicated)."""
    if "similarity_reference" not in summary.columns:
        return []
    names = summary.loc[summary["target"] == target, "similarity_reference"]
    return [str(n) for n in dict.fromkeys(names) if isinstance(n, str) and n]


def _similarity_cells(row: Any, references: list[str], tuned: bool) -> dict[str, str]:
    """The ``Δ vs best sim.`` cells of one :func:`best_and_default` row."""
    if row.status != "ok":
        best = "—"
    elif row.method in references:
        best = "ref"
    else:
        best = format_difference(row.vs_similarity_mean_best, row.vs_similarity_se_best)
    cells = {"Δ vs best sim. (best)": best}
    if tuned:
        value = format_difference(row.vs_similarity_mean_tuned, row.vs_similarity_se_tuned)
        cells["Δ vs best sim. (held-out-tuned)"] = "" if value == "—" else value
    return cells


def _similarity_note(references: list[str]) -> str:
    names = ", ".join(f"`{name}`" for name in references)
    return (
        "Δ vs best sim.: paired per-query LDS difference (percentage points ± s.e. over "
        f"queries) to the best similarity baseline of the run ({names}, marked ref)."
    )


def regime_footers(results_dir: Path, preset: str) -> list[str]:
    """The regime diagnostic lines of the runs of ``preset`` under ``results_dir``.

    Read from the ``result.regime`` entry of each ``*.run.json`` (``benchmarks.lds``);
    identical lines (the same queries) are shown once.

    Args:
        results_dir: searched recursively.
        preset: the setting name the runs must have.

    Returns:
        The footer lines (:func:`benchmarks.regime.footer_text`), in file order.
    """
    lines = []
    for path in sorted(results_dir.rglob(f"*{RUN_RECORD_SUFFIX}")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        regime = (record.get("result") or {}).get("regime") if isinstance(record, dict) else None
        setting = record.get("setting") or {}
        if isinstance(regime, dict) and setting.get("name") == preset:
            lines.append(footer_text(regime))
    return list(dict.fromkeys(lines))


def retrain_markdown(retrain_df: pd.DataFrame) -> str:
    """Figure 3's numbers as Markdown, with each method's paired difference to random removal.

    Mean ± s.e. change in loss per method and fraction; the paired difference is over the
    queries both were measured on (``benchmarks.results.retrain_summary``).
    """
    table = plots.retrain_summary(retrain_df)
    rows = pd.DataFrame(
        {
            "method": [plots.method_label(m) for m in table["method"]],
            "removed": [f"{100 * f:g}%" for f in table["fraction"]],
            "Δ loss mean ± s.e.": [
                f"{m:.3g} ± {s:.2g}" if np.isfinite(s) else f"{m:.3g}"
                for m, s in zip(table["mean"], table["se"], strict=True)
            ],
            "n": table["n"],
            "minus random removal (paired) ± s.e.": [
                "" if not np.isfinite(m) else f"{m:.3g} ± {s:.2g}" if np.isfinite(s) else f"{m:.3g}"
                for m, s in zip(table["vs_random_mean"], table["vs_random_se"], strict=True)
            ],
        }
    )
    return markdown_table(rows)


# ---------------------------------------------------------------- building everything


def resolve_default_damping(
    summary_df: pd.DataFrame | None, overrides: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Default damping per method, from three sources, each overriding the one before.

    First the registry's (each method's Config default, for the methods of the summary table,
    or every registered one without a table), then a ``default_damping`` column of the summary
    table when present (first finite value per method), then ``overrides`` (the
    ``--default-damping`` flags).
    """
    out = default_dampings(None if summary_df is None else summary_df["method"])
    if summary_df is not None and "default_damping" in summary_df.columns:
        for method, group in summary_df.groupby("method"):
            values = pd.to_numeric(group["default_damping"], errors="coerce").dropna()
            if len(values):
                out[str(method)] = float(values.iloc[0])
    out.update(overrides or {})
    return out


@dataclass(frozen=True)
class ReportConfig:
    """What :func:`build_reports` reads and writes."""

    results_dir: Path
    """Directory searched recursively for stored result files (must exist)."""
    out_dir: Path
    """Directory the figures and Markdown tables are written to (created if missing)."""
    default_damping: Mapping[str, float] = field(default_factory=dict)
    """Method -> default damping overrides (on top of the paper's defaults)."""
    top_k: int = 5
    """Training images per group in the Figure 1 grid (top, negative, neutral)."""
    max_queries: int = 4
    """At most this many queries (rows) in each Figure 1 grid."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "results_dir", Path(self.results_dir))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if not self.results_dir.is_dir():
            raise ValueError(
                f"results directory {self.results_dir} does not exist; pass the --out directory "
                "of a benchmark run (e.g. results/)."
            )
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}.")
        if self.max_queries < 1:
            raise ValueError(f"max_queries must be >= 1, got {self.max_queries}.")
        for method, value in self.default_damping.items():
            if not (isinstance(value, float | int) and math.isfinite(value) and value >= 0):
                raise ValueError(f"default damping of {method!r} must be a finite number >= 0.")


@dataclass
class ReportResult:
    """What :func:`build_reports` did."""

    built: list[Path] = field(default_factory=list)
    """Files written (figures and tables)."""
    skipped: list[str] = field(default_factory=list)
    """One note per figure that was not built, saying which input was missing or wrong."""


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _stem(path: Path, suffix: str) -> str:
    return _slug(path.name[: -len(suffix)])


def build_reports(
    config: ReportConfig, *, log: Callable[[str], None] | None = print
) -> ReportResult:
    """Build every figure and table whose inputs exist under ``config.results_dir``."""
    log = log or (lambda _message: None)
    out = ReportResult()
    out_dir = config.out_dir
    root = config.results_dir

    def attempt(name: str, fn: Callable[[], Path | Sequence[Path]]) -> None:
        try:
            made = fn()
        except (ValueError, KeyError, OSError, DatasetUnavailableError) as error:
            out.skipped.append(f"{name}: {error}")
            log(f"skipped {name}: {error}")
            return
        for path in [made] if isinstance(made, Path) else made:
            out.built.append(path)
            log(f"wrote {path}")

    def skip(note: str) -> None:
        out.skipped.append(note)
        log(f"skipped {note}")

    # ---- summary tables
    has_summary = any(p for p in root.rglob("*.summary.csv") if not p.name.startswith(".tmp-"))
    summary = None
    if has_summary:
        try:
            summary, _ = load_results(root)
        except (ValueError, OSError) as error:
            skip(f"LDS figures: the summary tables could not be read ({error})")
    else:
        skip("LDS figures (2, 4, 7-10, 11): no *.summary.csv under " + str(root))
    defaults = resolve_default_damping(summary, config.default_damping)

    if summary is not None:
        attempt(
            "summary.md",
            lambda: atomic_write_text(out_dir / "summary.md", summary_markdown(summary)),
        )
        for preset in sorted(summary["preset"].unique()):
            df = summary[summary["preset"] == preset]
            footer = regime_footers(root, preset)
            _build_lds_figures(df, preset, defaults, out_dir, attempt, skip, footer)
        if "bits" in summary.columns:
            rows = summary[pd.to_numeric(summary["bits"], errors="coerce").notna()]
            rows = rows[rows["status"] == "ok"]
            if len(rows):
                table = pd.DataFrame(
                    {
                        "bits": rows["bits"],
                        "metric": "LDS",
                        "value": rows["lds_mean"],
                        "se": rows["lds_se"],
                    }
                )
                attempt(
                    "Figure 6 (from summary)",
                    lambda: plots.plot_compression(table, out_dir / "fig6_compression_lds.png"),
                )

    # ---- Figure 3
    retrain_files = sorted(root.rglob("*.retrain.csv"))
    if not retrain_files:
        skip("Figure 3: no *.retrain.csv (columns method, fraction, query, delta_loss)")
    for path in retrain_files:
        stem = _stem(path, ".retrain.csv")

        def fig3(path: Path = path, stem: str = stem) -> list[Path]:
            df = pd.read_csv(path)
            return [
                plots.plot_retrain_changes(df, out_dir / f"fig3_retrain.{stem}.png"),
                atomic_write_text(out_dir / f"retrain.{stem}.md", retrain_markdown(df)),
            ]

        attempt(f"Figure 3 ({path.name})", fig3)

    # ---- Figure 6
    compression_files = sorted(root.rglob("*.compression.csv"))
    if not compression_files:
        skip("Figure 6: no *.compression.csv (columns bits, metric, value[, se])")
    for path in compression_files:
        stem = _stem(path, ".compression.csv")
        attempt(
            f"Figure 6 ({path.name})",
            lambda path=path, stem=stem: plots.plot_compression(
                pd.read_csv(path), out_dir / f"fig6_compression.{stem}.png"
            ),
        )

    # ---- Figure 17
    corr_files = sorted(root.rglob("*.model_correlation.npz"))
    if not corr_files:
        skip("Figure 17: no *.model_correlation.npz (see save_model_correlation)")
    for path in corr_files:
        stem = _stem(path, ".model_correlation.npz")

        def fig17(path: Path = path, stem: str = stem) -> Path:
            data = load_model_correlation(path)
            return plots.plot_model_correlation(
                data["a"],
                data["b"],
                out_dir / f"fig17_correlation.{stem}.png",
                label_a=data["label_a"],
                label_b=data["label_b"],
                measurement=data["measurement"],
            )

        attempt(f"Figure 17 ({path.name})", fig17)

    # ---- Figure 1
    example_files = sorted(root.rglob("*.influence_examples.npz"))
    if not example_files:
        skip("Figure 1: no *.influence_examples.npz (see save_influence_examples)")
    train_sets: dict[tuple[str, str | None], np.ndarray] = {}
    for path in example_files:
        stem = _stem(path, ".influence_examples.npz")

        def fig1(path: Path = path, stem: str = stem) -> Path:
            data = load_influence_examples(path)
            train_images = _influence_train_images(data, train_sets)
            n = min(config.max_queries, data["query_images"].shape[0])
            k = min(config.top_k, train_images.shape[0])
            return plots.plot_influence_grid(
                data["query_images"][:n],
                train_images,
                data["scores"][:n],
                out_dir / f"fig1_influences.{stem}.png",
                k=k,
            )

        attempt(f"Figure 1 ({path.name})", fig1)

    index = ["# Report", "", f"Built from `{root}`.", "", "## Built", ""]
    index += [f"- [{p.name}]({p.name})" for p in out.built] or ["(nothing)"]
    index += ["", "## Skipped", ""] + ([f"- {s}" for s in out.skipped] or ["(nothing)"])
    out.built.append(atomic_write_text(out_dir / "index.md", "\n".join(index) + "\n"))
    return out


def _influence_train_images(
    examples: Mapping[str, object], loaded: dict[tuple[str, str | None], np.ndarray]
) -> np.ndarray:
    """``# [N, C, H, W]`` the training images that the columns of ``examples["scores"]`` score.

    Positions ``0 .. n_train - 1`` of the data set the file names (the setting's capped
    training set), or the pixels an old file stored itself.

    Args:
        examples: the output of :func:`benchmarks.results.load_influence_examples`.
        loaded: ``(dataset, data_dir) -> # [n, C, H, W]`` data sets already read (filled in).

    Returns:
        The training images, in [-1, 1].

    Raises:
        DatasetUnavailableError: the data set is neither in ``data_dir`` nor in the cache.
        ValueError: the data set has fewer than ``n_train`` images.
    """
    if "train_images" in examples:  # a file written before training sets were referenced
        return np.asarray(examples["train_images"])
    key = (str(examples["dataset"]), examples["data_dir"])
    if key not in loaded:
        dataset = load_dataset(key[0], data_dir=key[1], download=False)
        loaded[key] = dataset.images.numpy()
    images, n_train = loaded[key], int(examples["n_train"])
    if n_train > images.shape[0]:
        raise ValueError(
            f"the scores have {n_train} training columns but data set {key[0]!r} has only "
            f"{images.shape[0]} images; rerun the benchmark to rewrite the file."
        )
    return images[:n_train]


def _build_lds_figures(
    df: pd.DataFrame,
    preset: str,
    defaults: Mapping[str, float],
    out_dir: Path,
    attempt: Callable[[str, Callable[[], Path | Sequence[Path]]], None],
    skip: Callable[[str], None],
    footer: Sequence[str] = (),
) -> None:
    tag = _slug(preset)
    targets = [t for t in dict.fromkeys(df["target"]) if not t.startswith("timestep-loss:")]
    for target in targets:
        slug = _slug(target)

        def fig2(target: str = target, slug: str = slug) -> list[Path]:
            return [
                plots.plot_lds_bars(
                    df,
                    out_dir / f"fig2_lds_{slug}.{tag}.png",
                    target=target,
                    default_damping=defaults,
                    title=f"LDS, target: {target}"
                    + (f" ({preset}: cannot rank methods)" if ranking_note(preset) else ""),
                ),
                atomic_write_text(
                    out_dir / f"lds_{slug}.{tag}.md", lds_markdown(df, target, defaults, footer)
                ),
            ]

        attempt(f"Figure 2 ({preset}, target {target})", fig2)

    ablation = df[(df["target"] == "loss") & df["method"].isin(plots.HESSIAN_ABLATION_METHODS)]
    kfac_variants = set(ablation["method"]) - {"retrain"}
    if len(kfac_variants) >= 2:
        attempt(
            f"Figure 4 ({preset})",
            lambda: plots.plot_hessian_ablation(
                df, out_dir / f"fig4_hessian_ablation.{tag}.png", default_damping=defaults
            ),
        )
    else:
        skip(f"Figure 4 ({preset}): fewer than two K-FAC Hessian variants with target loss")

    ok = df[(df["status"] == "ok") & np.isfinite(df["damping"]) & (df["damping"] > 0)]
    ok = ok[~ok["target"].str.startswith("timestep-loss:")]
    sizes = ok.groupby(["method", "measurement", "target"])["damping"].nunique()
    if (sizes >= 2).any():
        attempt(
            f"Figures 7-10 ({preset})",
            lambda: plots.plot_damping_sweep(df, out_dir / f"fig7_damping.{tag}.png"),
        )
    else:
        skip(f"Figures 7-10 ({preset}): no method evaluated at two or more dampings")

    timestep = df[
        df["measurement"].str.startswith("timestep-loss:")
        & df["target"].str.startswith("timestep-loss:")
    ]
    if timestep.empty:
        skip(f"Figure 11 ({preset}): no timestep-loss:<t> measurement/target rows")
    for method in dict.fromkeys(timestep["method"]):
        rows = timestep[timestep["method"] == method]
        damping = None
        if rows["damping"].nunique() > 1:
            damping = defaults.get(method)
            if damping is None or not np.isclose(rows["damping"], damping, rtol=1e-9).any():
                damping = float(rows.loc[rows["lds_mean"].idxmax(), "damping"])
        attempt(
            f"Figure 11 ({preset}, {method})",
            lambda m=method, d=damping: plots.plot_timestep_heatmap(
                df, out_dir / f"fig11_timestep.{_slug(m)}.{tag}.png", method=m, damping=d
            ),
        )


# ---------------------------------------------------------------- CLI


def _damping_pair(text: str) -> tuple[str, float]:
    method, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not sep or not method or not math.isfinite(number) or number < 0:
        raise argparse.ArgumentTypeError(
            f"expected METHOD=VALUE with a finite VALUE >= 0 (e.g. kfac=1e-8), got {text!r}"
        )
    return method, number


def _builtin_default_dampings_text() -> str:
    """``kfac=1e-08, ...``: the default damping of every built-in method that has one."""
    builtins = [entry.name for entry in REGISTRY.ordered() if entry.origin == "builtin"]
    return ", ".join(f"{name}={value:g}" for name, value in default_dampings(builtins).items())


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m benchmarks.reports``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.reports",
        description=(
            "Build the paper's figures (PNG) and result tables (Markdown) from stored result "
            "files only; nothing is recomputed. Figures whose inputs are missing are skipped "
            "with a printed note. Inputs, searched recursively under --results: "
            "*.summary.csv/*.per_query.csv (Figures 2, 4, 7-10, 11; tables), *.retrain.csv "
            "with columns method,fraction,query,delta_loss (Figure 3), *.compression.csv with "
            "columns bits,metric,value[,se] (Figure 6), *.model_correlation.npz (Figure 17), "
            "*.influence_examples.npz (Figure 1)."
        ),
    )
    parser.add_argument(
        "--results",
        required=True,
        type=Path,
        metavar="DIR",
        help="directory holding stored results (searched recursively)",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="directory to write figures, Markdown tables and index.md into",
    )
    parser.add_argument(
        "--default-damping",
        action="append",
        type=_damping_pair,
        default=[],
        metavar="METHOD=VALUE",
        help="default damping of a method for the bracketed Figure 2 numbers (repeatable); "
        "defaults: the summary's default_damping column, else the method's own (its Config "
        "default): " + _builtin_default_dampings_text(),
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=5,
        metavar="K",
        help="training images per group in the Figure 1 grid (default: 5)",
    )
    parser.add_argument(
        "--max-queries",
        type=int,
        default=4,
        metavar="Q",
        help="at most this many generated samples per Figure 1 grid (default: 4)",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the final count")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 also when some figures were skipped)."""
    import matplotlib  # deferred: the backend is chosen by the CLI, never at import

    matplotlib.use("Agg")  # headless; the figure code itself never needs a GUI backend
    args = build_parser().parse_args(argv)
    try:
        config = ReportConfig(
            results_dir=args.results,
            out_dir=args.out,
            default_damping=dict(args.default_damping),
            top_k=args.top_k,
            max_queries=args.max_queries,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result = build_reports(config, log=None if args.quiet else print)
    print(
        f"built {len(result.built)} file(s) in {config.out_dir}; "
        f"skipped {len(result.skipped)} figure(s) (see {config.out_dir / 'index.md'})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
