"""Ground truth for the LDS: M random subsets x K seeds, retrained and measured.

One task = one (subset, seed) model (``GroundTruthTask``), or a group of them trained at once
(``EnsembleTask``): train each model on its subset (or load it), then measure every requested
target on every query with the common random numbers of ``pipeline.measure_queries``. Every
model and measurement is stored under its own artifact key, so a killed run resumes at the
granularity of one retrained model (an ensemble task trains only its members that are not stored
yet), and any executor (in-process, pool, Ray) can run the tasks.

Trainer: a ground truth is trained by ONE path, chosen by ``ground_truth_trainer``:

- ``"ensemble"`` (default, ``compute_ground_truth(..., ensemble_size=8)``) for harness U-Nets
  without dropout (the digits presets; ``diffusion.ensemble.ensemble_trainable``): ``diffusion.ensemble.train_ensemble`` trains ``ensemble_size``
  models per vmapped step, member k with exactly the random streams of ``train_model(...,
  seed=k's seed)``. NOT bitwise equal to one-at-a-time training: the vmapped kernels round
  differently (float64: equal to ~3e-14; in float32 the difference is far below the
  seed-to-seed spread and immaterial to the LDS, which averages over seeds: measured figures in
  ``perf/README.md``, "Ensemble training"). A member's weights do not depend on which other
  members share its ensemble (bitwise, CPU, fixed thread count), so ``ensemble_size``, grouping
  and resumption never change the result. Its throughput against one-at-a-time training is in
  ``perf/README.md`` too.
- ``"single"`` (``train_model``, one model per task) for U-Nets with dropout (the CIFAR
  presets: vmapped dropout cannot follow train_model's per-seed masks), for diffusers models
  (``quick-diffusers``, ``cifar2-paper``: the vmapped trainer knows the harness U-Net's layers
  only) or with ``ensemble_size=None``.

The two never mix silently: an ensemble-trained model's spec carries ``"trainer": "ensemble"``
(single-trained specs carry no ``trainer`` entry).

Keys: a model's spec is :func:`model_spec` (the setting's ``subset_model`` or ``retrain_model``
fingerprint, the positions and the seed), a measurement's :func:`measurement_spec` (the
``measurement`` fingerprint, the measured model's key and the target).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from benchmarks.executors import LocalExecutor, raise_failures
from benchmarks.io import bytes_digest
from benchmarks.pipeline import (
    QuerySet,
    derived_seed,
    get_or_train,
    load_model,
    load_train_set,
    log_training,
    measure_queries_many,
    needs_trajectories,
    queries_spec,
)
from benchmarks.settings import Setting
from benchmarks.store import ArtifactStore
from diffusion.ensemble import ENSEMBLE_KERNELS, ensemble_trainable, train_ensemble
from diffusion.train import TrainConfig, train_model

TRAINERS: tuple[str, ...] = ("single", "ensemble")
"""How a ground-truth model is trained: ``train_model`` one at a time, or ``train_ensemble``."""

MODEL_RECIPES: dict[str, str] = {"subset_model": "subset_train", "retrain_model": "train"}
"""Fingerprint part of a retrained model -> the Setting field holding its training recipe.

``subset_model``: the models of the ground truth and of the exact-retraining oracle (App. G.7);
``retrain_model``: the models retrained without top influences, like the base model (App. G.6).
"""

DEFAULT_ENSEMBLE_SIZE = 8
"""Models per ensemble task.

