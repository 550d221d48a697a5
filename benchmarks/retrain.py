"""Retraining without top influences (Figure 3): ``python -m benchmarks.retrain --method kfac``.

For each of the first ``n_retrain_queries`` generated samples and each fraction f, remove the
``round(f * N)`` training examples with the largest scores for that sample (for every method,
and uniformly at random as the baseline), retrain from scratch with the full model's recipe,
and report the change in the query's loss relative to the base model, mean +- s.e. over
queries (App. G.6). Every retrained model uses the base model's seed, so the only difference
between a retrained model and the base model is the removed data (and the minibatch order that
follows from it). A method that finds influential examples shows a larger increase than random.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

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
from benchmarks.executors import TaskOutcome, raise_failures
from benchmarks.groundtruth import get_or_train_model
from benchmarks.io import atomic_write_text
from benchmarks.pipeline import (
    QuerySet,
    derived_seed,
    load_train_set,
    measure_queries,
    queries_spec,
)
from benchmarks.provenance import StageLog
from benchmarks.results import (
    RANDOM_REMOVAL,
    RUN_RECORD_SUFFIX,
    RunRecord,
    retrain_summary,
    write_run_record,
)
from benchmarks.runner import Experiment, prepare_experiment, prepare_run, run_method
from benchmarks.settings import Setting
from benchmarks.store import ArtifactStore


@dataclass(frozen=True)
class RetrainBenchmarkConfig(RunOptions):
    """What a retraining-without-top-influences run does.

    Attributes:
        methods: registry names whose top influences are removed.
        fractions: fractions of the training set removed, each in (0, 1); None = the
            setting's ``retrain_fractions`` (paper: 2% and 10%).
        preset: setting preset.
        measurement: measurement whose change is reported (and which methods differentiate).
        options: method options (``FIELD -> value``) where a method has them.
        (and the fields of ``benchmarks.cli.RunOptions``: out, cache_dir, device, ...)
    """

    methods: tuple[str, ...] = ("kfac",)
    fractions: tuple[float, ...] | None = None
    preset: str = "quick"
    measurement: str = "loss"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.methods:
            raise UsageError("give at least one --method")
        for fraction in self.fractions or ():
            if not isinstance(fraction, int | float) or not 0 < fraction < 1:
                raise UsageError(
                    f"--fraction must lie in (0, 1) (e.g. 0.02 for 2%), got {fraction!r}"
                )


@dataclass(frozen=True)
class RetrainTask:
    """Retrain without some examples and measure one query (picklable for any executor).

    Attributes:
        setting: the benchmark setting.
        store_root: artifact store path.
        data_dir: CIFAR directory, if needed.
        kept: sorted training positions kept.
        query: the query index measured.
        measurement: measurement name.
        device: device string.
    """

    setting: Any
    store_root: str
    data_dir: str | None
    kept: tuple[int, ...]
    query: int
    measurement: str
    device: str = "cpu"


def run_retrain_task(task: RetrainTask) -> float:
    """Train (or load) the model without the removed examples; its measurement of the query."""
    setting, store = task.setting, ArtifactStore(task.store_root)
    train_set = load_train_set(setting, task.data_dir)
    model = get_or_train_model(
        setting,
        store,
        train_set.images,
        np.asarray(task.kept),
        setting.seed,
        "retrain_model",
        device=torch.device(task.device),
    )
    images = store.load_tensors("queries", queries_spec(setting, False))["images"]
    one = QuerySet(images[task.query : task.query + 1], None)
    values = measure_queries(
        model,
        setting,
        one,
        task.measurement,
        n_samples=setting.gt_mc_samples,
        device=torch.device(task.device),
        query_indices=[task.query],  # query q's own draws, those of its base value
    )
    return float(values[0])


def top_removal(scores_row: np.ndarray, n_remove: int) -> np.ndarray:
    """Positions kept after removing the ``n_remove`` largest scores (ties: lower index first).

    Args:
        scores_row: ``# [n_train]`` scores of one query.
        n_remove: how many positions to remove.

    Returns:
        ``# [n_train - n_remove]`` sorted kept positions.
    """
    order = np.lexsort((np.arange(len(scores_row)), -scores_row))
    return np.sort(order[n_remove:])


@dataclass(frozen=True)
class PreparedRetrain:
    """What every cell of a retraining run shares (the output of :func:`prepare`).

    Attributes:
        setting: the resolved setting (preset and overrides).
        experiment: the inputs every method sees (store, base model, data, queries, device).
        fractions: the removed fractions.
        base_values: ``# [n_retrain_queries]`` the base model's measurement of each query.
        stages: timings of the run's stages so far (the run record's ``stages``).
    """

    setting: Setting
    experiment: Experiment
    fractions: tuple[float, ...]
    base_values: np.ndarray
    stages: StageLog

    @property
    def n_train(self) -> int:
        """The number of training examples."""
        return int(self.experiment.train_images.shape[0])

    def n_removed(self, fraction: float) -> int:
        """How many examples a removal of ``fraction`` removes (at least one)."""
        return max(1, round(fraction * self.n_train))


@dataclass(frozen=True)
class RemovalPlan:
    """One cell: retrain without some examples, chosen for one query.

    Attributes:
        method: the method whose top influences are removed, or :data:`RANDOM_REMOVAL`.
        fraction: the removed fraction.
        query: the query index.
        kept: ``# [n_kept]`` sorted training positions kept.
    """

    method: str
    fraction: float
    query: int
    kept: np.ndarray

    @property
    def key(self) -> str:
        """The cell's task key, ``method,fraction=f,query=q``."""
        return f"{self.method},fraction={self.fraction},query={self.query}"


