"""Leaderboard: ``python -m benchmarks.leaderboard`` (quick preset, loss and ELBO).

Runs the LDS benchmark for every registered method (built-ins and installed plugins) on one
preset, by default quick from its shipped ground-truth bundle (``benchmarks.bundle``), then
writes ``results/leaderboard.md`` (one ranked table per target with the noise ceiling and exact
retraining, where the ground truth came from, and the provenance of the run) and
``results/leaderboard.png`` (Figure 2 style bars of the first target; ``leaderboard.<target>.png``
for the others). Unavailable methods (e.g. CLIP without weights) are listed with the reason
instead of a score. A table of the smoke preset says in its header that it cannot rank methods.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from benchmarks import lds
from benchmarks.cli import (
    DEFAULT_CACHE_DIR,
    add_preset_argument,
    nest_overrides,
    parse_key_values,
    usage_errors,
)
from benchmarks.errors import UsageError
from benchmarks.io import atomic_write_text
from benchmarks.lds import LDSConfig
from benchmarks.metrics import overlaps_leader
from benchmarks.plots import method_label, plot_lds_bars
from benchmarks.provenance import collect_provenance
from benchmarks.results import (
    NOISE_CEILING_LABEL,
    NOISE_CEILING_METHOD,
    format_lds,
    ranking_note,
    similarity_difference_text,
)
from methods import available_methods

TARGET_NAMES = {"loss": "diffusion loss", "elbo": "ELBO"}


def leaderboard_markdown(
    summary: pd.DataFrame,
    provenance: dict,
    preset: str,
    *,
    notes: Sequence[str] = (),
    regime: str = "",
) -> str:
    """The ranked Markdown leaderboard: per target, ok rows by LDS, then the unavailable/failed.

    Methods are shown by their registry display name and registry name; the noise ceiling row
    has no rank. When the summary has ``vs_similarity_mean`` (``benchmarks.lds``), a column
    shows each method's paired per-query LDS difference to the best similarity baseline.

    Args:
        summary: one row per method and target (the summary frame): ``method``, ``target``,
            ``status``, ``reason``, ``lds_mean``, ``lds_se``, ``seconds``, ``peak_memory_mb``
            (optional: ``similarity_reference``, ``vs_similarity_mean``, ``vs_similarity_se``).
        provenance: :func:`benchmarks.provenance.collect_provenance`'s record (commit,
            package versions, timestamp, machine) for the footer.
        preset: the preset's name, in the title.
        notes: lines under the title (``benchmarks.lds.table_notes``: a smoke preset's
            warning that it cannot rank methods, where the ground truth came from).
        regime: the run's regime diagnostic line (``RegimeDiagnostic.footer``), or empty.

    Returns:
        The Markdown text, ending with a newline.
    """
    lines = [f"# Attribution leaderboard: preset `{preset}`", ""]
    lines += [f"**{note}**" if "cannot rank" in note else note for note in notes]
    lines += [
        *([""] if notes else []),
        "LDS (Spearman rank correlation between predicted and retrained measurement across "
        "training subsets), mean ± standard error over generated queries, and a 95% bootstrap "
        "interval that resamples queries and subsets together. The "
        f"{NOISE_CEILING_LABEL} is the seed-to-seed agreement of the ground truth. ≈ marks every "
        "method whose interval overlaps the leader's (the best method other than exact "
        "retraining): the data cannot tell it from the leader.",
    ]
    targets = list(dict.fromkeys(summary["target"])) if "target" in summary else ["loss"]
    for target in targets:
        rows = summary[summary["target"] == target] if "target" in summary else summary
        lines += ["", f"## Target: {TARGET_NAMES.get(target, target)}", ""]
        lines += _ranked_table(rows)
    lines += _footnotes(summary, regime)
    packages = provenance.get("packages", {})
    lines += [
        "",
        f"Commit `{provenance.get('git_commit', 'unknown')}`, torch "
        f"{packages.get('torch')}, curvlinops {packages.get('curvlinops')}, traker "
        f"{packages.get('traker')}; {provenance.get('timestamp', '')}; "
        f"{provenance.get('cpu_count')} CPUs, CUDA: "
        f"{provenance.get('device', {}).get('cuda_available')}.",
        "",
    ]
    return "\n".join(lines)


def _ranked_table(summary: pd.DataFrame) -> list[str]:
    """The Markdown table lines of one target's rows."""

    def name(method: str) -> str:
        label = method_label(method)
        return label if method == NOISE_CEILING_METHOD else f"{label} (`{method}`)"

    ok = summary[summary["status"] == "ok"].sort_values("lds_mean", ascending=False)
    rest = summary[summary["status"] != "ok"]
    tied = _tied_with_leader(ok)
    paired = "vs_similarity_mean" in summary.columns
    delta_header = " Δ vs best sim. |" if paired else ""
    lines = [
        f"| rank | method | LDS % | 95% interval | ≈ leader |{delta_header} seconds | peak MB |",
        "|---:|---|---:|---:|:---:|" + ("---:|" if paired else "") + "---:|---:|",
    ]
    rank = 0
    for row in ok.to_dict("records"):
        is_ceiling = row["method"] == NOISE_CEILING_METHOD
        rank += 0 if is_ceiling else 1
        seconds = "" if pd.isna(row["seconds"]) else f"{row['seconds']:.1f}"
        memory = "" if pd.isna(row["peak_memory_mb"]) else f"{row['peak_memory_mb']:.0f}"
        delta = f" {'' if is_ceiling else similarity_difference_text(row)} |" if paired else ""
        lines.append(
            f"| {'' if is_ceiling else rank} | {name(row['method'])} | "
            f"{format_lds(row['lds_mean'], row['lds_se'])} | {_interval(row)} | "
            f"{'≈' if tied.get(row['method']) else ''} |{delta} {seconds} | {memory} |"
        )
    empty = " |" * (5 if paired else 4)
    for row in rest.itertuples():
        lines.append(f"| – | {name(row.method)} | {row.status}: {row.reason} |{empty}")
    return lines