8 is where the end-to-end throughput gain of ``perf/test_bench_groundtruth.py`` levels off
(figures in ``perf/README.md``, "Ensemble training"), and keeps tasks small enough for two pool
workers or Ray to share the quick ground truth's 64 models.
"""


def subset_masks(n_train: int, setting: Setting) -> np.ndarray:
    """The M random subsets of the LDS, each keeping ``round(fraction * N)`` examples.

    Returns:
        ``# [n_subsets, n_train]`` bool, True where the example is kept.
    """
    rng = np.random.default_rng(derived_seed(setting.seed, "subsets"))
    kept = round(setting.subset_fraction * n_train)
    masks = np.zeros((setting.n_subsets, n_train), dtype=bool)
    for m in range(setting.n_subsets):
        masks[m, rng.permutation(n_train)[:kept]] = True
    return masks


def positions_digest(positions: torch.Tensor | np.ndarray) -> str:
    """A short hash of a sorted list of training positions (part of model keys)."""
    array = np.sort(np.asarray(positions, dtype=np.int64))
    return bytes_digest(array.tobytes())[:20]


def _check_model_part(part: str) -> None:
    if part not in MODEL_RECIPES:
        raise ValueError(f"model part must be one of {tuple(MODEL_RECIPES)}, got {part!r}")


def model_recipe(setting: Setting, part: str) -> TrainConfig:
    """The training recipe of the models of fingerprint ``part`` (:data:`MODEL_RECIPES`)."""
    _check_model_part(part)
    return getattr(setting, MODEL_RECIPES[part])


def model_spec(
    setting: Setting,
    part: str,
    positions: np.ndarray,
    seed: int,
    trainer: str = "single",
) -> dict:
    """The artifact spec of a model of ``part`` trained on ``positions`` with ``seed``.

    ``{"setting": setting.fingerprint(part), ...}`` with the positions' digest and count and
    the seed. Only ensemble-trained specs record the trainer (``"trainer": "ensemble"``, with
    ``diffusion.ensemble.ENSEMBLE_KERNELS``).

    Args:
        setting: its ``part`` fingerprint.
        part: ``"subset_model"`` or ``"retrain_model"`` (:data:`MODEL_RECIPES`).
        positions: ``# [n_kept]`` the training positions (any order; hashed sorted).
        seed: the training seed.
        trainer: one of :data:`TRAINERS`.

    Returns:
        The JSON-able spec of the ``"model"`` artifact.
    """
    if trainer not in TRAINERS:
        raise ValueError(f"trainer must be one of {TRAINERS}, got {trainer!r}")
    _check_model_part(part)
    spec = {
        "setting": setting.fingerprint(part),
        "positions": positions_digest(positions),
        "n_positions": int(len(positions)),
        "seed": int(seed),
    }
    if trainer == "ensemble":
        spec["trainer"] = "ensemble"
        spec["kernels"] = ENSEMBLE_KERNELS  # rounding differs between versions: never mixed
    return spec


def get_or_train_model(
    setting: Setting,
    store: ArtifactStore,
    train_images: torch.Tensor,
    positions: np.ndarray,
    seed: int,
    part: str,
    *,
    device: torch.device,
    keep: bool = True,
    progress: bool = False,
) -> nn.Module:
    """A model trained on ``train_images[positions]``: loaded when stored, else trained.

    ``pipeline.get_or_train`` with :func:`model_spec` (single trainer); a trained model is
    stored when ``keep``.

    Args:
        setting: its U-Net config, schedule, recipes and fingerprints.
        store: the artifact store.
        train_images: ``# [n_train, C, H, W]`` the whole training set.
        positions: ``# [n_kept]`` the positions trained on (any order).
        seed: the training seed.
        part: ``"subset_model"`` or ``"retrain_model"``: the key's fingerprint part and the
            training recipe (:func:`model_recipe`).
        device: where to train.
        keep: store a trained model.
        progress: show a progress bar.

    Returns:
        The model on the CPU in eval mode (as ``pipeline.get_or_train`` returns it).
    """

    def train() -> nn.Module:
        return train_model(
            train_images[torch.as_tensor(np.sort(positions))],
            setting.unet,
            model_recipe(setting, part),
            seed=seed,
            schedule=setting.schedule,
            device=device,
            progress=progress,
        )

    spec = model_spec(setting, part, positions, seed)
    return get_or_train(store, "model", spec, setting, train, keep=keep)


def get_or_train_models(
    setting: Setting,
    store: ArtifactStore,
    train_images: torch.Tensor,
    members: Sequence[tuple[np.ndarray, int]],
    part: str,
    *,
    device: torch.device,
    keep: bool = True,
    progress: bool = False,
) -> list[nn.Module]:
    """Ensemble-trained models, one per ``(positions, seed)`` member, loaded or trained.

    Stored members are loaded; the others are trained together by ``train_ensemble`` (one
    ensemble per subset size) and stored (when ``keep``) under their own
    ``model_spec(..., trainer="ensemble")`` keys. Each trained member gets its own
    ``trainings.log`` line (after its save) with the ensemble's time divided by the number of
    members trained.

    Args:
        setting: its U-Net config, schedule, recipes and fingerprints.
        store: the artifact store.
        train_images: ``# [n_train, C, H, W]`` the whole training set.
        members: ``(positions # [n_kept], seed)`` of each model.
        part: ``"subset_model"`` or ``"retrain_model"``: the keys' fingerprint part and the
            training recipe shared by all members (:func:`model_recipe`).
        device: where to train.
        keep: store the trained models.
        progress: show a progress bar.

    Returns:
        the models, in the order of ``members``.
    """
    specs = [
        model_spec(setting, part, positions, seed, trainer="ensemble")
        for positions, seed in members
    ]
    models: list[nn.Module | None] = [
        load_model(store, "model", spec, setting) if store.exists("model", spec) else None
        for spec in specs
    ]
    by_size: dict[int, list[int]] = {}
    for i, model in enumerate(models):
        if model is None:
            by_size.setdefault(len(members[i][0]), []).append(i)
    for group in by_size.values():
        start = time.perf_counter()
        trained = train_ensemble(
            train_images,
            [torch.as_tensor(np.sort(members[i][0])) for i in group],
            setting.unet,
            model_recipe(setting, part),
            seeds=[int(members[i][1]) for i in group],
            schedule=setting.schedule,
            device=device,
            progress=progress,
        )
        seconds = (time.perf_counter() - start) / len(group)
        for i, model in zip(group, trained, strict=True):
            if keep:
                store.save_state_dict("model", specs[i], model.state_dict())
            log_training(store, store.key("model", specs[i]), seconds)  # after the save
            models[i] = model
    return models  # type: ignore[return-value]


def measurement_spec(model_key: str, setting: Setting, target: str) -> dict:
    """The artifact spec of measurement ``target`` of a model on the setting's queries.

    ``{"setting": setting.fingerprint("measurement"), "model": model_key, "target": target}``:
    the fingerprint holds the queries' fields (their trajectories, which ``trajectory-logprob``
    reads, follow from them) and ``gt_mc_samples``.

    Args:
        model_key: the store key of the measured model.
        setting: its ``measurement`` fingerprint.
        target: the measurement name (e.g. ``"loss"``, ``"elbo"``).

    Returns:
        The JSON-able spec of the ``"measurement"`` artifact.
    """
    return {"setting": setting.fingerprint("measurement"), "model": model_key, "target": target}


@dataclass(frozen=True)
class GroundTruthTask:
    """One retrained model of the ground truth (picklable: runs on any executor).

    Attributes:
        setting: the benchmark setting.
        store_root: artifact store path every worker can reach.
        data_dir: where CIFAR lives, if needed.
        subset: subset index m in [0, M).
        seed_index: seed index k in [0, K).
        targets: measurement names to record.
        device: device string for training and measuring.
    """

    setting: Setting
    store_root: str
    data_dir: str | None
    subset: int
    seed_index: int
    targets: tuple[str, ...]
    device: str = "cpu"

    @property
    def train_seed(self) -> int:
        """The training seed of this model (:func:`ground_truth_seed`)."""
        return ground_truth_seed(self.setting, self.subset, self.seed_index)


@dataclass(frozen=True)
class EnsembleTask:
    """Several retrained models of the ground truth, trained as one ensemble (picklable).

    Attributes:
        setting: the benchmark setting (its model must be ``ensemble_trainable``: a harness
            U-Net without dropout).
        store_root: artifact store path every worker can reach.
        data_dir: where CIFAR lives, if needed.
        members: ``(subset m, seed index k)`` pairs, m in [0, M), k in [0, K); non-empty.
        targets: measurement names to record.
        device: device string for training and measuring.
    """

    setting: Setting
    store_root: str
    data_dir: str | None
    members: tuple[tuple[int, int], ...]
    targets: tuple[str, ...]
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("EnsembleTask.members must hold at least one (subset, seed) pair")
        if not ensemble_trainable(self.setting.unet):
            raise ValueError(
                f"EnsembleTask needs a harness U-Net without dropout (got "
                f"{_model_description(self.setting)}): use GroundTruthTask (one model per task)"
            )

    @property
    def key(self) -> str:
        """The executor key naming every member, e.g. ``subset=0,seed=0+subset=1,seed=0``."""
        return "+".join(f"subset={m},seed={k}" for m, k in self.members)


def ground_truth_seed(setting: Setting, subset: int, seed_index: int) -> int:
    """The training seed of ground-truth model (subset m, seed index k).

    With ``setting.subset_seeds == "shared"`` it depends on k alone: the k-th models of all
    subsets share their initial weights and noise draws (common random numbers across subsets).

    Args:
        setting: its seed, from which every ground-truth seed is derived, and its
            ``subset_seeds`` scheme.
        subset: subset index m in [0, M).
        seed_index: seed index k in [0, K).

    Returns:
        A 63-bit seed (:func:`benchmarks.pipeline.derived_seed`).
    """
    if setting.subset_seeds == "shared":
        return derived_seed(setting.seed, "ground-truth", seed_index)
    return derived_seed(setting.seed, "ground-truth", subset, seed_index)


def _model_description(setting: Setting) -> str:
    """E.g. ``a UNetConfig with dropout=0.1`` (error messages)."""
    return f"a {type(setting.unet).__name__} with dropout={setting.unet.dropout}"


def ground_truth_trainer(setting: Setting, ensemble_size: int | None) -> str:
    """The one trainer of the ground truth (see the module docstring).

    ``"ensemble"`` when ``ensemble_size`` is given and the model is a harness U-Net without
    dropout (``diffusion.ensemble.ensemble_trainable``), else ``"single"`` (diffusers models,
    dropout, or ``ensemble_size=None``).
    """
    if ensemble_size is not None and (
        not isinstance(ensemble_size, int) or isinstance(ensemble_size, bool) or ensemble_size < 1
    ):
        raise ValueError(
            f"ensemble_size must be a positive int or None (one model per task), got "
            f"{ensemble_size!r}"
        )
    if ensemble_size is not None and ensemble_trainable(setting.unet):
        return "ensemble"
    return "single"


def _load_queries(store: ArtifactStore, setting: Setting, targets: Sequence[str]) -> QuerySet:
    """The stored queries, with their trajectories when a target needs them."""
    with_trajectories = needs_trajectories(targets)
    tensors = store.load_tensors("queries", queries_spec(setting, with_trajectories))
    return QuerySet(tensors["images"], tensors["trajectories"] if with_trajectories else None)


def check_trajectories_stored(
    store: ArtifactStore, setting: Setting, targets: Sequence[str]
) -> None:
    """Check, before any training, that the queries' trajectories are stored if a target needs them.

    Args:
        store: the artifact store the tasks read.
        setting: its queries' fingerprint.
        targets: measurement names to record.

    Raises:
        ValueError: a target needs trajectories (``trajectory-logprob``) and the queries with
            their trajectories (``queries_spec(setting, with_trajectories=True)``) are not stored.
    """
    if needs_trajectories(targets) and not store.exists("queries", queries_spec(setting, True)):
        raise ValueError(
            f"the ground truth of targets {tuple(targets)} needs the queries with their sampling "
            f"trajectories, which the store {store.root} lacks; store them first "
            "(pipeline.get_queries(..., with_trajectories=True))"
        )


def _missing_targets(
    store: ArtifactStore, setting: Setting, model_key: str, targets: Sequence[str]
) -> list[str]:
    return [
        t
        for t in targets
        if not store.exists("measurement", measurement_spec(model_key, setting, t))
    ]


def _measure_and_store(
    store: ArtifactStore,
    setting: Setting,
    model: nn.Module,
    model_key: str,
    targets: Sequence[str],
    queries: QuerySet,
    device: torch.device,
) -> None:
    measured = measure_queries_many(  # loss and elbo share their model forwards
        model, setting, queries, tuple(targets), n_samples=setting.gt_mc_samples, device=device
    )
    for target in targets:
        store.save_arrays(
            "measurement",
            measurement_spec(model_key, setting, target),
            {"values": measured[target]},
        )


def _load_measurements(
    store: ArtifactStore, setting: Setting, model_key: str, targets: Sequence[str]
) -> dict[str, np.ndarray]:
    return {
        target: store.load_arrays("measurement", measurement_spec(model_key, setting, target))[
            "values"
        ]
        for target in targets
    }


def run_ground_truth_task(task: GroundTruthTask) -> dict[str, np.ndarray]:
    """Train (or load) one subset model and measure it; every result is stored.

    Returns:
        target name -> ``# [n_queries]`` measurements.
    """
    train_set = load_train_set(task.setting, task.data_dir)
    positions = np.flatnonzero(subset_masks(len(train_set), task.setting)[task.subset])
    return train_measure_and_store(
        task.setting,
        ArtifactStore(task.store_root),
        train_set.images,
        positions,
        task.train_seed,
        task.targets,
        torch.device(task.device),
    )


def train_measure_and_store(
    setting: Setting,
    store: ArtifactStore,
    train_images: torch.Tensor,
    positions: np.ndarray,
    train_seed: int,
    targets: Sequence[str],
    device: torch.device,
) -> dict[str, np.ndarray]:
    """Measure the ``subset_model`` trained on ``positions`` with ``train_seed``; store it all.

    The model is trained only when a target's measurement is not stored yet (``train_model``,
    one model); each measurement is stored under :func:`measurement_spec` of the model's key.

    Args:
        setting: the benchmark setting (recipe, measurement protocol).
        store: the artifact store read and written.
        train_images: ``# [n_train, C, H, W]`` the full training set.
        positions: ``# [n_kept]`` training-set positions the model trains on.
        train_seed: its training seed.
        targets: measurement names to record.
        device: where to train and measure.

    Returns:
        target name -> ``# [n_queries]`` measurements.
    """
    model_key = store.key("model", model_spec(setting, "subset_model", positions, train_seed))
    missing = _missing_targets(store, setting, model_key, targets)
    if missing:
        queries = _load_queries(store, setting, missing)
        model = get_or_train_model(
            setting, store, train_images, positions, train_seed, "subset_model", device=device
        )
        _measure_and_store(store, setting, model, model_key, missing, queries, device)
    return _load_measurements(store, setting, model_key, targets)


@dataclass(frozen=True)
class OracleTask:
    """One model of the exact-retraining oracle (picklable: runs on any executor).

    Attributes:
        setting: the benchmark setting.
        store_root: artifact store path every worker can reach.
        data_dir: where CIFAR lives, if needed.
        positions: training-set positions the model trains on (one subset of the LDS).
        seed: the oracle's seed of that subset (``ExactRetraining.subset_seed``); the model's
            training seed is :func:`oracle_seed` of it, never a ground-truth seed.
        target: the measurement recorded, with the ground truth's protocol.
        device: device string for training and measuring.
    """

    setting: Setting
    store_root: str
    data_dir: str | None
    positions: tuple[int, ...]
    seed: int
    target: str
    device: str = "cpu"


def oracle_seed(setting: Setting, seed: int) -> int:
    """The training seed of the oracle's model with seed ``seed`` (a 63-bit derived seed)."""
    return derived_seed(setting.seed, "oracle", int(seed))


