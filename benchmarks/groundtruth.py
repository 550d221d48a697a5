"""Ground truth for the LDS: M random subsets x K seeds, retrained and measured.

One task = one (subset, seed) model: train it on the subset (or load it), then measure every
requested target on every query with the common random numbers of ``pipeline.measure_queries``.
Tasks are idempotent by their artifact keys, so a killed run resumes at the granularity of one
retrained model, and any executor (in-process, pool, Ray) can run them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from benchmarks.executors import LocalExecutor, raise_failures
from benchmarks.pipeline import (
    QuerySet,
    derived_seed,
    load_train_set,
    log_training,
    measure_queries,
    queries_spec,
)
from benchmarks.settings import Setting
from benchmarks.store import ArtifactStore
from diffusion.train import TrainConfig, train_model
from diffusion.unet import UNet


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
    return hashlib.sha256(array.tobytes()).hexdigest()[:20]


def model_spec(
    setting: Setting, positions: np.ndarray, seed: int, train_config: TrainConfig
) -> dict:
    """The artifact spec of a model trained on ``positions`` with ``seed``."""
    return {
        **setting.fingerprint("data"),
        "unet": asdict(setting.unet),
        "train": asdict(train_config),
        "positions": positions_digest(positions),
        "n_positions": int(len(positions)),
        "seed": int(seed),
    }


def get_or_train_model(
    setting: Setting,
    store: ArtifactStore,
    train_images: torch.Tensor,
    positions: np.ndarray,
    seed: int,
    train_config: TrainConfig,
    *,
    device: torch.device,
    keep: bool = True,
    progress: bool = False,
) -> UNet:
    """A model trained on ``train_images[positions]``: loaded when stored, else trained (and
    stored when ``keep``)."""
    spec = model_spec(setting, positions, seed, train_config)
    if store.exists("model", spec):
        model = UNet(setting.unet)
        model.load_state_dict(store.load_state_dict("model", spec))
        return model.eval()
    start = time.perf_counter()
    model = train_model(
        train_images[torch.as_tensor(np.sort(positions))],
        setting.unet,
        train_config,
        seed=seed,
        schedule=setting.schedule,
        device=device,
        progress=progress,
    )
    if keep:
        store.save_state_dict("model", spec, model.state_dict())
    log_training(store, store.key("model", spec), time.perf_counter() - start)  # after the save
    return model


def measurement_spec(model_key: str, setting: Setting, target: str) -> dict:
    return {
        "model": model_key,
        "queries": queries_spec(setting, with_trajectories=False),
        "target": target,
        "n_samples": setting.gt_mc_samples,
    }


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
        return derived_seed(self.setting.seed, "ground-truth", self.subset, self.seed_index)


def _load_queries(store: ArtifactStore, setting: Setting) -> QuerySet:
    tensors = store.load_tensors("queries", queries_spec(setting, with_trajectories=False))
    return QuerySet(tensors["images"], None)


def run_ground_truth_task(task: GroundTruthTask) -> dict[str, np.ndarray]:
    """Train (or load) one subset model and measure it; every result is stored.

    Returns:
        target name -> ``# [n_queries]`` measurements.
    """
    setting, store = task.setting, ArtifactStore(task.store_root)
    device = torch.device(task.device)
    train_set = load_train_set(setting, task.data_dir)
    masks = subset_masks(len(train_set), setting)
    positions = np.flatnonzero(masks[task.subset])
    spec = model_spec(setting, positions, task.train_seed, setting.subset_train)
    model_key = store.key("model", spec)
    missing = [
        t
        for t in task.targets
        if not store.exists("measurement", measurement_spec(model_key, setting, t))
    ]
    results: dict[str, np.ndarray] = {}
    if missing:
        queries = _load_queries(store, setting)
        model = get_or_train_model(
            setting,
            store,
            train_set.images,
            positions,
            task.train_seed,
            setting.subset_train,
            device=device,
        )
        for target in missing:
            values = measure_queries(
                model, setting, queries, target, n_samples=setting.gt_mc_samples, device=device
            )
            store.save_arrays(
                "measurement", measurement_spec(model_key, setting, target), {"values": values}
            )
    for target in task.targets:
        spec_t = measurement_spec(model_key, setting, target)
        results[target] = store.load_arrays("measurement", spec_t)["values"]
    return results


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
    """All (subset, seed) tasks, seed-major so that K = 1 results arrive first."""
    return [
        GroundTruthTask(setting, str(store.root), data_dir, m, k, tuple(targets), device)
        for k in range(setting.n_seeds)
        for m in range(setting.n_subsets)
    ]


def compute_ground_truth(
    setting: Setting,
    store: ArtifactStore,
    targets: Sequence[str],
    *,
    n_train: int,
    executor=None,
    data_dir: str | None = None,
    device: str = "cpu",
) -> GroundTruth:
    """Run (or resume) every ground-truth task and assemble the arrays.

    Requires the queries to be stored already (``pipeline.get_queries``).
    Raises ``TaskFailedError`` naming the failed tasks after the others completed.
    """
    executor = executor or LocalExecutor()
    tasks = ground_truth_tasks(setting, store, targets, data_dir=data_dir, device=device)
    keys = [f"subset={t.subset},seed={t.seed_index}" for t in tasks]
    outcomes = executor.map(run_ground_truth_task, tasks, keys, desc="ground truth (models)")
    raise_failures(outcomes)
    values = {
        target: np.stack(
            [
                np.stack(
                    [
                        outcomes[k * setting.n_subsets + m].value[target]
                        for m in range(setting.n_subsets)
                    ]
                )
                for k in range(setting.n_seeds)
            ]
        )
        for target in targets
    }
    return GroundTruth(subset_masks(n_train, setting), values)