def run(config: RetrainBenchmarkConfig) -> pd.DataFrame:
    """Run the benchmark described by ``config`` and write its table and run record.

    The stages: prepare, plan the removals of every method (and random ones), retrain every
    cell, summarise, write.

    Returns:
        the long table, one row per finished cell: ``method, fraction, query, measurement,
        base, retrained, delta_loss``.
    """
    run_name = run_label(config.methods)
    prepared = prepare(config)
    with prepared.stages.stage("methods"):
        plans, failed_methods = plan_removals(config, prepared)
    with prepared.stages.stage("retraining"):
        outcomes = retrain_cells(config, prepared, plans)
    table = cell_table(config.measurement, prepared.base_values, plans, outcomes)
    summary = summarize_cells(table)
    result = {
        "summary": summary.to_dict("records"),
        "failed_methods": failed_methods,
        "failed_tasks": [o.key for o in outcomes if not o.ok],
    }
    path = write_run(config, prepared, table, result, run_name)
    if not summary.empty:
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.5f}"))
    print(f"\nwrote {path}")
    raise_failures(outcomes)
    return table


# ---------------------------------------------------------------- stage 1: prepare


def prepare(config: RetrainBenchmarkConfig) -> PreparedRetrain:
    """Validate the input, then get everything the cells share, each a timed stage.

    That is the data, the base model, the queries and the base model's measurement of the first
    ``n_retrain_queries`` queries.
    """
    setting, device = prepare_run(
        config.preset,
        config.overrides,
        (config.measurement,),
        config.methods,
        config.device,
        config.threads,
        config.options,
    )
    experiment, stages = prepare_experiment(setting, device, config)
    with stages.stage("base_measurement"):
        base_values = measure_queries(
            experiment.model,
            setting,
            experiment.queries,
            config.measurement,
            n_samples=setting.gt_mc_samples,
            device=device,
        )[: setting.n_retrain_queries]
    fractions = tuple(config.fractions or setting.retrain_fractions)
    return PreparedRetrain(setting, experiment, fractions, base_values, stages)


# ---------------------------------------------------------------- stage 2: evaluate cells


def plan_removals(
    config: RetrainBenchmarkConfig, prepared: PreparedRetrain
) -> tuple[list[RemovalPlan], dict[str, str]]:
    """Every cell to retrain.

    Each method's top influences per (fraction, query), then the random removals of the same
    sizes.

    Returns:
        ``(plans, failed_methods)``: the cells, and method -> why it gave no scores.
    """
    plans: list[RemovalPlan] = []
    failed: dict[str, str] = {}
    for name in config.methods:
        scores, why = _method_scores(config, prepared, name)
        if scores is None:
            failed[name] = why
            continue
        plans += [
            RemovalPlan(name, f, q, top_removal(scores[q], prepared.n_removed(f)))
            for f in prepared.fractions
            for q in range(prepared.setting.n_retrain_queries)
        ]
    return plans + _random_plans(prepared), failed


def _method_scores(
    config: RetrainBenchmarkConfig, prepared: PreparedRetrain, name: str
) -> tuple[np.ndarray | None, str]:
    """``(# [n_queries, n_train] scores, "")`` of method ``name``, or ``(None, why not)``."""
    outcome = run_method(
        prepared.experiment,
        name,
        {**dict(prepared.setting.method_options), **config.options},
        measurement=config.measurement,
        target=config.measurement,
    )
    if outcome.status == "ok" and outcome.scores is not None:
        return outcome.scores, ""
    why = outcome.reason or "no per-example scores"
    print(f"[{name}] {outcome.status}: {why}", file=sys.stderr)
    return None, why


def _random_plans(prepared: PreparedRetrain) -> list[RemovalPlan]:
    """Uniformly random removals, one per (fraction, query).

    Each cell draws from its own seed, ``derived_seed(seed, "random-removal", fraction, query)``,
    so a cell's removed set is the same whatever other fractions and queries the run includes
    (as the LDS subsets are drawn per index).
    """
    n_train = prepared.n_train
    return [
        RemovalPlan(RANDOM_REMOVAL, f, q, _random_kept(prepared, f, q, n_train))
        for f in prepared.fractions
        for q in range(prepared.setting.n_retrain_queries)
    ]