def run_oracle_task(task: OracleTask) -> np.ndarray:
    """Train (or load) one oracle model and measure it like the ground truth; all stored.

    Returns:
        ``# [n_queries]`` its measurement of ``task.target``.
    """
    return train_measure_and_store(
        task.setting,
        ArtifactStore(task.store_root),
        load_train_set(task.setting, task.data_dir).images,
        np.asarray(task.positions, dtype=np.int64),
        oracle_seed(task.setting, task.seed),
        (task.target,),
        torch.device(task.device),
    )[task.target]


def run_ensemble_task(task: EnsembleTask) -> tuple[dict[str, np.ndarray], ...]:
    """Train (or load) several subset models, the missing ones as one ensemble, and measure them.

    Every model and measurement is stored under its own key. Members whose measurements are all
    stored are neither loaded nor trained.

    Returns:
        per member (in ``task.members`` order): target name -> ``# [n_queries]`` measurements.
    """
    setting, store = task.setting, ArtifactStore(task.store_root)
    device = torch.device(task.device)
    train_set = load_train_set(setting, task.data_dir)
    masks = subset_masks(len(train_set), setting)
    positions = [np.flatnonzero(masks[m]) for m, _ in task.members]
    seeds = [ground_truth_seed(setting, m, k) for m, k in task.members]
    keys = [
        ground_truth_model_key(store, setting, masks, m, k, "ensemble") for m, k in task.members
    ]
    missing = [_missing_targets(store, setting, key, task.targets) for key in keys]
    todo = [i for i, targets in enumerate(missing) if targets]
    if todo:
        queries = _load_queries(store, setting, sorted({t for i in todo for t in missing[i]}))
        models = get_or_train_models(
            setting,
            store,
            train_set.images,
            [(positions[i], seeds[i]) for i in todo],
            "subset_model",
            device=device,
        )
        for i, model in zip(todo, models, strict=True):
            _measure_and_store(store, setting, model, keys[i], missing[i], queries, device)
    return tuple(_load_measurements(store, setting, key, task.targets) for key in keys)