def _footnotes(summary: pd.DataFrame, regime: str) -> list[str]:
    """The lines naming the best similarity baseline and the regime diagnostic, if any."""
    lines = []
    if "similarity_reference" in summary.columns:
        names = [n for n in dict.fromkeys(summary["similarity_reference"]) if isinstance(n, str)]
        if any(names):
            listed = ", ".join(f"`{n}`" for n in names if n)
            lines += [
                "",
                "Δ vs best sim.: paired per-query LDS difference (percentage points ± s.e. over "
                f"queries) to the best similarity baseline of the run ({listed}, marked ref).",
            ]
    return lines + (["", regime] if regime else [])


DEFAULT_TARGETS = ("loss", "elbo")

REFERENCE_ROWS = (NOISE_CEILING_METHOD, "retrain")
"""Rows that are references, not competitors: never the leader, never marked."""


def _interval(row: dict) -> str:
    low, high = row.get("ci_low", float("nan")), row.get("ci_high", float("nan"))
    return "" if pd.isna(low) or pd.isna(high) else f"[{100 * low:.1f}, {100 * high:.1f}]"


def _tied_with_leader(ok: pd.DataFrame) -> dict[str, bool]:
    """Method -> whether its bootstrap interval overlaps the leader's (methods with one)."""
    rows = ok[~ok["method"].isin(REFERENCE_ROWS)]
    if "ci_low" not in rows.columns:
        return {}
    rows = rows[rows["ci_low"].notna() & rows["ci_high"].notna()]
    intervals = {r["method"]: (r["ci_low"], r["ci_high"]) for r in rows.to_dict("records")}
    means = {r["method"]: r["lds_mean"] for r in rows.to_dict("records")}
    return overlaps_leader(intervals, means) if intervals else {}