def _random_kept(
    prepared: PreparedRetrain, fraction: float, query: int, n_train: int
) -> np.ndarray:
    """``# [n_kept]`` sorted positions kept by the random removal of (fraction, query)."""
    seed = derived_seed(prepared.setting.seed, "random-removal", float(fraction), int(query))
    order = np.random.default_rng(seed).permutation(n_train)
    return np.sort(order[prepared.n_removed(fraction) :])


def retrain_cells(
    config: RetrainBenchmarkConfig, prepared: PreparedRetrain, plans: list[RemovalPlan]
) -> list[TaskOutcome]:
    """Retrain and measure every planned cell on the configured executor.

    Args:
        config: the run's config (its executor, data directory and measurement).
        prepared: the output of :func:`prepare`.
        plans: the cells.

    Returns:
        One outcome per plan, in plan order (``value``: the retrained model's measurement).
    """
    store, device = prepared.experiment.store, prepared.experiment.device
    tasks = [
        RetrainTask(
            prepared.setting,
            str(store.root),
            config.data_dir,
            tuple(int(i) for i in plan.kept),
            plan.query,
            config.measurement,
            str(device),
        )
        for plan in plans
    ]
    return prepared.experiment.executor.map(
        run_retrain_task, tasks, [p.key for p in plans], desc="retraining without top"
    )


def cell_table(
    measurement: str,
    base_values: np.ndarray,
    plans: list[RemovalPlan],
    outcomes: list[TaskOutcome],
) -> pd.DataFrame:
    """The long table of the finished cells.

    Args:
        measurement: the measurement's name.
        base_values: ``# [n_retrain_queries]`` the base model's measurements.
        plans: the cells.
        outcomes: their outcomes, in the same order.

    Returns:
        One row per finished cell, columns ``method, fraction, query, measurement, base,
        retrained, delta_loss`` (``delta_loss = retrained - base``).
    """
    rows = [
        {
            "method": plan.method,
            "fraction": plan.fraction,
            "query": plan.query,
            "measurement": measurement,
            "base": base_values[plan.query],
            "retrained": outcome.value,
            "delta_loss": outcome.value - base_values[plan.query],
        }
        for plan, outcome in zip(plans, outcomes, strict=True)
        if outcome.ok
    ]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- stage 3: summarise


def summarize_cells(table: pd.DataFrame) -> pd.DataFrame:
    """Per (method, fraction): ``delta_loss`` summarised, and paired with random removal.

    See ``benchmarks.results.retrain_summary`` (empty table: empty frame).
    """
    if table.empty:
        return pd.DataFrame()
    return retrain_summary(table)


# ---------------------------------------------------------------- stage 4: write


def write_run(
    config: RetrainBenchmarkConfig,
    prepared: PreparedRetrain,
    table: pd.DataFrame,
    result: dict[str, Any],
    run_name: str,
) -> Path:
    """Write the long table and the run record.

    The table goes to ``<out>/retrain/<preset>/<run_name>.retrain.csv``, the record to
    ``<run_name>.run.json`` beside it (its ``result``: the summary, failed methods and tasks).

    Args:
        config: the run's config.
        prepared: the output of :func:`prepare`.
        table: the long table of :func:`cell_table`.
        result: the record's ``result``.
        run_name: the file stem.

    Returns:
        the table's path.
    """
    out_dir = Path(config.out) / "retrain" / prepared.setting.name
    path = atomic_write_text(out_dir / f"{run_name}.retrain.csv", table.to_csv(index=False))
    record = RunRecord(
        config,
        setting=prepared.setting.to_dict(),
        stages=prepared.stages,
        provenance=prepared.experiment.provenance,
        result=result,
    )
    write_run_record(out_dir / f"{run_name}{RUN_RECORD_SUFFIX}", record, {"retrain": path})
    return path


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m benchmarks.retrain``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.retrain",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--method",
        action="append",
        dest="methods",
        metavar="NAME",
        help="method whose top influences are removed (repeatable; default kfac)",
    )
    parser.add_argument(
        "--fraction",
        nargs="+",
        type=float,
        default=None,
        help="fractions removed (default: the preset's, 0.02 0.1)",
    )
    add_preset_argument(parser)
    parser.add_argument(
        "--measurement", default="loss", help="measurement whose change is reported"
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="method option where a method has it",
    )
    add_run_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit status 2 for usage errors, with the fix in the message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with usage_errors(parser):
        config = RetrainBenchmarkConfig(
            methods=tuple(args.methods or ["kfac"]),
            fractions=tuple(args.fraction) if args.fraction else None,
            preset=args.preset,
            measurement=args.measurement,
            options=parse_key_values(args.option, "--option"),
            **run_option_values(args),
        )
        run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
