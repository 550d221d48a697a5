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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.cli import RunOptions, add_run_arguments

RANDOM_REMOVAL = "random-removal"


@dataclass(frozen=True)
class RetrainConfig(RunOptions):
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
            raise ValueError("give at least one --method")
        for fraction in self.fractions or ():
            if not isinstance(fraction, int | float) or not 0 < fraction < 1:
                raise ValueError(
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
    import torch

    from benchmarks.groundtruth import get_or_train_model
    from benchmarks.pipeline import QuerySet, load_train_set, measure_queries, queries_spec
    from benchmarks.store import ArtifactStore

    setting, store = task.setting, ArtifactStore(task.store_root)
    train_set = load_train_set(setting, task.data_dir)
    model = get_or_train_model(
        setting,
        store,
        train_set.images,
        np.asarray(task.kept),
        setting.seed,
        setting.train,
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
    )
    return float(values[0])


def top_removal(scores_row: np.ndarray, n_remove: int) -> np.ndarray:
    """Positions kept after removing the ``n_remove`` largest scores (ties: lower index first).

    Args:
        scores_row: ``# [n_train]`` scores of one query.
    Returns:
        ``# [n_train - n_remove]`` sorted kept positions.
    """
    order = np.lexsort((np.arange(len(scores_row)), -scores_row))
    return np.sort(order[n_remove:])


def run(config: RetrainConfig) -> pd.DataFrame:
    """Run the benchmark; returns the long table (method, fraction, query, delta_loss)."""

    from benchmarks.cli import run_label
    from benchmarks.executors import make_executor, raise_failures
    from benchmarks.metrics import summarize
    from benchmarks.pipeline import (
        derived_seed,
        get_base_model,
        get_queries,
        load_train_set,
        measure_queries,
    )
    from benchmarks.provenance import collect_provenance
    from benchmarks.results import atomic_write_text
    from benchmarks.runner import Experiment, prepare_run, run_method
    from benchmarks.store import ArtifactStore

    setting, device = prepare_run(
        config.preset,
        config.overrides,
        (config.measurement,),
        config.methods,
        config.device,
        config.threads,
    )
    fractions = tuple(config.fractions or setting.retrain_fractions)
    store = ArtifactStore(Path(config.cache_dir))
    started = time.perf_counter()

    train_set = load_train_set(setting, config.data_dir)
    n_train = len(train_set)
    model = get_base_model(setting, store, train_set, device=device, progress=config.progress)
    queries = get_queries(setting, store, model, device=device, progress=config.progress)
    n_q = setting.n_retrain_queries
    base_values = measure_queries(
        model, setting, queries, config.measurement, n_samples=setting.gt_mc_samples, device=device
    )[:n_q]
    experiment = Experiment(
        setting, store, model, train_set.images, queries, device, config.progress
    )

    plans: list[tuple[str, float, int, np.ndarray]] = []  # (method, fraction, query, kept)
    failures: dict[str, str] = {}
    for name in config.methods:
        outcome = run_method(
            experiment,
            name,
            {**dict(setting.method_options), **config.options},
            measurement=config.measurement,
            target=config.measurement,
        )
        if outcome.status != "ok" or outcome.scores is None:
            failures[name] = outcome.reason or "no per-example scores"
            print(f"[{name}] {outcome.status}: {failures[name]}", file=sys.stderr)
            continue
        for fraction in fractions:
            n_remove = max(1, round(fraction * n_train))
            for q in range(n_q):
                plans.append((name, fraction, q, top_removal(outcome.scores[q], n_remove)))
    rng = np.random.default_rng(derived_seed(setting.seed, "random-removal"))
    for fraction in fractions:
        n_remove = max(1, round(fraction * n_train))
        for q in range(n_q):
            plans.append(
                (RANDOM_REMOVAL, fraction, q, np.sort(rng.permutation(n_train)[n_remove:]))
            )

    tasks = [
        RetrainTask(
            setting,
            str(store.root),
            config.data_dir,
            tuple(int(i) for i in kept),
            q,
            config.measurement,
            str(device),
        )
        for _, _, q, kept in plans
    ]
    keys = [f"{m},fraction={f},query={q}" for m, f, q, _ in plans]
    executor = make_executor(
        config.executor,
        workers=config.workers,
        ray_address=config.ray_address,
        progress=config.progress,
    )
    outcomes = executor.map(run_retrain_task, tasks, keys, desc="retraining without top")
    rows = [
        {
            "method": m,
            "fraction": f,
            "query": q,
            "measurement": config.measurement,
            "base": base_values[q],
            "retrained": o.value,
            "delta_loss": o.value - base_values[q],
        }
        for (m, f, q, _), o in zip(plans, outcomes, strict=True)
        if o.ok
    ]
    table = pd.DataFrame(rows)
    summary = (
        (
            table.groupby(["method", "fraction"])["delta_loss"]
            .apply(lambda v: pd.Series(summarize(v.to_numpy())._asdict()))
            .unstack()
            .reset_index()
        )
        if not table.empty
        else pd.DataFrame()
    )
    out_dir = Path(config.out) / "retrain" / setting.name
    out_dir.mkdir(parents=True, exist_ok=True)
    run_name = run_label(config.methods)
    atomic_write_text(out_dir / f"{run_name}.retrain.csv", table.to_csv(index=False))
    from benchmarks.provenance import write_result_json

    write_result_json(
        out_dir / f"{run_name}.provenance.json",
        {
            "summary": summary.to_dict("records"),
            "failed_methods": failures,
            "failed_tasks": [o.key for o in outcomes if not o.ok],
            "seconds": time.perf_counter() - started,
        },
        {**asdict(config), "setting": setting.to_dict()},
        provenance=collect_provenance(),
    )
    if not summary.empty:
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.5f}"))
    print(f"\nwrote {out_dir / f'{run_name}.retrain.csv'}")
    raise_failures(outcomes)
    return table


def build_parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--preset", default="quick", help="smoke | quick | cifar2 | cifar10")
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
    from benchmarks.cli import parse_key_values, run_option_values, usage_errors

    parser = build_parser()
    args = parser.parse_args(argv)
    with usage_errors(parser):
        config = RetrainConfig(
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