def run(
    preset: str,
    out: str,
    cache_dir: str,
    methods: tuple[str, ...] | None,
    progress: bool,
    overrides: dict | None = None,
    *,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    recompute_ground_truth: bool = False,
    skip: tuple[str, ...] = (),
) -> Path:
    """Run the LDS of ``methods`` on ``preset`` and write ``leaderboard.md`` and the figures.

    Args:
        preset: setting preset.
        out: directory of the leaderboard (and of the LDS result tables).
        cache_dir: artifact store.
        methods: registry names; None = every registered method.
        progress: show progress bars.
        overrides: setting overrides (``--set``), applied to the preset.
        targets: what the methods predict, one table and figure each.
        recompute_ground_truth: do not import the preset's shipped ground-truth bundle.
        skip: registry names left out (e.g. the costly ablation variants in a CI budget); the
            leaderboard's header names them.

    Returns:
        the path of ``leaderboard.md``.
    """
    names = tuple(m for m in (methods or available_methods()) if m not in skip)
    unknown = sorted(set(skip) - set(available_methods()))
    if unknown:
        raise UsageError(
            f"--skip {', '.join(unknown)}: not a registered method; "
            f"registered: {', '.join(available_methods())}"
        )
    result = lds.run(
        LDSConfig(
            methods=names,
            preset=preset,
            targets=targets,
            out=out,
            cache_dir=cache_dir,
            progress=progress,
            overrides=overrides or {},
            recompute_ground_truth=recompute_ground_truth,
        )
    )
    out_dir = Path(out)
    regime = result.regime.footer() if result.regime is not None else ""
    markdown = leaderboard_markdown(
        result.summary,
        collect_provenance(),
        preset,
        notes=[*result.notes, *_skipped_note(skip)],
        regime=regime,
    )
    path = atomic_write_text(out_dir / "leaderboard.md", markdown)
    caveat = " (cannot rank methods)" if ranking_note(preset) else ""
    for i, target in enumerate(targets):
        figure = out_dir / ("leaderboard.png" if i == 0 else f"leaderboard.{target}.png")
        plot_lds_bars(
            result.summary,
            figure,
            target=target,
            title=f"LDS on preset {preset}{caveat} (target: {target})",
        )
    print(f"wrote {path} and {out_dir / 'leaderboard.png'}")
    return path


def _skipped_note(skip: tuple[str, ...]) -> list[str]:
    """The header line naming the methods left out with ``--skip`` (none: no line)."""
    if not skip:
        return []
    return [
        f"Not run in this leaderboard (--skip): {', '.join(f'`{m}`' for m in skip)}; "
        "the README's quick table has them."
    ]


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit status 2 for usage errors."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.leaderboard",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_preset_argument(parser)
    parser.add_argument(
        "--target",
        action="append",
        dest="targets",
        metavar="MEASUREMENT",
        help=f"what to predict (repeatable; default {' and '.join(DEFAULT_TARGETS)})",
    )
    parser.add_argument(
        "--recompute-ground-truth",
        action="store_true",
        help="do not import the preset's shipped ground-truth bundle",
    )
    parser.add_argument(
        "--method",
        action="append",
        dest="methods",
        metavar="NAME",
        help="restrict to these methods (default: every registered one)",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="NAME",
        help="leave this method out (repeatable), e.g. a costly ablation variant in CI",
    )
    parser.add_argument("--out", default="results", help="where leaderboard.md/png go")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="artifact store")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="FIELD=VALUE",
        help="override a setting field of the preset, e.g. n_subsets=64 or train.steps=20",
    )
    args = parser.parse_args(argv)
    with usage_errors(parser):
        run(
            args.preset,
            args.out,
            args.cache_dir,
            tuple(args.methods) if args.methods else None,
            not args.no_progress,
            nest_overrides(parse_key_values(args.overrides, "--set")),
            targets=tuple(args.targets or DEFAULT_TARGETS),
            recompute_ground_truth=args.recompute_ground_truth,
            skip=tuple(args.skip),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
