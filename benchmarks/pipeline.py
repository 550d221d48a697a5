"""The shared, cached inputs of every benchmark, and the measurement protocol of any model.

The inputs are the training set, the base model and the generated queries. Each expensive
product is stored in the artifact store under a key derived from exactly the settings that
determine it (``Setting.fingerprint``), so changing M or K keeps the base model and the
queries, and a second method run reuses everything.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.settings import Setting
from benchmarks.store import ArtifactStore
from datasets import ImageDataset, load_dataset
from diffusion.backends import build_denoiser
from diffusion.measurements import MCDraws, draw_mc, measure_many, parse_measurement
from diffusion.sampling import sample
from diffusion.train import TrainingCheckpoint, evenly_spaced_steps, train_model
from methods import MethodUnavailableError

TRAINING_LOG = "trainings.log"


def log_training(store: ArtifactStore, key: str, seconds: float) -> None:
    """Append one line per finished training to ``<store>/trainings.log``.

    Written with O_APPEND, so safe for concurrent workers; users and tests read it to see what
    was (re)trained.

    Args:
        store: the artifact store whose root holds the log.
        key: the store key of the trained model.
        seconds: the training's wall-clock time.
    """
    Path(store.root).mkdir(parents=True, exist_ok=True)
    line = f"{time.time():.3f}\t{key}\t{seconds:.2f}\t{os.getpid()}\n"
    fd = os.open(Path(store.root) / TRAINING_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def count_trainings(store: ArtifactStore) -> int:
    """How many trainings this store has logged."""
    path = Path(store.root) / TRAINING_LOG
    return len(path.read_text().splitlines()) if path.exists() else 0


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of parts (stable across runs and machines)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; otherwise ``torch.device(device)``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here; use --device cpu")
    return resolved


def load_train_set(setting: Setting, data_dir: str | Path | None = None) -> ImageDataset:
    """The setting's training set, capped to ``setting.n_train`` examples (first ones)."""
    dataset = load_dataset(setting.dataset, data_dir=data_dir)
    if setting.n_train is not None and setting.n_train < len(dataset):
        dataset = dataset.subset(torch.arange(setting.n_train))
    return dataset


def load_held_out_set(setting: Setting, data_dir: str | Path | None = None) -> ImageDataset:
    """The data set's images that :func:`load_train_set` leaves out (those after ``n_train``).

    Empty when the whole data set is trained on (``n_train`` None or >= its size).
    """
    dataset = load_dataset(setting.dataset, data_dir=data_dir)
    start = len(dataset) if setting.n_train is None else min(setting.n_train, len(dataset))
    return dataset.subset(torch.arange(start, len(dataset)))


