"""Linear Datamodelling Score (LDS) benchmark: ``python -m benchmarks.lds --method kfac``.

Trains (or loads) the base model, samples the queries, builds (or loads) the ground truth of
M subsets x K seeds, runs every requested method, and prints and writes a table of LDS (mean
+- standard error over queries), seconds and peak memory, with the noise ceiling (seed-to-seed
agreement of the ground truth) and paired differences between methods. Everything expensive is
cached in the artifact store, so a second method reuses the ground truth.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.cli import RunOptions, add_run_arguments

DEFAULT_SWEEP = (1e-9, 1e-7, 1e-5, 1e-3, 1e-1, 1e1, 1e3)


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

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("give at least one --method")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"--method lists a method twice: {list(self.methods)}")
        if not self.targets:
            raise ValueError("give at least one --target")
        values = [self.damping] if self.damping is not None else []
        values += list(self.sweep) if self.damping_sweep else []
        for value in values:
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"damping must be a finite number > 0, got {value!r}")
        super().__post_init__()


@dataclass(frozen=True)
class LDSResult:
    """Tables of one run.

    Attributes:
        summary: one row per (method, measurement, target, damping); see benchmarks.results.
        per_query: per-query LDS (long table).
        paired: paired differences to the first method, per target.
        files: written paths.
    """

    summary: pd.DataFrame
    per_query: pd.DataFrame
    paired: pd.DataFrame
    files: dict[str, Path]


_BITS = {None: 32, "int16": 16, "int8": 8}


def _variants(config: LDSConfig, defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """The option sets one method is evaluated with: dampings (``--damping``,
    ``--damping-sweep``) and, with ``--compression-ablation``, query-gradient quantisations."""
    dampings: list[dict[str, Any]] = [{}]
    if "damping" in defaults and config.damping_sweep:
        dampings = [{"damping": d} for d in config.sweep]
    elif "damping" in defaults and config.damping is not None:
        dampings = [{"damping": config.damping}]
    if not (config.compression_ablation and "quantize" in defaults):
        return dampings
    return dampings + [{**d, "quantize": q} for d in dampings for q in _BITS]


def run(config: LDSConfig) -> LDSResult:
    """Run the LDS benchmark described by ``config``."""

    from benchmarks.cli import run_label
    from benchmarks.executors import make_executor
    from benchmarks.groundtruth import compute_ground_truth
    from benchmarks.metrics import (
        lds_per_query,
        noise_ceiling,
        paired_difference,
        predictions_from_scores,
        summarize,
    )
    from benchmarks.pipeline import get_base_model, get_queries, load_train_set
    from benchmarks.provenance import StageLog, collect_provenance, write_result_json
    from benchmarks.reports import save_influence_examples, save_model_correlation
    from benchmarks.results import format_table, per_query_frame, result_row, write_results
    from benchmarks.runner import Experiment, build_method, prepare_run, run_method
    from benchmarks.store import ArtifactStore
    from diffusion.measurements import parse_measurement

    setting, device = prepare_run(
        config.preset,
        config.overrides,
        (*config.targets, *([config.measurement] if config.measurement else [])),
        config.methods,
        config.device,
        config.threads,
    )
    store = ArtifactStore(Path(config.cache_dir))
    stages = StageLog()
    needs_trajectories = any(
        parse_measurement(m)[0] == "trajectory-logprob"
        for m in (*config.targets, config.measurement or "loss")
    )

    with stages.stage("data"):
        train_set = load_train_set(setting, config.data_dir)
    with stages.stage("base_model"):
        model = get_base_model(setting, store, train_set, device=device, progress=config.progress)
    with stages.stage("queries"):
        queries = get_queries(
            setting,
            store,
            model,
            device=device,
            progress=config.progress,
            with_trajectories=needs_trajectories,
        )
        if needs_trajectories:  # ground truth reads the plain query set
            get_queries(setting, store, model, device=device, progress=False)
    with stages.stage("ground_truth"):
        executor = make_executor(
            config.executor,
            workers=config.workers,
            ray_address=config.ray_address,
            progress=config.progress,
        )
        truth = compute_ground_truth(
            setting,
            store,
            config.targets,
            n_train=len(train_set),
            executor=executor,
            data_dir=config.data_dir,
            device=str(device),
        )
    experiment = Experiment(
        setting, store, model, train_set.images, queries, device, config.progress
    )

    rows, per_query, lds_by_key = [], [], {}
    run_name = run_label(config.methods)
    figure1_written: set[str] = set()
    if setting.n_seeds >= 2:  # Figure 17: one measurement by two models of the same subset
        for target in config.targets:
            save_model_correlation(
                Path(config.out)
                / "lds"
                / setting.name
                / f"{run_name}.{target}.model_correlation.npz",
                truth.values[target][0, 0],
                truth.values[target][1, 0],
                label_a="subset 0, seed 0",
                label_b="subset 0, seed 1",
                measurement=target,
            )
    for target in config.targets:
        targets_mean = truth.mean_over_seeds(target)  # [n_subsets, n_queries]
        if setting.n_seeds >= 2:
            ceiling = noise_ceiling(truth.values[target])
            rows.append(
                result_row("noise-ceiling", target, target, None, ceiling, preset=setting.name)
            )
            per_query.append(
                per_query_frame("noise-ceiling", target, target, None, ceiling, preset=setting.name)
            )
        for name in config.methods:
            defaults = asdict(build_method(name, {}).config)
            for variant in _variants(config, defaults):
                options = {**dict(setting.method_options), **config.options, **variant}
                outcome = run_method(
                    experiment,
                    name,
                    options,
                    measurement=config.measurement or target,
                    target=target,
                    masks=truth.masks,
                )
                extra = {"default_damping": defaults.get("damping")}
                if "quantize" in variant:
                    extra["bits"] = _BITS[variant["quantize"]]
                lds = None
                if outcome.status == "ok":
                    predictions = (
                        outcome.predictions
                        if outcome.scores is None
                        else predictions_from_scores(outcome.scores, truth.masks)
                    )
                    lds = lds_per_query(predictions, targets_mean)
                    per_query.append(
                        per_query_frame(
                            name,
                            outcome.measurement,
                            target,
                            outcome.damping,
                            lds,
                            preset=setting.name,
                            **extra,
                        )
                    )
                    if "quantize" not in variant:
                        lds_by_key[(name, target, outcome.damping)] = lds
                    print(
                        f"[{name}] {target}: LDS {summarize(lds).mean:.3f} "
                        f"({outcome.seconds:.1f} s)",
                        file=sys.stderr,
                    )
                else:
                    print(f"[{name}] {outcome.status}: {outcome.reason}", file=sys.stderr)
                rows.append(
                    result_row(
                        name,
                        outcome.measurement,
                        target,
                        outcome.damping,
                        lds,
                        preset=setting.name,
                        status=outcome.status,
                        reason=outcome.reason,
                        seconds=outcome.seconds,
                        peak_memory_mb=outcome.peak_memory_mb,
                        **extra,
                    )
                )
                if outcome.scores is not None and name not in figure1_written:
                    figure1_written.add(name)
                    save_influence_examples(
                        Path(config.out)
                        / "lds"
                        / setting.name
                        / f"{run_name}.{name}.influence_examples.npz",
                        queries.images.numpy(),
                        train_set.images.numpy(),
                        outcome.scores,
                    )

    paired_rows = []
    for (name, target, damping), lds in lds_by_key.items():
        reference = next(
            (v for (n, t, _), v in lds_by_key.items() if n == config.methods[0] and t == target),
            None,
        )
        if reference is None or name == config.methods[0]:
            continue
        diff = paired_difference(lds, reference)
        paired_rows.append(
            {
                "method": name,
                "reference": config.methods[0],
                "target": target,
                "damping": damping,
                "diff_mean": diff.mean,
                "diff_se": diff.standard_error,
            }
        )

    summary = pd.DataFrame(rows)
    per_query_df = pd.concat(per_query, ignore_index=True) if per_query else pd.DataFrame()
    paired = pd.DataFrame(paired_rows)
    out_dir = Path(config.out) / "lds" / setting.name
    provenance = {
        **collect_provenance(),
        "config": asdict(config),
        "setting": setting.to_dict(),
        "stages": stages.to_dict(),
    }
    files = write_results(out_dir, summary, per_query_df, provenance, run_name)
    if not paired.empty:
        files["paired"] = out_dir / f"{run_name}.paired.csv"
        paired.to_csv(files["paired"], index=False)
    write_result_json(out_dir / f"{run_name}.run.json", {"summary": rows}, config, stages=stages)
    print(format_table(summary))
    if not paired.empty:
        print("\nPaired differences of per-query LDS to", config.methods[0])
        print(paired.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nwrote {files['summary']}")
    return LDSResult(summary, per_query_df, paired, files)


def build_parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--preset", default="quick", help="smoke | quick | cifar2 | cifar10")
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
    add_run_arguments(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> LDSConfig:
    from benchmarks.cli import parse_key_values, run_option_values

    return LDSConfig(
        methods=tuple(args.methods or ["kfac"]),
        preset=args.preset,
        targets=tuple(args.targets or ["loss"]),
        measurement=args.measurement,
        damping=args.damping,
        damping_sweep=args.damping_sweep,
        compression_ablation=args.compression_ablation,
        options=parse_key_values(args.option, "--option"),
        **run_option_values(args),
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit status 2 for usage errors, with the fix in the message."""
    from benchmarks.cli import usage_errors

    parser = build_parser()
    args = parser.parse_args(argv)
    with usage_errors(parser):
        config = config_from_args(args)
        run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
