"""Linear Datamodelling Score (LDS) benchmark: ``python -m benchmarks.lds --method kfac``.

Trains (or loads) the base model, samples the queries, builds (or loads) the ground truth of
M subsets x K seeds, runs every requested method, and prints and writes a table of LDS (mean
+- standard error over queries), seconds and peak memory, with the noise ceiling (seed-to-seed
agreement of the ground truth) and paired differences between methods. Everything expensive is
cached in the artifact store, so a second method reuses the ground truth.

Every table also carries each method's paired per-query LDS difference to the best similarity
baseline of the run (``MethodEntry.similarity``: pixel, pixel-l2, clip; the one with the highest
mean LDS, per target; ``pixel-l2`` is added, in milliseconds, when no similarity baseline ran),
and the regime diagnostic of the queries (``benchmarks.regime``) as its footer.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.bundle import import_for_run
from benchmarks.cli import (
    RunOptions,
    UsageError,
    add_preset_argument,
    add_run_arguments,
    parse_key_values,
    run_label,
    run_option_values,
    usage_errors,
)
from benchmarks.groundtruth import GroundTruth
from benchmarks.metrics import (
    bootstrap_interval,
    bootstrap_noise_ceiling_interval,
    cross_fitted_lds,
    fold_averaged_lds,
    lds_per_query,
    noise_ceiling,
    paired_difference,
    predictions_from_scores,
    subset_folds,
    summarize,
)
from benchmarks.pipeline import (
    derived_seed,
    load_held_out_set,
    needs_trajectories,
)
from benchmarks.provenance import StageLog
from benchmarks.regime import RegimeDiagnostic, regime_diagnostic
from benchmarks.results import (
    RunRecord,
    format_table,
    per_query_frame,
    ranking_note,
    result_row,
    save_influence_examples,
    save_model_correlation,
    write_results,
)
from benchmarks.runner import (
    Experiment,
    MethodRun,
    build_method,
    prepare_experiment,
    prepare_run,
    run_method,
)
from benchmarks.settings import Setting
from benchmarks.store import ArtifactStore
from methods.registry import get_method

DEFAULT_SWEEP = (1e-9, 1e-7, 1e-5, 1e-3, 1e-1, 1e1, 1e3)

SIMILARITY_FALLBACK = "pixel-l2"
"""The similarity baseline evaluated for a target on which no selected one ran ok."""


@dataclass(frozen=True)
class LDSConfig(RunOptions):
    """What an LDS run does.

    Attributes:
        methods: registry names to evaluate, in table order (the first is the reference of the
            paired differences).
        preset: setting preset (``benchmarks.settings.PRESETS``).
        targets: measurements the ground truth records and the methods predict.
        measurement: measurement the methods differentiate; None = each target itself
            ("loss" with target "elbo" is the paper's "m. loss").
        damping: damping for every method with a damping option; None = each method's default.
        damping_sweep: evaluate methods with a damping option at every value of ``sweep``.
        sweep: damping values of the sweep.
        compression_ablation: also evaluate methods with a ``quantize`` option with float32,
            int16 and int8 query gradients (Figure 6; rows carry a ``bits`` column).
        options: further method options (``FIELD -> value``), applied where a method has them.
        ground_truth_bundle: a ground-truth bundle folder to import before the run
            (``benchmarks.bundle``), or None: the shipped bundle of the preset when there is one
            for this setting.
        recompute_ground_truth: never import the shipped bundle: use and complete the store's
            own ground truth (a fresh ``--cache-dir`` recomputes it all).
        (and the fields of ``benchmarks.cli.RunOptions``: out, cache_dir, device, ...)
    """

    methods: tuple[str, ...] = ("kfac",)
    preset: str = "quick"
    targets: tuple[str, ...] = ("loss",)
    measurement: str | None = None
    damping: float | None = None
    damping_sweep: bool = False
    sweep: tuple[float, ...] = DEFAULT_SWEEP
    compression_ablation: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    ground_truth_bundle: str | None = None
    recompute_ground_truth: bool = False

    def __post_init__(self) -> None:
        if self.ground_truth_bundle and self.recompute_ground_truth:
            raise UsageError("give --ground-truth-bundle or --recompute-ground-truth, not both")
        if not self.methods:
            raise UsageError("give at least one --method")
        if len(set(self.methods)) != len(self.methods):
            raise UsageError(f"--method lists a method twice: {list(self.methods)}")
        if not self.targets:
            raise UsageError("give at least one --target")
        values = [self.damping] if self.damping is not None else []
        values += list(self.sweep) if self.damping_sweep else []
        for value in values:
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise UsageError(f"damping must be a finite number > 0, got {value!r}")
        super().__post_init__()


@dataclass(frozen=True)
class LDSResult:
    """Tables of one run.

    Attributes:
        summary: one row per (method, measurement, target, damping); see benchmarks.results.
        per_query: per-query LDS (long table).
        paired: paired differences to the first method and to the best similarity baseline,
            per target (column ``reference``).
        files: written paths (tables, the run record, figure inputs).
        regime: the queries' regime diagnostic (``benchmarks.regime``).
        notes: the lines above every table of the run (:func:`table_notes`).
    """

    summary: pd.DataFrame
    per_query: pd.DataFrame
    paired: pd.DataFrame
    files: dict[str, Path]
    regime: RegimeDiagnostic | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class PreparedRun:
    """What every cell of an LDS run shares (the output of :func:`prepare`).

    Attributes:
        setting: the resolved setting (preset and overrides).
        experiment: the inputs every method sees (store, base model, data, queries, device).
        truth: the ground truth: subset masks and the retrained models' measurements.
        stages: timings of the run's stages so far (the run record's ``stages``).
        regime: the queries' regime diagnostic (``benchmarks.regime``), None if not measured.
        ground_truth_source: where the ground truth came from (``bundle.import_for_run``).
    """

    setting: Setting
    experiment: Experiment
    truth: GroundTruth
    stages: StageLog
    regime: RegimeDiagnostic | None = None
    ground_truth_source: str = ""


@dataclass
class Cells:
    """What evaluating the cells produced (the output of :func:`evaluate_cells`).

    Attributes:
        rows: summary rows (``benchmarks.results.result_row``), in evaluation order.
        per_query: per-query LDS tables of the cells with an LDS.
        lds: ``(method, target, damping) -> # [n_queries]`` LDS of the unquantised ok cells,
            the pairs of :func:`paired_differences`.
        influence_scores: method -> ``# [n_queries, n_train]`` scores of its first cell that
            returned scores (Figure 1's input).
        predictions: the same keys as ``lds`` -> ``# [n_subsets, n_queries]`` predicted
            measurements (the input of the held-out damping choice).
        held_out: ``(method, target) -> # [n_queries]`` LDS at the damping chosen on held-out
            subsets (:func:`add_held_out_damping`).
        default_damping: method -> its default damping (None: it has none).
        similarity_reference: target -> the best similarity baseline of the run
            (:func:`add_similarity_differences`).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    per_query: list[pd.DataFrame] = field(default_factory=list)
    lds: dict[tuple[str, str, float | None], np.ndarray] = field(default_factory=dict)
    influence_scores: dict[str, np.ndarray] = field(default_factory=dict)
    predictions: dict[tuple[str, str, float | None], np.ndarray] = field(default_factory=dict)
    held_out: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    default_damping: dict[str, float | None] = field(default_factory=dict)
    similarity_reference: dict[str, str] = field(default_factory=dict)


_BITS = {None: 32, "int16": 16, "int8": 8}


def _variants(config: LDSConfig, defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """The option sets one method is evaluated with.

    Dampings (``--damping``, or ``--damping-sweep``: the sweep plus the method's default) and,
    with ``--compression-ablation``, query-gradient quantisations.
    """
    dampings: list[dict[str, Any]] = [{}]
    if "damping" in defaults and config.damping_sweep:  # the sweep and the method's default
        dampings = [{"damping": d} for d in sorted({*config.sweep, defaults["damping"]})]
    elif "damping" in defaults and config.damping is not None:
        dampings = [{"damping": config.damping}]
    if not (config.compression_ablation and "quantize" in defaults):
        return dampings
    return dampings + [{**d, "quantize": q} for d in dampings for q in _BITS]


def run(config: LDSConfig) -> LDSResult:
    """Run the LDS benchmark described by ``config``.

    Prepare, evaluate every cell, pair the methods, write the tables and the run record.
    """
    run_name = run_label(config.methods)
    prepared = prepare(config)
    with prepared.stages.stage("cells"):
        cells = evaluate_cells(config, prepared)
    add_held_out_damping(cells, prepared)
    paired = _all_pairs(paired_differences(cells, config.methods[0]), cells)
    summary = pd.DataFrame(cells.rows)
    per_query = pd.concat(cells.per_query, ignore_index=True) if cells.per_query else pd.DataFrame()
    files = write_run(config, prepared, cells, (summary, per_query, paired), run_name)
    notes = table_notes(prepared)
    _print_report(summary, paired, cells, prepared.regime, files["summary"], notes)
    return LDSResult(summary, per_query, paired, files, prepared.regime, tuple(notes))


def _all_pairs(to_first: pd.DataFrame, cells: Cells) -> pd.DataFrame:
    """The pairs to the first method, then those to the best similarity baseline (no repeats)."""
    tables = [t for t in (to_first, add_similarity_differences(cells)) if not t.empty]
    if not tables:
        return pd.DataFrame()
    paired = pd.concat(tables, ignore_index=True)
    keys = paired[["method", "reference", "target"]].assign(damping=paired["damping"].map(str))
    return paired[~keys.duplicated()].reset_index(drop=True)


# ---------------------------------------------------------------- stage 1: prepare


def _measurement_names(config: LDSConfig) -> tuple[str, ...]:
    return (*config.targets, *([config.measurement] if config.measurement else []))


def _needs_trajectories(config: LDSConfig) -> bool:
    """Whether the queries are stored with their trajectories: a measurement or a method needs them."""
    return needs_trajectories(_measurement_names(config)) or any(
        get_method(name).needs_query_trajectories for name in config.methods
    )


def prepare(config: LDSConfig) -> PreparedRun:
    """Validate the input, then get (train or load) the data, base model, queries, ground truth.

    Each of the four is a timed stage, and so is the queries' regime diagnostic. A ground-truth
    bundle is imported first (the one given, else the preset's shipped one:
    ``benchmarks.bundle.import_for_run``), so that nothing it holds is trained.
    """
    setting, device = prepare_run(
        config.preset,
        config.overrides,
        _measurement_names(config),
        config.methods,
        config.device,
        config.threads,
        config.options,
    )
    source = import_for_run(
        setting,
        ArtifactStore(Path(config.cache_dir)),
        config.targets,
        bundle=config.ground_truth_bundle,
        recompute=config.recompute_ground_truth,
    )
    experiment, stages = prepare_experiment(
        setting, device, config, with_trajectories=_needs_trajectories(config)
    )
    with stages.stage("ground_truth"):
        truth = experiment.ground_truth(config.targets)
    with stages.stage("regime"):
        held_out = load_held_out_set(setting, config.data_dir)
        regime = regime_diagnostic(
            experiment.queries.images,
            experiment.train_images,
            held_out.images,
            seed=derived_seed(setting.seed, "regime"),
        )
    return PreparedRun(setting, experiment, truth, stages, regime, source)


# ---------------------------------------------------------------- stage 2: evaluate cells


def evaluate_cells(config: LDSConfig, prepared: PreparedRun) -> Cells:
    """Every cell of the table, per target.

    The noise ceiling (K >= 2), then each method with each of its option variants
    (:func:`_variants`), then :data:`SIMILARITY_FALLBACK` when no similarity baseline ran ok on
    the target (the reference of :func:`add_similarity_differences`).
    """
    cells = Cells()
    runs: dict[str, MethodRun] = {}
    for target in config.targets:
        if prepared.setting.n_seeds >= 2:
            _add_noise_ceiling(cells, prepared, target)
        for name in config.methods:
            _evaluate_method(config, prepared, cells, name, target, runs)
        if not _similarity_lds(cells, target):
            print(
                f"[{SIMILARITY_FALLBACK}] {target}: added as the similarity reference (no "
                "similarity baseline ran)",
                file=sys.stderr,
            )
            _evaluate_method(config, prepared, cells, SIMILARITY_FALLBACK, target, runs)
    return cells


def _evaluate_method(
    config: LDSConfig,
    prepared: PreparedRun,
    cells: Cells,
    name: str,
    target: str,
    runs: dict[str, MethodRun],
) -> None:
    """Every option variant of method ``name`` on ``target`` (:func:`_evaluate_cell`)."""
    defaults = asdict(build_method(name, {}).config)
    for variant in _variants(config, defaults):
        _evaluate_cell(config, prepared, cells, name, target, variant, defaults, runs)


def _add_noise_ceiling(cells: Cells, prepared: PreparedRun, target: str) -> None:
    preset = prepared.setting.name
    ceiling = noise_ceiling(prepared.truth.values[target])
    interval = bootstrap_noise_ceiling_interval(
        prepared.truth.values[target], seed=_bootstrap_seed(prepared)
    )
    cells.rows.append(
        result_row(
            "noise-ceiling",
            target,
            target,
            None,
            ceiling,
            preset=preset,
            ci_low=interval.low,
            ci_high=interval.high,
        )
    )
    cells.per_query.append(
        per_query_frame("noise-ceiling", target, target, None, ceiling, preset=preset)
    )


def _bootstrap_seed(prepared: PreparedRun) -> int:
    """One seed for every bootstrap of a run: every cell resamples the same queries and subsets."""
    return derived_seed(prepared.setting.seed, "bootstrap")


def _cell_predictions(outcome: MethodRun, truth: GroundTruth) -> np.ndarray:
    """``# [n_subsets, n_queries]`` predicted measurements of an ok method run."""
    if outcome.scores is None:
        return outcome.predictions
    return predictions_from_scores(outcome.scores, truth.masks)


def _evaluate_cell(
    config: LDSConfig,
    prepared: PreparedRun,
    cells: Cells,
    name: str,
    target: str,
    variant: dict[str, Any],
    defaults: dict[str, Any],
    runs: dict[str, MethodRun],
) -> None:
    """Run method ``name`` with ``variant`` to predict ``target``; add its results to ``cells``.

    Its results: its row, and (when ok) its per-query LDS, paired-difference entry and Figure 1
    scores. ``runs`` holds the outcomes so far by resolved configuration: a variant that
    resolves to the configuration of an earlier one (the plain variant and the compression
    ablation's variant of the same ``quantize``) reuses its outcome, so each (damping, bits)
    cell is evaluated once.
    """
    preset = prepared.setting.name
    options = {**dict(prepared.setting.method_options), **config.options, **variant}
    resolved = {**defaults, **{k: v for k, v in options.items() if k in defaults}}
    key = repr((name, config.measurement or target, target, sorted(resolved.items())))
    if key not in runs:
        runs[key] = run_method(
            prepared.experiment,
            name,
            options,
            measurement=config.measurement or target,
            target=target,
            masks=prepared.truth.masks,
        )
    outcome = runs[key]
    cells.default_damping[name] = defaults.get("damping")
    extra = {"default_damping": defaults.get("damping")}
    if "quantize" in variant:
        extra["bits"] = _BITS[variant["quantize"]]
    lds = None
    if outcome.status == "ok":
        predictions = _cell_predictions(outcome, prepared.truth)
        targets = prepared.truth.mean_over_seeds(target)
        lds = lds_per_query(predictions, targets)
        interval = bootstrap_interval(predictions, targets, seed=_bootstrap_seed(prepared))
        ci = {"ci_low": interval.low, "ci_high": interval.high}
        cells.per_query.append(
            per_query_frame(
                name, outcome.measurement, target, outcome.damping, lds, preset=preset, **extra
            )
        )
        if "quantize" not in variant:
            cells.lds[(name, target, outcome.damping)] = lds
            cells.predictions[(name, target, outcome.damping)] = predictions
        print(
            f"[{name}] {target}: LDS {summarize(lds).mean:.3f} ({outcome.seconds:.1f} s)",
            file=sys.stderr,
        )
    else:
        print(f"[{name}] {outcome.status}: {outcome.reason}", file=sys.stderr)
    cells.rows.append(
        result_row(
            name,
            outcome.measurement,
            target,
            outcome.damping,
            lds,
            preset=preset,
            status=outcome.status,
            reason=outcome.reason,
            seconds=outcome.seconds,
            peak_memory_mb=outcome.peak_memory_mb,
            **extra,
            **(ci if lds is not None else {}),
        )
    )
    if outcome.scores is not None:
        cells.influence_scores.setdefault(name, outcome.scores)


# ---------------------------------------------------------------- stage 3: held-out damping


HELD_OUT = "held-out"
"""``selection`` of a row whose damping was chosen on held-out subsets (the headline)."""


def _sweeps(cells: Cells) -> dict[tuple[str, str], dict[float, np.ndarray]]:
    """``(method, target) -> damping -> # [n_subsets, n_queries]`` for methods with >= 2."""
    sweeps: dict[tuple[str, str], dict[float, np.ndarray]] = {}
    for (name, target, damping), predictions in cells.predictions.items():
        if damping is not None:
            sweeps.setdefault((name, target), {})[damping] = predictions
    return {key: values for key, values in sweeps.items() if len(values) >= 2}


def add_held_out_damping(cells: Cells, prepared: PreparedRun) -> None:
    """Add the LDS at a damping chosen on held-out subsets, per method with several dampings.

    The M subsets are split into two folds (``benchmarks.metrics.subset_folds``, seeded by the
    run's seed); the damping with the best mean LDS on one fold is scored on the other, both
    ways, and the two per-query LDS are averaged (``benchmarks.metrics.cross_fitted_lds``). The
    row has ``selection = "held-out"``, no damping and the two choices in ``chosen_damping``.
    The in-sample best of the same sweep (optimistic) is the best of the method's other rows.

    Args:
        cells: the evaluated cells; rows, per-query tables and :attr:`Cells.held_out` grow.
        prepared: the run's inputs (ground truth and setting).
    """
    setting, truth = prepared.setting, prepared.truth
    if setting.n_subsets < 4:  # two folds of at least two subsets each
        return
    folds = subset_folds(setting.n_subsets, derived_seed(setting.seed, "damping-folds"))
    for (name, target), by_damping in _sweeps(cells).items():
        fit = cross_fitted_lds(by_damping, truth.mean_over_seeds(target), folds)
        cells.held_out[(name, target)] = fit.per_query
        measurement = next(
            row["measurement"]
            for row in cells.rows
            if row["method"] == name and row["target"] == target
        )
        chosen = " | ".join("-" if v is None else f"{v:g}" for v in fit.chosen)
        default = cells.default_damping.get(name)
        extra = {"default_damping": default, "selection": HELD_OUT}
        if default in by_damping:  # tuned minus default, both scored on the same folds
            same_folds = fold_averaged_lds(
                by_damping[default], truth.mean_over_seeds(target), folds
            )
            gain = paired_difference(fit.per_query, same_folds)
            extra.update(tuning_gain=gain.mean, se_tuning_gain=gain.standard_error)
        after = max(
            i
            for i, row in enumerate(cells.rows)
            if (row["method"], row["target"]) == (name, target)
        )
        cells.rows.insert(
            after + 1,
            result_row(
                name,
                measurement,
                target,
                None,
                fit.per_query,
                preset=setting.name,
                chosen_damping=chosen,
                **extra,
            ),
        )
        cells.per_query.append(
            per_query_frame(
                name,
                measurement,
                target,
                None,
                fit.per_query,
                preset=setting.name,
                default_damping=default,
                selection=HELD_OUT,
            )
        )


# ---------------------------------------------------------------- stage 4: paired differences


def _reference_lds(cells: Cells, reference: str, target: str) -> np.ndarray | None:
    """The reference method's LDS at its default damping (its first cell if it has none)."""
    default = cells.default_damping.get(reference)
    entries = {d: v for (n, t, d), v in cells.lds.items() if n == reference and t == target}
    if default in entries:
        return entries[default]
    return next(iter(entries.values()), None)


def _paired_row(method: str, reference: str, target: str, damping, values, ref) -> dict:
    diff = paired_difference(values, ref)
    return {
        "method": method,
        "reference": reference,
        "target": target,
        "damping": damping,
        "diff_mean": diff.mean,
        "diff_se": diff.standard_error,
    }


def paired_differences(cells: Cells, reference: str) -> pd.DataFrame:
    """Per-query paired differences of each method's LDS to the ``reference`` method's.

    Each cell of another method (every damping it was evaluated at) is paired with the
    reference at the reference's default damping; a held-out-tuned LDS is paired with the
    reference's held-out-tuned LDS when the reference has one, else with its default.

    Args:
        cells: the evaluated cells (:attr:`Cells.lds`, :attr:`Cells.held_out`).
        reference: the reference method.

    Returns:
        One row per paired cell, columns ``method, reference, target, damping, diff_mean,
        diff_se`` (``damping`` is ``"held-out"`` for the held-out-tuned rows).
    """
    rows = []
    for (name, target, damping), values in cells.lds.items():
        ref = _reference_lds(cells, reference, target)
        if ref is not None and name != reference:
            rows.append(_paired_row(name, reference, target, damping, values, ref))
    for (name, target), values in cells.held_out.items():
        ref = cells.held_out.get((reference, target))
        ref = _reference_lds(cells, reference, target) if ref is None else ref
        if ref is not None and name != reference:
            rows.append(_paired_row(name, reference, target, HELD_OUT, values, ref))
    return pd.DataFrame(rows)


def _similarity_lds(cells: Cells, target: str) -> dict[str, np.ndarray]:
    """Similarity baseline -> its ``# [n_queries]`` LDS on ``target`` (its ok cells)."""
    return {
        name: values
        for (name, t, _), values in cells.lds.items()
        if t == target and get_method(name).similarity
    }


def add_similarity_differences(cells: Cells) -> pd.DataFrame:
    """Pair every method with the best similarity baseline of the run, per target.

    The best is the similarity baseline (``MethodEntry.similarity``) with the highest mean LDS
    on the target (the first in evaluation order on ties); each method's cells are paired with
    it as in :func:`paired_differences`. Every summary row that has a pair gets the columns
    ``similarity_reference``, ``vs_similarity_mean`` and ``vs_similarity_se`` (the reference's
    own row: 0 and 0); the others get the reference's name and NaN.

    Args:
        cells: the evaluated cells; rows gain the columns above, and
            :attr:`Cells.similarity_reference` is filled in.

    Returns:
        The pairs, with the columns of :func:`paired_differences`.
    """
    tables = []
    for target in dict.fromkeys(t for (_, t, _) in cells.lds):
        candidates = _similarity_lds(cells, target)
        if not candidates:
            continue
        best = max(candidates, key=lambda name: summarize(candidates[name]).mean)
        cells.similarity_reference[target] = best
        pairs = paired_differences(cells, best)
        tables.append(pairs[pairs["target"] == target] if not pairs.empty else pairs)
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    for row in cells.rows:
        _annotate_row(row, cells.similarity_reference, table)
    return table


def _annotate_row(row: dict[str, Any], references: dict[str, str], pairs: pd.DataFrame) -> None:
    """Add the ``similarity_reference, vs_similarity_mean, vs_similarity_se`` of one row."""
    reference = references.get(row["target"], "")
    mean = se = math.nan
    held_out = row.get("selection") == HELD_OUT
    if row["method"] == reference and not held_out:
        mean = se = 0.0
    elif reference and "bits" not in row and row["status"] == "ok" and not pairs.empty:
        damping = HELD_OUT if held_out else row["damping"]
        match = pairs[(pairs["method"] == row["method"]) & (pairs["target"] == row["target"])]
        for pair in match.to_dict("records"):
            if pair["damping"] == damping or (_is_nan(pair["damping"]) and _is_nan(damping)):
                mean, se = pair["diff_mean"], pair["diff_se"]
    row.update(similarity_reference=reference, vs_similarity_mean=mean, vs_similarity_se=se)


def _is_nan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# ---------------------------------------------------------------- stage 5: write


def _write_figure_inputs(
    out_dir: Path, run_name: str, prepared: PreparedRun, cells: Cells, data_dir: str | None
) -> dict[str, Path]:
    """Write Figure 17's input per target and Figure 1's per method with scores.

    Figure 17's: one measurement by two seeds of subset 0, when K >= 2. Figure 1's: queries,
    scores and a reference to the training set (data set name and ``data_dir``; the scores'
    columns are its positions), not its pixels.
    """
    files = {}
    truth, setting = prepared.truth, prepared.setting
    if setting.n_seeds >= 2:
        for target in truth.values:
            files[f"model_correlation.{target}"] = save_model_correlation(
                out_dir / f"{run_name}.{target}.model_correlation.npz",
                truth.values[target][0, 0],
                truth.values[target][1, 0],
                label_a="subset 0, seed 0",
                label_b="subset 0, seed 1",
                measurement=target,
            )
    for name, scores in cells.influence_scores.items():
        files[f"influence_examples.{name}"] = save_influence_examples(
            out_dir / f"{run_name}.{name}.influence_examples.npz",
            prepared.experiment.queries.images.numpy(),
            scores,
            dataset=setting.dataset,
            data_dir=data_dir,
        )
    return files


def write_run(
    config: LDSConfig,
    prepared: PreparedRun,
    cells: Cells,
    tables: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame],
    run_name: str,
) -> dict[str, Path]:
    """Write the figure inputs, the tables and the run record into ``<out>/lds/<preset>/``.

    Every file is named ``<run_name>.*``.

    Args:
        config: the run's config.
        prepared: the output of :func:`prepare`.
        cells: the output of :func:`evaluate_cells`.
        tables: ``(summary, per_query, paired)``.
        run_name: the file stem.

    Returns:
        key -> written path (see ``benchmarks.results.write_results``, plus the figure inputs).
    """
    out_dir = Path(config.out) / "lds" / prepared.setting.name
    summary, per_query, paired = tables
    figures = _write_figure_inputs(out_dir, run_name, prepared, cells, config.data_dir)
    result = {
        "ground_truth": prepared.ground_truth_source,
        "notes": table_notes(prepared),
        "similarity_reference": dict(cells.similarity_reference),
    }
    extra_tables = {"paired": paired} if not paired.empty else {}
    if prepared.regime is not None:
        result["regime"] = prepared.regime.summary()
        extra_tables["regime"] = prepared.regime.per_query()
    record = RunRecord(
        config,
        setting=prepared.setting.to_dict(),
        stages=prepared.stages,
        provenance=prepared.experiment.provenance,
        result=result,
    )
    written = write_results(
        out_dir, summary, per_query, record, run_name, tables=extra_tables, files=figures
    )
    return {**figures, **written}


def table_notes(prepared: PreparedRun) -> list[str]:
    """The lines above every table of a run: what cannot be read from it, and its ground truth.

    Returns:
        ``benchmarks.results.ranking_note`` of the preset (smoke) if any, then
        ``ground truth: <source>``.
    """
    note = ranking_note(prepared.setting.name)
    return [*([note] if note else []), f"ground truth: {prepared.ground_truth_source}"]


def _print_report(
    summary: pd.DataFrame,
    paired: pd.DataFrame,
    cells: Cells,
    regime: RegimeDiagnostic | None,
    summary_path: Path,
    notes: list[str],
) -> None:
    print("\n".join(notes))
    print(format_table(summary))
    print(similarity_footer(cells.similarity_reference))
    if regime is not None:
        print(regime.footer())
    if not paired.empty:
        print("\nPaired differences of per-query LDS (method - reference)")
        shown = paired.assign(damping=[_damping_label(d) for d in paired["damping"]])
        print(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nwrote {summary_path}")


def similarity_footer(references: dict[str, str]) -> str:
    """The footer line naming the best similarity baseline per target (the Δ column's pair)."""
    if not references:
        return "Δ vs best similarity: n/a (no similarity baseline has a defined LDS)"
    named = ", ".join(f"{target}: {name}" for target, name in references.items())
    return (
        "Δ vs best similarity: paired per-query LDS difference (± s.e. over queries) to the "
        f"best similarity baseline of the run ({named})"
    )


def _damping_label(damping: Any) -> str:
    if isinstance(damping, str):
        return damping
    return "—" if damping is None or pd.isna(damping) else f"{damping:g}"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m benchmarks.lds`` (read by :func:`config_from_args`)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.lds",
        description=__doc__.split("\n\n")[0] + " Defaults: the embedded digits2 data, quick "
        "preset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--method",
        action="append",
        dest="methods",
        metavar="NAME",
        help="attribution method (repeatable; default kfac); `python -m methods --list` lists them",
    )
    add_preset_argument(parser)
    parser.add_argument(
        "--target",
        action="append",
        dest="targets",
        metavar="MEASUREMENT",
        help="what to predict (repeatable; default loss): loss, elbo, "
        "square-norm, trajectory-logprob, timestep-loss:<t>",
    )
    parser.add_argument(
        "--measurement",
        default=None,
        help="measurement the methods differentiate (default: the target; "
        "'loss' with --target elbo is the paper's m. loss)",
    )
    damping = parser.add_mutually_exclusive_group()
    damping.add_argument(
        "--damping",
        type=float,
        default=None,
        help="damping of every method with one (paper normalisation)",
    )
    damping.add_argument(
        "--damping-sweep",
        action="store_true",
        help=f"evaluate dampings {', '.join(f'{d:g}' for d in DEFAULT_SWEEP)}",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="method option where a method has it, e.g. proj_dim=4096",
    )
    parser.add_argument(
        "--compression-ablation",
        action="store_true",
        help="also run methods with a quantize option at 32/16/8 bits (Figure 6)",
    )
    truth = parser.add_mutually_exclusive_group()
    truth.add_argument(
        "--ground-truth-bundle",
        metavar="DIR",
        default=None,
        help="import this ground-truth bundle folder before the run (default: the preset's "
        "shipped bundle, results/groundtruth/<preset>, when there is one for this setting)",
    )
    truth.add_argument(
        "--recompute-ground-truth",
        action="store_true",
        help="do not import the shipped bundle: compute (or resume) the ground truth in "
        "--cache-dir",
    )
    add_run_arguments(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> LDSConfig:
    """The :class:`LDSConfig` of parsed command-line arguments."""
    return LDSConfig(
        methods=tuple(args.methods or ["kfac"]),
        preset=args.preset,
        targets=tuple(args.targets or ["loss"]),
        measurement=args.measurement,
        damping=args.damping,
        damping_sweep=args.damping_sweep,
        compression_ablation=args.compression_ablation,
        options=parse_key_values(args.option, "--option"),
        ground_truth_bundle=args.ground_truth_bundle,
        recompute_ground_truth=args.recompute_ground_truth,
        **run_option_values(args),
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit status 2 for usage errors, with the fix in the message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with usage_errors(parser):
        config = config_from_args(args)
        run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