@dataclass(frozen=True)
class GroundTruth:
    """Measured ground truth of the LDS.

    Attributes:
        masks: ``# [n_subsets, n_train]`` bool, True where kept.
        values: target -> ``# [n_seeds, n_subsets, n_queries]`` measurements.
    """

    masks: np.ndarray
    values: dict[str, np.ndarray]

    def mean_over_seeds(self, target: str) -> np.ndarray:
        """``# [n_subsets, n_queries]`` the seed-averaged measurement (the LDS target)."""
        return self.values[target].mean(axis=0)


def ground_truth_tasks(
    setting: Setting,
    store: ArtifactStore,
    targets: Sequence[str],
    *,
    data_dir: str | None = None,
    device: str = "cpu",
) -> list[GroundTruthTask]:
    """All (subset, seed) tasks, seed-major so that K = 1 results arrive first.

    Args:
        setting: the benchmark setting (M subsets, K seeds).
        store: the artifact store; its root is passed to the tasks.
        targets: measurement names to record.
        data_dir: where CIFAR lives, if needed.
        device: device string for training and measuring.

    Returns:
        ``M * K`` tasks, all of seed 0 first.
    """
    return [
        GroundTruthTask(setting, str(store.root), data_dir, m, k, tuple(targets), device)
        for k in range(setting.n_seeds)
        for m in range(setting.n_subsets)
    ]


