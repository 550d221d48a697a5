"""Run one attribution method on a prepared experiment: context, caching, timing, failures.

Shared by the LDS and the retraining benchmarks. A method that is unavailable (CLIP without
weights) or fails (an exception, NaN/infinite scores) yields a ``MethodRun`` with that status
and the reason; the caller writes it as a failed cell and carries on.
"""

from __future__ import annotations

import math
import sys
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.cli import RunOptions
from benchmarks.errors import UsageError
from benchmarks.executors import make_executor, raise_failures
from benchmarks.groundtruth import (
    DEFAULT_ENSEMBLE_SIZE,
    GroundTruth,
    OracleTask,
    compute_ground_truth,
    get_or_train_model,
    oracle_seed,
    run_oracle_task,
)
from benchmarks.io import bytes_digest
from benchmarks.pipeline import (
    QuerySet,
    base_model_spec,
    get_base_checkpoints,
    get_base_model,
    get_queries,
    load_train_set,
    measure_queries,
    needs_trajectories,
    queries_spec,
    resolve_device,
)
from benchmarks.provenance import StageLog, StageTimer, collect_provenance
from benchmarks.settings import Setting, get_preset
from benchmarks.store import ArtifactStore
from diffusion.measurements import parse_measurement
from methods import AttributionMethod, MethodContext, MethodUnavailableError, get_method


@dataclass(frozen=True)
class Experiment:
    """The prepared inputs every method sees.

    Attributes:
        setting: sizes and recipes.
        store: the artifact store.
        model: base model trained on the full training set.
        train_images: ``# [n_train, C, H, W]``.
        queries: the generated samples (and trajectories, if stored).
        device: where methods compute.
        progress: show progress bars.
        provenance: the run's provenance (commit, dirty flag, versions, device) collected when
            the run started (``collect_provenance``), so that the record names the code that
            ran, not the code checked out when it finished; None: collected when written.
        executor: where retraining tasks run (``benchmarks.executors``: the ground truth, the
            exact-retraining oracle, Figure 3's models); None: in this process.
        data_dir: where CIFAR lives, for tasks that load the training set themselves.
        ensemble_size: ground-truth models per retraining task (``compute_ground_truth``).
    """

    setting: Setting
    store: ArtifactStore
    model: nn.Module
    train_images: torch.Tensor
    queries: QuerySet
    device: torch.device
    progress: bool = True
    provenance: Mapping[str, Any] | None = None
    executor: Any = None
    data_dir: str | None = None
    ensemble_size: int = DEFAULT_ENSEMBLE_SIZE

    def ground_truth(self, targets: Sequence[str]) -> GroundTruth:
        """The LDS ground truth of ``targets``: loaded, or computed and stored where missing.

        Runs the missing retraining tasks on :attr:`executor` (``compute_ground_truth``).
        """
        return compute_ground_truth(
            self.setting,
            self.store,
            targets,
            n_train=len(self.train_images),
            executor=self.executor,
            data_dir=self.data_dir,
            device=str(self.device),
            ensemble_size=self.ensemble_size,
        )


@dataclass(frozen=True)
class MethodRun:
    """One method's outcome.

    Attributes:
        name: registry name.
        config: the method's config as a dict (empty if it could not be built).
        measurement: the measurement the method used.
        status: "ok", "unavailable" or "failed".
        reason: why not ok.
        scores: ``# [n_queries, n_train]`` for score methods, else None.
        predictions: ``# [n_subsets, n_queries]`` for subset-prediction methods, else None.
        seconds: wall time of the method.
        peak_memory_mb: peak memory growth during the method.
    """

    name: str
    config: dict[str, Any]
    measurement: str
    status: str
    reason: str = ""
    scores: np.ndarray | None = None
    predictions: np.ndarray | None = None
    seconds: float = math.nan
    peak_memory_mb: float = math.nan

    @property
    def damping(self) -> float | None:
        """The ``damping`` of the method's config, or None when it has none."""
        value = self.config.get("damping")
        return float(value) if value is not None else None


