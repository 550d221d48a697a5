"""What a method is given: the model, the data, the measurement and the artifact cache."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from diffusion.schedule import NoiseSchedule


class ArtifactCache(Protocol):
    """The artifact store as a method sees it: its one door to ``benchmarks.store.ArtifactStore``.

    Methods never import ``benchmarks``; the runner passes the store in through this protocol.
    """

    def get_or_compute(self, kind: str, spec: Mapping[str, Any], compute_fn, *, fmt: str):
        """The stored payload of ``(kind, spec)``, computed and stored first when absent.

        Args:
            kind: artifact kind, the first part of the store key.
            spec: JSON-able identity of the artifact, the rest of the key.
            compute_fn: ``() -> payload``, called only when no complete entry is stored.
            fmt: payload format: ``"tensors"``, ``"arrays"``, ``"json"`` or ``"state_dict"``.

        Returns:
            The payload as loaded back from the store, also right after computing it.

        """
        ...

    def exists(self, kind: str, spec: Mapping[str, Any]) -> bool:
        """True iff a complete entry of ``(kind, spec)`` is stored."""
        ...

    def work_dir(self, kind: str, key: str) -> Path:
        """A kept directory (created if absent) for a library that writes its own files.

        For example TRAK's save_dir. It is named by ``kind`` and ``key``: letters, digits, ``_``
        and ``-`` (the method derives ``key`` from everything that determines the directory's
        contents).
        """
        ...


@dataclass(frozen=True)
class SampleCounts:
    """The Monte Carlo sample counts a method uses, resolved (:meth:`MethodContext.sample_counts`).

    Attributes:
        grad: draws per training example for training-side gradients.
        query: draws per query for measurement (query-side) gradients.
        fit: draws per training example for fitting curvature.
    """

    grad: int
    query: int
    fit: int


@dataclass(frozen=True)
class MethodContext:
    """Everything a method needs to attribute the queries to the training set.

    Attributes:
        model: the base model trained on the full training set (eval mode).
        schedule: its noise schedule.
        train_images: ``# [n_train, C, H, W]`` the training set, in [-1, 1].
        query_images: ``# [n_queries, C, H, W]`` the generated samples to attribute.
        measurement: measurement name (``diffusion.measurements``), e.g. ``"loss"``, ``"elbo"``.
        query_trajectories: ``# [n_queries, T + 1, C, H, W]`` sampling trajectories, needed by
            the ``trajectory-logprob`` measurement; None otherwise.
        hflip: whether training used random horizontal flips (App. G.8: gradients and the GGN
            then take the expectation over flips).
        seed: seed of every random choice a method makes (MC draws, projections, ...).
        device: where to compute.
        cache: artifact store for expensive intermediates (factors, features), or None.
        train_spec: JSON-able identity of the base model and the training set (the runner's
            ``benchmarks.pipeline.base_model_spec``; it holds the schedule, the recipe's
            hflip and the seed too), NOT of the queries. Methods key their training-side cache
            entries (K-FAC curvature, TRAK features) with it plus their own config and resolved
            sample counts, so changing the queries never recomputes them. A query-dependent
            entry must add the queries' identity itself
            (``methods.fingerprint.tensor_fingerprint(ctx.query_images)``, the measurement).
        train_fn: ``(train_positions, seed) -> model`` retrains on a subset; used by the
            exact-retraining oracle. None when the runner does not offer retraining.
        measure_fn: ``model -> # [n_queries]`` the ground truth's measurement protocol (same
            measurement, MC sample count and common random numbers), so that the oracle
            measures retrained models exactly as the ground truth does. None when not offered.
        retrain_many: ``[(train_positions, seed), ...] -> # [n_tasks, n_queries]``: retrains
            and measures many subsets at once, each as ``measure_fn(train_fn(positions,
            seed))`` would, on the run's executor (a process pool over every core, Ray),
            resuming from the store. None: the oracle loops over ``train_fn`` and
            ``measure_fn`` in this process.
        checkpoints_fn: ``K -> [(learning rate, model), ...]``: the base model's K evenly
            spaced training checkpoints, in training order, the last one the trained model
            (``diffusion.train.evenly_spaced_steps``), each with the learning rate of the step
            that produced it; used by TracIn-CP. None when the runner does not offer them.
        grad_samples: Monte Carlo (t, eps) samples per example for training-loss and
            measurement gradients, the setting's value (App. G.3: 250 on CIFAR). A method's own
            config field, when set, takes precedence.
        fit_samples: Monte Carlo samples per example for fitting curvature (K-FAC factors).
        query_samples: Monte Carlo samples per query for measurement gradients.
        progress: show progress bars.
    """

    model: nn.Module
    schedule: NoiseSchedule
    train_images: torch.Tensor
    query_images: torch.Tensor
    measurement: str = "loss"
    query_trajectories: torch.Tensor | None = None
    hflip: bool = False
    seed: int = 0
    device: torch.device | str = "cpu"
    cache: ArtifactCache | None = None
    train_spec: Mapping[str, Any] = field(default_factory=dict)
    train_fn: Callable[[torch.Tensor, int], nn.Module] | None = None
    measure_fn: Callable[[nn.Module], torch.Tensor] | None = None
    retrain_many: Callable[[Sequence[tuple[torch.Tensor, int]]], np.ndarray] | None = None
    checkpoints_fn: Callable[[int], list[tuple[float, nn.Module]]] | None = None
    grad_samples: int = 250
    fit_samples: int = 250
    query_samples: int = 250
    progress: bool = False

    def __post_init__(self) -> None:
        if self.train_images.dim() != 4 or self.query_images.dim() != 4:
            raise ValueError(
                "train_images and query_images must be [N, C, H, W]; got "
                f"{tuple(self.train_images.shape)} and {tuple(self.query_images.shape)}"
            )
        for name in ("grad_samples", "fit_samples", "query_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.train_images.shape[1:] != self.query_images.shape[1:]:
            raise ValueError(
                f"train image shape {tuple(self.train_images.shape[1:])} differs from query "
                f"image shape {tuple(self.query_images.shape[1:])}"
            )

    def sample_counts(self, config: Any = None) -> SampleCounts:
        """The sample counts a method uses: its config's where set, else this context's.

        The one place where a method's ``grad_samples`` / ``query_samples`` / ``fit_samples``
        config fields (each optional; None = the setting's value) meet the context's.

        Args:
            config: the method's config; fields it lacks or sets to None use the context's.

        Returns:
            The resolved :class:`SampleCounts`.
        """

        def resolve(name: str) -> int:
            value = getattr(config, name, None)
            return int(getattr(self, name) if value is None else value)

        return SampleCounts(
            grad=resolve("grad_samples"), query=resolve("query_samples"), fit=resolve("fit_samples")
        )

    @property
    def n_train(self) -> int:
        """Number of training examples."""
        return int(self.train_images.shape[0])

    @property
    def n_queries(self) -> int:
        """Number of queries (generated samples to attribute)."""
        return int(self.query_images.shape[0])