def ensemble_tasks(
    setting: Setting,
    store: ArtifactStore,
    targets: Sequence[str],
    *,
    ensemble_size: int = DEFAULT_ENSEMBLE_SIZE,
    data_dir: str | None = None,
    device: str = "cpu",
) -> list[EnsembleTask]:
    """All (subset, seed) models in consecutive groups of ``ensemble_size``.

    Seed-major like ``ground_truth_tasks``; the last group may be smaller.

    Args:
        setting: the benchmark setting (M subsets, K seeds); its model must be a harness U-Net
            without dropout.
        store: the artifact store; its root is passed to the tasks.
        targets: measurement names to record.
        ensemble_size: models per task.
        data_dir: where CIFAR lives, if needed.
        device: device string for training and measuring.

    Returns:
        ``ceil(M * K / ensemble_size)`` tasks.
    """
    if ground_truth_trainer(setting, ensemble_size) != "ensemble":
        raise ValueError(
            f"ensemble tasks need a harness U-Net without dropout (got "
            f"{_model_description(setting)}): use ground_truth_tasks"
        )
    pairs = [(m, k) for k in range(setting.n_seeds) for m in range(setting.n_subsets)]
    return [
        EnsembleTask(
            setting,
            str(store.root),
            data_dir,
            tuple(pairs[i : i + ensemble_size]),
            tuple(targets),
            device,
        )
        for i in range(0, len(pairs), ensemble_size)
    ]