def prepare_run(
    preset: str,
    overrides: dict[str, Any],
    measurements: tuple[str, ...],
    methods: tuple[str, ...],
    device: str,
    threads: int | None,
    options: Mapping[str, Any] | None = None,
) -> tuple[Setting, torch.device]:
    """Validate a runner's input before any work and configure this process.

    Resolves the preset with its overrides, checks every measurement and method name and that
    each of the user's method options belongs to at least one of the methods (the errors list
    the valid ones), resolves the device, and sets torch's intra-op threads (default: 1 for the
    digits presets, whose tiny models run fastest on one thread).

    Args:
        preset: setting preset name (``benchmarks.settings.PRESETS``).
        overrides: ``Setting.replace`` keyword arguments applied to the preset.
        measurements: measurement names the run uses.
        methods: registry names the run uses.
        device: ``auto``, ``cpu`` or ``cuda[:i]``.
        threads: torch intra-op threads; None = the preset's default (see above).
        options: the user's method options (``--option``; not the preset's
            ``method_options``, which need not belong to the selected methods).

    Returns:
        ``(setting, device)``.

    Raises:
        UsageError, UnknownMethodError: an unknown preset, override, measurement, method or
            option, or an unavailable device, before any work.
    """
    setting = get_preset(preset)
    if overrides:
        setting = setting.replace(**overrides)
    for name in measurements:
        try:
            parse_measurement(name, setting.schedule.num_timesteps)
        except ValueError as error:
            raise UsageError(str(error)) from error
    for name in methods:
        build_method(name, {})  # unknown names fail here, before any work
    check_options(options or {}, methods)
    try:
        resolved = resolve_device(device)
    except (ValueError, RuntimeError) as error:  # torch.device("gpu") raises RuntimeError
        raise UsageError(f"--device {device}: {error}") from error
    threads = threads or (1 if setting.dataset.startswith("digits") else None)
    if threads is not None:
        torch.set_num_threads(threads)
    return setting, resolved


def method_options(name: str) -> tuple[str, ...]:
    """The option names (config fields) of method ``name``; raises UnknownMethodError."""
    return tuple(f.name for f in fields(get_method(name).load().Config))


def check_options(options: Mapping[str, Any], methods: tuple[str, ...]) -> None:
    """Check that each of the user's options belongs to at least one of ``methods``.

    Raises:
        UnknownMethodError: an unknown method name.
        UsageError: an option none of the methods has (the message lists their options).
    """
    known = {name: method_options(name) for name in methods}
    unknown = [key for key in options if not any(key in names for names in known.values())]
    if unknown:
        listing = "; ".join(
            f"{name}: {', '.join(names) or '(none)'}" for name, names in known.items()
        )
        raise UsageError(
            f"--option {', '.join(unknown)}: no selected method has this option. "
            f"Options of the selected methods: {listing}"
        )


def prepare_experiment(
    setting: Setting,
    device: torch.device,
    options: RunOptions,
    *,
    with_trajectories: bool = False,
) -> tuple[Experiment, StageLog]:
    """Get (train or load) what every runner's cells share, each a timed stage.

    The data, the base model and the queries (with trajectories when asked; the plain query set
    is stored too, as the ground truth reads it).

    Args:
        setting: the resolved setting (:func:`prepare_run`).
        device: where to compute.
        options: the runner's options (cache directory, data directory, progress).
        with_trajectories: also sample and store the queries' sampling trajectories.

    Returns:
        ``(experiment, stages)``: the prepared inputs and the timings of the three stages.
    """
    provenance = collect_provenance()  # at the start: the code that runs
    store = ArtifactStore(Path(options.cache_dir))
    stages = StageLog()
    with stages.stage("data"):
        train_set = load_train_set(setting, options.data_dir)
    with stages.stage("base_model"):
        model = get_base_model(setting, store, train_set, device=device, progress=options.progress)
    with stages.stage("queries"):
        queries = get_queries(
            setting,
            store,
            model,
            device=device,
            progress=options.progress,
            with_trajectories=with_trajectories,
        )
        if with_trajectories:
            get_queries(setting, store, model, device=device, progress=False)
    executor = make_executor(
        options.executor,
        workers=options.workers,
        ray_address=options.ray_address,
        progress=options.progress,
    )
    experiment = Experiment(
        setting,
        store,
        model,
        train_set.images,
        queries,
        device,
        options.progress,
        provenance,
        executor,
        options.data_dir,
        options.ensemble_size,
    )
    return experiment, stages


def build_method(name: str, options: dict[str, Any]) -> AttributionMethod:
    """Method ``name`` with those ``options`` that its config has; the others are ignored.

    So one option set such as ``{"damping": 1e-3, "proj_dim": 4096}`` can serve every method.
    """
    known = method_options(name)
    return get_method(name).build(**{k: v for k, v in options.items() if k in known})