def setting_model(setting: Setting, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A model of ``setting.unet``'s backend holding ``weights``, on the CPU, in eval mode.

    Built by ``diffusion.backends.build_denoiser`` (a fixed generator: building draws nothing
    from the global RNG) and loaded strictly.

    Args:
        setting: its model config (``UNetConfig`` or ``DiffusersUNetConfig``).
        weights: a state dict of that model.

    Returns:
        The model.
    """
    model = build_denoiser(setting.unet, generator=torch.Generator().manual_seed(0))
    model.load_state_dict(weights)
    return model.eval()


def load_model(store: ArtifactStore, kind: str, spec: dict, setting: Setting) -> nn.Module:
    """The stored model ``(kind, spec)``: a ``setting.unet`` model on the CPU, in eval mode.

    Args:
        store: the artifact store.
        kind: artifact kind (``"base-model"``, ``"model"``).
        spec: the model's spec.
        setting: its model config (either backend: :func:`setting_model`).

    Returns:
        The model with the stored state dict loaded.
    """
    return setting_model(setting, store.load_state_dict(kind, spec))


def get_or_train(
    store: ArtifactStore,
    kind: str,
    spec: dict,
    setting: Setting,
    train: Callable[[], nn.Module],
    *,
    keep: bool = True,
) -> nn.Module:
    """The one get-or-train path of every model: loaded when ``(kind, spec)`` is stored.

    Otherwise ``train()``, stored when ``keep``, and logged (:func:`log_training`, after the
    save).

    Args:
        store: the artifact store.
        kind: artifact kind (``"base-model"``, ``"model"``).
        spec: everything that determines the model.
        setting: its U-Net config (to load a stored model).
        train: trains the model (``diffusion.train``: float32, eval mode, on the CPU).
        keep: store a trained model.

    Returns:
        the stored model as :func:`load_model` returns it, also right after training it (a
        fresh module: no gradients left over from training, the same one whether or not it
        was cached); the trained module itself when not ``keep``.
    """
    if not store.exists(kind, spec):
        start = time.perf_counter()
        model = train()
        if not keep:
            log_training(store, store.key(kind, spec), time.perf_counter() - start)
            return model
        store.save_state_dict(kind, spec, model.state_dict())
        log_training(store, store.key(kind, spec), time.perf_counter() - start)
    return load_model(store, kind, spec, setting)


def base_model_spec(setting: Setting) -> dict:
    """The artifact spec of the base model: the setting's ``base_model`` fingerprint.

    It identifies the training set too, so it is also the ``MethodContext.train_spec`` that
    methods key their training-side artifacts with.
    """
    return {"setting": setting.fingerprint("base_model")}


def get_base_model(
    setting: Setting,
    store: ArtifactStore,
    train_set: ImageDataset,
    *,
    device: torch.device,
    progress: bool = True,
) -> nn.Module:
    """The model trained on the full training set (trained once, then loaded).

    Args:
        setting: its U-Net config, training recipe, seed and schedule.
        store: the artifact store.
        train_set: the setting's training set (:func:`load_train_set`).
        device: where to train.
        progress: show a progress bar.

    Returns:
        The base model on the CPU, in eval mode.
    """

    def train() -> nn.Module:
        return train_base_model(setting, train_set.images, device=device, progress=progress)

    return get_or_train(store, "base-model", base_model_spec(setting), setting, train)


def train_base_model(
    setting: Setting,
    train_images: torch.Tensor,
    *,
    device: torch.device,
    progress: bool,
    checkpoint_steps: Sequence[int] = (),
    on_checkpoint: Callable[[TrainingCheckpoint], None] | None = None,
) -> nn.Module:
    """The base model's training: the setting's U-Net, recipe, seed and schedule on all images.

    The one place both the base model (:func:`get_base_model`) and its checkpoints
    (:func:`get_base_checkpoints`) are trained, so the two runs are the same training.

    Args:
        setting: its U-Net, training recipe, seed and schedule.
        train_images: ``# [n_train, C, H, W]`` the full training set.
        device: where to train.
        progress: show a progress bar.
        checkpoint_steps: steps after which ``on_checkpoint`` gets a copy of the weights.
        on_checkpoint: receives each :class:`TrainingCheckpoint`.

    Returns:
        The trained model.
    """
    return train_model(
        train_images,
        setting.unet,
        setting.train,
        seed=setting.seed,
        schedule=setting.schedule,
        device=device,
        progress=progress,
        checkpoint_steps=checkpoint_steps,
        on_checkpoint=on_checkpoint,
    )


class BaseCheckpointsMismatchError(MethodUnavailableError):
    """Rerunning the base model's training here does not reproduce the stored base model.

    Its checkpoints would be of another training, so the methods that need them (TracIn-CP)
    are reported unavailable, with this message, rather than run on them.
    """


BASE_CHECKPOINTS_KIND = "base-checkpoints"
"""Artifact kind of the base model's training checkpoints (:func:`get_base_checkpoints`)."""


def base_checkpoints_spec(setting: Setting, n_checkpoints: int) -> dict:
    """The artifact spec of the base model's ``n_checkpoints`` checkpoints.

    The base model's spec (:func:`base_model_spec`) plus the count: the checkpoints of one count
    are :func:`diffusion.train.evenly_spaced_steps` of the base model's training.
    """
    return {**base_model_spec(setting), "n_checkpoints": int(n_checkpoints)}


def get_base_checkpoints(
    setting: Setting,
    store: ArtifactStore,
    train_images: torch.Tensor,
    n_checkpoints: int,
    *,
    device: torch.device,
    progress: bool = True,
) -> list[tuple[float, nn.Module]]:
    """The base model's ``n_checkpoints`` evenly spaced training checkpoints (TracIn-CP).

    Stored under :func:`base_checkpoints_spec`. When absent, the base model's training is rerun
    with its seed and recipe and the checkpoints are kept (:func:`diffusion.train.
    evenly_spaced_steps`: the last one is the trained model); its final weights must equal the
    stored base model bitwise (else the checkpoints would be of another training:
    :class:`BaseCheckpointsMismatchError`, which the runner reports as the method being
    unavailable here), and become the base model when none is stored yet.

    Args:
        setting: the base model's U-Net config, training recipe, seed and schedule.
        store: the artifact store.
        train_images: ``# [n_train, C, H, W]`` the setting's training set
            (:func:`load_train_set`).
        n_checkpoints: how many checkpoints K, in ``[1, setting.train.steps]``.
        device: where to train when the checkpoints are not stored.
        progress: show a progress bar.

    Returns:
        K pairs ``(learning rate, model)``, in training order: each checkpoint's
        ``TrainingCheckpoint.learning_rate`` and its weights in a U-Net on the CPU, in eval mode.
    """
    steps = evenly_spaced_steps(setting.train.steps, n_checkpoints)  # validates the count
    spec = base_checkpoints_spec(setting, n_checkpoints)
    if not store.exists(BASE_CHECKPOINTS_KIND, spec):
        start = time.perf_counter()
        checkpoints = _train_base_checkpoints(setting, train_images, steps, device, progress)
        _check_against_base_model(setting, store, checkpoints[-1])
        store.save_tensors(BASE_CHECKPOINTS_KIND, spec, _checkpoint_tensors(checkpoints))
        log_training(store, store.key(BASE_CHECKPOINTS_KIND, spec), time.perf_counter() - start)
    tensors = store.load_tensors(BASE_CHECKPOINTS_KIND, spec)
    models = []
    for k, lr in enumerate(tensors["learning_rate"].tolist()):
        prefix = f"checkpoint{k}."
        weights = {n[len(prefix) :]: v for n, v in tensors.items() if n.startswith(prefix)}
        models.append((float(lr), setting_model(setting, weights)))
    return models


def _train_base_checkpoints(
    setting: Setting,
    train_images: torch.Tensor,
    steps: Sequence[int],
    device: torch.device,
    progress: bool,
) -> list[TrainingCheckpoint]:
    """The base model's training (its seed and recipe) rerun, with checkpoints after ``steps``."""
    checkpoints: list[TrainingCheckpoint] = []
    train_base_model(
        setting,
        train_images,
        device=device,
        progress=progress,
        checkpoint_steps=steps,
        on_checkpoint=checkpoints.append,
    )
    return checkpoints


def _check_against_base_model(
    setting: Setting, store: ArtifactStore, final: TrainingCheckpoint
) -> None:
    """The final checkpoint is the stored base model bitwise; stored as it when none is."""
    spec = base_model_spec(setting)
    if not store.exists("base-model", spec):
        store.save_state_dict("base-model", spec, final.state_dict)
        return
    stored = store.load_state_dict("base-model", spec)
    differing = [
        name
        for name, value in final.state_dict.items()
        if name not in stored or not torch.equal(stored[name], value)
    ]
    if differing:
        raise BaseCheckpointsMismatchError(
            f"rerunning the base model's training to save checkpoints did not reproduce the "
            f"stored base model ({store.path('base-model', spec)}): {len(differing)} tensors "
            f"differ, e.g. {differing[0]!r}. Training is bitwise reproducible only with the same "
            "torch build, device and thread count (a base model imported from a ground-truth "
            "bundle was trained elsewhere); rerun where the base model was trained, or use a "
            "fresh --cache-dir so that the base model and its checkpoints are trained together"
        )


def _checkpoint_tensors(checkpoints: Sequence[TrainingCheckpoint]) -> dict[str, torch.Tensor]:
    """One flat tensor dict: ``checkpoint{k}.<name>`` weights, ``step`` and ``learning_rate``."""
    tensors = {
        f"checkpoint{k}.{name}": value
        for k, checkpoint in enumerate(checkpoints)
        for name, value in checkpoint.state_dict.items()
    }
    tensors["step"] = torch.tensor([c.step for c in checkpoints], dtype=torch.int64)
    tensors["learning_rate"] = torch.tensor(
        [c.learning_rate for c in checkpoints], dtype=torch.float64
    )
    return tensors


@dataclass(frozen=True)
class QuerySet:
    """Generated samples to attribute.

    Attributes:
        images: ``# [n_queries, C, H, W]`` the samples x_0.
        trajectories: ``# [n_queries, T + 1, C, H, W]`` their sampling trajectories, or None.
    """

    images: torch.Tensor
    trajectories: torch.Tensor | None


def queries_spec(setting: Setting, with_trajectories: bool) -> dict:
    """The artifact spec of the queries (``queries`` fingerprint), with or without trajectories."""
    return {"setting": setting.fingerprint("queries"), "trajectories": with_trajectories}


def needs_trajectories(names: Sequence[str]) -> bool:
    """Whether any of the measurements ``names`` needs the queries' sampling trajectories.

    Only ``trajectory-logprob`` does: its queries are the set stored with trajectories
    (``queries_spec(setting, with_trajectories=True)``, the same images as the plain set).
    """
    return any(parse_measurement(name)[0] == "trajectory-logprob" for name in names)


def get_queries(
    setting: Setting,
    store: ArtifactStore,
    model: nn.Module,
    *,
    device: torch.device,
    with_trajectories: bool = False,
    progress: bool = True,
) -> QuerySet:
    """``setting.n_queries`` samples of the base model (generated once, then loaded).

    Args:
        setting: number of queries, seed and schedule.
        store: the artifact store.
        model: the base model (moved to ``device`` to sample, then back to the CPU).
        device: where to sample.
        with_trajectories: also keep each sample's trajectory (for ``trajectory-logprob``).
        progress: show a progress bar.

    Returns:
        The stored queries: images ``# [n_queries, C, H, W]`` and, with
        ``with_trajectories``, trajectories ``# [n_queries, T + 1, C, H, W]``.
    """
    spec = queries_spec(setting, with_trajectories)

    def generate() -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(derived_seed(setting.seed, "queries"))
        result = sample(
            model.to(device),
            setting.schedule,
            setting.n_queries,
            generator=generator,
            return_trajectory=with_trajectories,
            device=device,
            progress=progress,
        )
        model.cpu()
        tensors = {"images": result.images.contiguous()}
        if result.trajectory is not None:
            tensors["trajectories"] = result.trajectory.contiguous()
        return tensors

    tensors = store.get_or_compute("queries", spec, generate, fmt="tensors")
    return QuerySet(tensors["images"], tensors.get("trajectories"))


def measurement_draws(setting: Setting, query: int, n_samples: int, image_shape) -> MCDraws:
    """The common random numbers of query ``query``: the same for every model measured.

    Args:
        setting: its seed and schedule.
        query: the query's index.
        n_samples: S, the number of (t, eps) draws.
        image_shape: ``(C, H, W)`` of the query.

    Returns:
        The draws: t ``# [1, S]`` and eps ``# [1, S, C, H, W]``.
    """
    generator = torch.Generator().manual_seed(derived_seed(setting.seed, "measure", query))
    return draw_mc(
        1, n_samples, tuple(image_shape), setting.schedule.num_timesteps, generator=generator
    )


def measure_queries(
    model: nn.Module,
    setting: Setting,
    queries: QuerySet,
    name: str,
    *,
    n_samples: int,
    device: torch.device,
    query_indices: Sequence[int] | None = None,
) -> np.ndarray:
    """Measurement ``name`` of ``model`` on every query, with the ground truth's common draws.

    The common random numbers are one fixed set of draws per query, whatever the model.

    Args:
        model: the model to measure (moved to ``device``, in eval mode).
        setting: its seed and schedule (the draws).
        queries: the queries (with trajectories for ``trajectory-logprob``).
        name: the measurement (``diffusion.measurements``).
        n_samples: Monte Carlo draws per query.
        device: where the model computes.
        query_indices: ``# [n_queries]`` global indices of the given queries, whose draws
            measure them (a subset of the queries keeps each query's own draws); None =
            ``range(n_queries)``.

    Returns:
        ``# [n_queries]`` float64.
    """
    return measure_queries_many(
        model,
        setting,
        queries,
        (name,),
        n_samples=n_samples,
        device=device,
        query_indices=query_indices,
    )[name]


@torch.no_grad()
def measure_queries_many(
    model: nn.Module,
    setting: Setting,
    queries: QuerySet,
    names: Sequence[str],
    *,
    n_samples: int,
    device: torch.device,
    query_indices: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """:func:`measure_queries` of several measurements, sharing the model forwards they can.

    Measurements evaluated at the same draws share the forwards
    (``diffusion.measurements.measure_many``: ``loss`` and ``elbo`` cost one forward per draw,
    not two). Query by query: batches of ``n_samples`` rows.

    Args:
        model: the model to measure (moved to ``device``, in eval mode).
        setting: its seed and schedule (the draws).
        queries: the queries (with trajectories for ``trajectory-logprob``).
        names: the measurements (``diffusion.measurements``).
        n_samples: Monte Carlo draws per query.
        device: where the model computes.
        query_indices: ``# [n_queries]`` global indices of the given queries (their draws are
            :func:`measurement_draws` of these indices); None = ``range(n_queries)``.

    Returns:
        name -> ``# [n_queries]`` float64, each bitwise :func:`measure_queries`' value.
    """
    n_queries = queries.images.shape[0]
    indices = range(n_queries) if query_indices is None else [int(i) for i in query_indices]
    if len(indices) != n_queries:
        raise ValueError(f"{len(indices)} query_indices for {n_queries} queries")
    for name in names:
        parse_measurement(name, setting.schedule.num_timesteps)  # unknown names fail here
    needs_trajectory = needs_trajectories(names)
    if needs_trajectory and queries.trajectories is None:
        raise ValueError(f"measurements {tuple(names)} need query trajectories; none were stored")
    model = model.to(device).eval()
    values: dict[str, list[float]] = {name: [] for name in names}
    for q, index in enumerate(indices):
        draws = measurement_draws(setting, index, n_samples, queries.images.shape[1:])
        draws = MCDraws(draws.t.to(device), draws.eps.to(device))
        trajectory = queries.trajectories[q : q + 1].to(device) if needs_trajectory else None
        measured = measure_many(
            names,
            model,
            setting.schedule,
            queries.images[q : q + 1].to(device),
            draws,
            trajectory=trajectory,
        )
        for name, value in measured.items():
            values[name].append(float(value))
    return {name: np.asarray(v, dtype=np.float64) for name, v in values.items()}