def ground_truth_model_key(
    store: ArtifactStore,
    setting: Setting,
    masks: np.ndarray,
    subset: int,
    seed_index: int,
    trainer: str,
) -> str:
    """The store key of ground-truth model (subset m, seed index k) trained by ``trainer``.

    Args:
        store: the artifact store (its key function).
        setting: the benchmark setting.
        masks: ``# [n_subsets, n_train]`` the subsets (:func:`subset_masks`).
        subset: subset index m in [0, M).
        seed_index: seed index k in [0, K).
        trainer: one of :data:`TRAINERS` (:func:`ground_truth_trainer`).

    Returns:
        ``store.key("model", model_spec(...))``.
    """
    positions = np.flatnonzero(masks[subset])
    seed = ground_truth_seed(setting, subset, seed_index)
    spec = model_spec(setting, "subset_model", positions, seed, trainer=trainer)
    return store.key("model", spec)


def ground_truth_measurement_specs(
    store: ArtifactStore,
    setting: Setting,
    masks: np.ndarray,
    targets: Sequence[str],
    trainer: str,
) -> dict[tuple[int, int, str], dict]:
    """The measurement spec of every (subset, seed, target) of the ground truth.

    Args:
        store: the artifact store (its key function).
        setting: the benchmark setting (M subsets, K seeds).
        masks: ``# [n_subsets, n_train]`` the subsets (:func:`subset_masks`).
        targets: measurement names.
        trainer: one of :data:`TRAINERS` (:func:`ground_truth_trainer`).

    Returns:
        ``(m, k, target) -> measurement_spec(...)``, seed-major.
    """
    specs = {}
    for k in range(setting.n_seeds):
        for m in range(setting.n_subsets):
            key = ground_truth_model_key(store, setting, masks, m, k, trainer)
            for target in targets:
                specs[(m, k, target)] = measurement_spec(key, setting, target)
    return specs