def method_context(experiment: Experiment, measurement: str, target: str) -> MethodContext:
    """The context of a method that uses ``measurement`` to predict ``target``.

    Args:
        experiment: the prepared inputs (setting, store, base model, training set, queries).
        measurement: what the method differentiates.
        target: what is being predicted; the oracle's ``measure_fn`` measures it with the
            ground truth's protocol.

    Returns:
        The context, with the store as cache (training-side entries keyed by the base model's
        spec, ``pipeline.base_model_spec``), the retraining and measuring oracles (the
        oracle's models are ``subset_model`` models) and the base model's training checkpoints
        (``pipeline.get_base_checkpoints``, stored on first use).
    """
    setting, store = experiment.setting, experiment.store

    def train_fn(positions: torch.Tensor, seed: int) -> nn.Module:
        return get_or_train_model(
            setting,
            store,
            experiment.train_images,
            np.asarray(positions),
            oracle_seed(setting, seed),
            "subset_model",
            device=experiment.device,
        )

    def measure_fn(model: nn.Module) -> torch.Tensor:
        values = measure_queries(
            model,
            setting,
            experiment.queries,
            target,
            n_samples=setting.gt_mc_samples,
            device=experiment.device,
        )
        return torch.from_numpy(values)

    return MethodContext(
        model=experiment.model,
        schedule=setting.schedule,
        train_images=experiment.train_images,
        query_images=experiment.queries.images,
        query_trajectories=experiment.queries.trajectories,
        measurement=measurement,
        hflip=setting.train.hflip,
        seed=setting.seed,
        device=experiment.device,
        cache=store,
        train_spec=base_model_spec(setting),
        train_fn=train_fn,
        measure_fn=measure_fn,
        checkpoints_fn=partial(
            get_base_checkpoints,
            setting,
            store,
            experiment.train_images,
            device=experiment.device,
            progress=experiment.progress,
        ),
        retrain_many=(
            None
            if experiment.executor is None
            else partial(retrain_and_measure_many, experiment, target)
        ),
        grad_samples=setting.grad_mc_samples,
        fit_samples=setting.kfac_mc_samples,
        query_samples=setting.query_grad_mc_samples,
        progress=experiment.progress,
    )


def retrain_and_measure_many(
    experiment: Experiment, target: str, tasks: Sequence[tuple[torch.Tensor, int]]
) -> np.ndarray:
    """The oracle's models on the experiment's executor: ``MethodContext.retrain_many``.

    Each ``(positions, seed)`` is one :class:`benchmarks.groundtruth.OracleTask`: the
    ``subset_model`` trained on ``positions`` with ``oracle_seed(setting, seed)``, measured on
    ``target`` with the ground truth's protocol, model and measurement stored (a killed run
    resumes per model). Bitwise what ``measure_fn(train_fn(positions, seed))`` gives.

    Args:
        experiment: its setting, store, device and executor; the tasks load the training set
            themselves (``load_train_set``), so ``experiment.train_images`` must be the
            setting's, as :func:`prepare_experiment` makes it.
        target: the measurement recorded.
        tasks: ``(# [n_kept] training positions, oracle seed)`` per subset.

    Returns:
        ``# [n_tasks, n_queries]`` float64.

    Raises:
        TaskFailedError: naming the failed tasks, after the others completed.
    """
    oracle_tasks = [
        OracleTask(
            experiment.setting,
            str(experiment.store.root),
            experiment.data_dir,
            tuple(int(p) for p in np.asarray(positions)),
            int(seed),
            target,
            str(experiment.device),
        )
        for positions, seed in tasks
    ]
    keys = [f"oracle seed={t.seed}" for t in oracle_tasks]
    outcomes = experiment.executor.map(run_oracle_task, oracle_tasks, keys, desc="exact retraining")
    raise_failures(outcomes)
    return np.stack([np.asarray(o.value, dtype=np.float64) for o in outcomes]).reshape(
        len(tasks), experiment.queries.images.shape[0]
    )


SUBSET_PREDICTIONS_KIND = "subset-predictions"
"""Store kind of a subset-prediction method's predictions (the exact-retraining oracle's)."""


def subset_predictions_spec(
    setting: Setting,
    name: str,
    config: Mapping[str, Any],
    *,
    measurement: str,
    target: str,
    masks: np.ndarray,
    with_trajectories: bool,
) -> dict:
    """The artifact spec of a subset-prediction method's predictions in an LDS run.

    Args:
        setting: its ``subset_predictions`` fingerprint (``Setting.fingerprint``).
        name: the method's registry name.
        config: the method's resolved config (``asdict(method.config)``).
        measurement: what the method differentiates.
        target: what it predicts (the oracle measures it).
        masks: ``# [n_subsets, n_train]`` bool, the subsets predicted.
        with_trajectories: whether the queries carry their trajectories.

    Returns:
        The JSON-able spec of the :data:`SUBSET_PREDICTIONS_KIND` artifact.
    """
    masks = np.ascontiguousarray(masks, dtype=np.bool_)
    return {
        "setting": setting.fingerprint("subset_predictions"),
        "queries": queries_spec(setting, with_trajectories),
        "method": name,
        "config": dict(config),
        "measurement": measurement,
        "target": target,
        "masks": bytes_digest(masks.tobytes()),
        "masks_shape": list(masks.shape),
    }