def load_ground_truth_values(
    store: ArtifactStore, setting: Setting, specs: dict[tuple[int, int, str], dict]
) -> dict[str, np.ndarray]:
    """The stored measurements of :func:`ground_truth_measurement_specs`, as arrays.

    Args:
        store: the artifact store holding them.
        setting: the benchmark setting (M subsets, K seeds).
        specs: ``(m, k, target) -> measurement spec`` (:func:`ground_truth_measurement_specs`).

    Returns:
        target -> ``# [n_seeds, n_subsets, n_queries]``.
    """
    targets = dict.fromkeys(t for _, _, t in specs)
    return {
        target: np.stack(
            [
                np.stack(
                    [
                        store.load_arrays("measurement", specs[(m, k, target)])["values"]
                        for m in range(setting.n_subsets)
                    ]
                )
                for k in range(setting.n_seeds)
            ]
        )
        for target in targets
    }


def compute_ground_truth(
    setting: Setting,
    store: ArtifactStore,
    targets: Sequence[str],
    *,
    n_train: int,
    executor=None,
    data_dir: str | None = None,
    device: str = "cpu",
    ensemble_size: int | None = DEFAULT_ENSEMBLE_SIZE,
) -> GroundTruth:
    """Run (or resume) the ground-truth tasks with missing measurements; assemble the arrays.

    Requires the queries to be stored already (``pipeline.get_queries``; with their
    trajectories for a ``trajectory-logprob`` target), checked before any training. Ensemble- and
    single-trained models have different keys. Only the tasks with a missing measurement go to
    the executor (none when the measurements are stored, e.g. imported from a bundle:
    ``benchmarks.bundle``); every value is then read from the store.

    Args:
        setting: the benchmark setting (M subsets, K seeds, measurement protocol).
        store: the artifact store every task reads and writes.
        targets: measurement names to record.
        n_train: the training set size (the masks' width).
        executor: runs the tasks (``benchmarks.executors``); None: a ``LocalExecutor``.
        data_dir: where CIFAR lives, if needed.
        device: device string for training and measuring.
        ensemble_size: models per ensemble task (``ground_truth_trainer`` picks the trainer:
            ensembles for U-Nets without dropout, else one model per task); None trains one
            model per task with ``train_model``.

    Returns:
        The masks ``# [n_subsets, n_train]`` and, per target, the measurements
        ``# [n_seeds, n_subsets, n_queries]``.

    Raises:
        TaskFailedError: naming the failed tasks, after the others completed.
    """
    check_trajectories_stored(store, setting, targets)
    executor = executor or LocalExecutor()
    trainer = ground_truth_trainer(setting, ensemble_size)
    masks = subset_masks(n_train, setting)
    specs = ground_truth_measurement_specs(store, setting, masks, targets, trainer)
    missing = {(m, k) for (m, k, _), spec in specs.items() if not store.exists("measurement", spec)}
    if trainer == "ensemble":
        groups = ensemble_tasks(
            setting,
            store,
            targets,
            ensemble_size=ensemble_size,
            data_dir=data_dir,
            device=device,
        )
        groups = [g for g in groups if missing.intersection(g.members)]
        outcomes = executor.map(
            run_ensemble_task, groups, [g.key for g in groups], desc="ground truth (ensembles)"
        )
    else:
        tasks = ground_truth_tasks(setting, store, targets, data_dir=data_dir, device=device)
        tasks = [t for t in tasks if (t.subset, t.seed_index) in missing]
        keys = [f"subset={t.subset},seed={t.seed_index}" for t in tasks]
        outcomes = executor.map(run_ground_truth_task, tasks, keys, desc="ground truth (models)")
    raise_failures(outcomes)
    return GroundTruth(masks, load_ground_truth_values(store, setting, specs))


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.groundtruth``: compute, export or import a ground truth.

    The command lives in :func:`benchmarks.bundle.main` (which imports this module).
    """
    from benchmarks.bundle import main as bundle_main  # deferred: benchmarks.bundle imports this

    return bundle_main(argv)


if __name__ == "__main__":
    sys.exit(main())