def _subset_predictions(
    experiment: Experiment,
    method: AttributionMethod,
    ctx: MethodContext,
    spec: dict,
    masks: np.ndarray,
) -> tuple[np.ndarray, float, float]:
    """``(predictions # [n_subsets, n_queries], seconds, peak MB)``, stored or computed.

    Computed predictions are stored with their seconds and peak memory (the stored ones are
    reported again when they are loaded: the cost of computing them), so the exact-retraining
    oracle retrains and measures once, and a ground-truth bundle can carry its row.
    """
    store = experiment.store
    if not store.exists(SUBSET_PREDICTIONS_KIND, spec):
        timer = StageTimer(f"method:{spec['method']}", device=experiment.device)
        with timer:
            predictions = np.asarray(method.predict_subsets(ctx, masks), dtype=np.float64)
        if predictions.shape != (len(masks), ctx.n_queries) or not np.isfinite(predictions).all():
            return predictions, timer.seconds, timer.peak_memory_mb  # reported, not stored
        cost = np.array([timer.seconds, timer.peak_memory_mb], dtype=np.float64)
        store.save_arrays(SUBSET_PREDICTIONS_KIND, spec, {"predictions": predictions, "cost": cost})
    arrays = store.load_arrays(SUBSET_PREDICTIONS_KIND, spec)
    return arrays["predictions"], float(arrays["cost"][0]), float(arrays["cost"][1])


def _check_finite(name: str, array: np.ndarray, expected: tuple[int, int]) -> str:
    if array.shape != expected:
        return f"{name} returned shape {array.shape}, expected {expected}"
    bad = ~np.isfinite(array)
    if bad.any():
        return (
            f"{name} returned {int(bad.sum())} non-finite values (NaN/inf) of "
            f"{array.size}; try a larger damping"
        )
    return ""


def run_method(
    experiment: Experiment,
    name: str,
    options: dict[str, Any],
    *,
    measurement: str,
    target: str,
    masks: np.ndarray | None = None,
) -> MethodRun:
    """Run method ``name`` and return its outcome (never raises for method failures).

    Args:
        experiment: the prepared inputs.
        name: registry name.
        options: config values applied where the method's config has the field.
        measurement: what the method differentiates (its "measurement").
        target: what is being predicted (the ground truth's measurement).
        masks: ``# [n_subsets, n_train]`` subsets, for subset-prediction methods.

    Returns:
        The outcome: ``ok`` with scores ``# [n_queries, n_train]`` or predictions
        ``# [n_subsets, n_queries]`` (checked finite and of the right shape), else
        ``unavailable`` or ``failed`` with the reason.
    """
    try:
        method = build_method(name, options)
    except (ValueError, TypeError) as error:
        return MethodRun(name, {}, measurement, "failed", f"bad configuration: {error}")
    config = asdict(method.config)
    measurement = config.get("measurement") or measurement
    available, why = method.availability()
    if not available:
        return MethodRun(name, config, measurement, "unavailable", why)
    ctx = method_context(experiment, measurement, target)
    timer = StageTimer(f"method:{name}", device=experiment.device)
    scores = predictions = None
    try:
        if method.kind == "subset-predictions":
            if masks is None:
                raise MethodUnavailableError(f"{name} needs training subsets")
            spec = subset_predictions_spec(
                experiment.setting,
                name,
                config,
                measurement=measurement,
                target=target,
                masks=masks,
                # the images are the same with or without stored trajectories: only a target
                # that reads them keys on them (a journey-trak run keeps the oracle's entry)
                with_trajectories=needs_trajectories((target,)),
            )
            predictions, seconds, peak = _subset_predictions(experiment, method, ctx, spec, masks)
        else:
            with timer:
                scores = np.asarray(method.score(ctx), dtype=np.float64)
            seconds, peak = timer.seconds, timer.peak_memory_mb
    except MethodUnavailableError as error:
        return MethodRun(name, config, measurement, "unavailable", str(error))
    except Exception as error:  # reported as a failed cell; the table is still written
        print(f"[{name}] failed:\n{traceback.format_exc()}", file=sys.stderr, end="")
        detail = traceback.format_exception_only(type(error), error)[-1].strip()
        return MethodRun(name, config, measurement, "failed", detail)
    if scores is not None:
        problem = _check_finite(name, scores, (ctx.n_queries, ctx.n_train))
    else:
        problem = _check_finite(name, predictions, (len(masks), ctx.n_queries))
    status = "failed" if problem else "ok"
    return MethodRun(
        name,
        config,
        measurement,
        status,
        problem,
        scores,
        predictions,
        seconds,
        peak,
    )
