"""The container every loader returns: :class:`ImageDataset`, and :class:`DatasetUnavailableError`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["DatasetUnavailableError", "ImageDataset"]


class DatasetUnavailableError(RuntimeError):
    """A data set could neither be read from disk nor downloaded.

    The message names both remedies: ``--data-dir PATH`` (a local copy) and network download.
    """


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """An image data set held in memory, with stable indices into its source.

    Attributes:
        name: Name of the data set, as passed to :func:`datasets.load_dataset` (non-empty).
        images: ``[N, C, H, W]`` float32 in ``[-1, 1]`` (CPU tensor).
        labels: ``[N]`` int64 class ids of the *source* data set (e.g. CIFAR-10 ids for cifar2).
        indices: ``[N]`` int64 positions of the images in the source set (sklearn's digits array,
            the 50000-image CIFAR-10 train set). Stable across calls and machines; subsets keep
            them, so any result can be mapped back to a source image.

    Equality is identity (``eq=False``): tensors have no single truth value.
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"ImageDataset.name must be a non-empty str, got {self.name!r}.")
        for field, value in (
            ("images", self.images),
            ("labels", self.labels),
            ("indices", self.indices),
        ):
            if not isinstance(value, torch.Tensor):
                raise ValueError(
                    f"ImageDataset.{field} must be a torch.Tensor, got {type(value).__name__}."
                )
        if self.images.ndim != 4:
            raise ValueError(
                f"ImageDataset.images must have shape [N, C, H, W], got {tuple(self.images.shape)}."
            )
        if self.images.dtype != torch.float32:
            raise ValueError(f"ImageDataset.images must be float32, got {self.images.dtype}.")
        for field, value in (("labels", self.labels), ("indices", self.indices)):
            if value.ndim != 1 or value.dtype != torch.int64:
                raise ValueError(
                    f"ImageDataset.{field} must be a 1-D int64 tensor [N], got "
                    f"shape {tuple(value.shape)} dtype {value.dtype}."
                )
        n = self.images.shape[0]
        if self.labels.shape[0] != n or self.indices.shape[0] != n:
            raise ValueError(
                "ImageDataset fields disagree on the number of images: "
                f"images {n}, labels {self.labels.shape[0]}, indices {self.indices.shape[0]}."
            )
        if n and (self.images.min() < -1.0 or self.images.max() > 1.0):
            raise ValueError(
                "ImageDataset.images must lie in [-1, 1], got range "
                f"[{self.images.min().item()}, {self.images.max().item()}]; scale them first."
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, positions: Sequence[int] | np.ndarray | torch.Tensor) -> ImageDataset:
        """The images at ``positions`` (positions in *this* data set, not source indices).

        Args:
            positions: ``[K]`` integer positions in ``[0, len(self))`` (order kept, repeats
                allowed), or a ``[len(self)]`` boolean mask.

        Returns:
            A new :class:`ImageDataset` of ``K`` images with the same name; ``indices`` and
            ``labels`` are carried along, so source indices stay valid.
        """
        pos = torch.as_tensor(
            np.asarray(positions) if not isinstance(positions, torch.Tensor) else positions
        )
        if pos.ndim != 1:
            raise ValueError(f"subset positions must be 1-D, got shape {tuple(pos.shape)}.")
        n = len(self)
        if pos.dtype == torch.bool:
            if pos.shape[0] != n:
                raise ValueError(
                    f"subset boolean mask has length {pos.shape[0]}, the data set has {n} images."
                )
            pos = torch.nonzero(pos.cpu(), as_tuple=False).flatten()
        elif pos.numel() == 0:
            pos = pos.to(torch.int64)
        elif pos.is_floating_point() or pos.is_complex():
            raise ValueError(f"subset positions must be integers or a bool mask, got {pos.dtype}.")
        pos = pos.to(device="cpu", dtype=torch.int64)
        if pos.numel() and (pos.min() < 0 or pos.max() >= n):
            raise ValueError(
                f"subset positions must lie in [0, {n}), got range "
                f"[{pos.min().item()}, {pos.max().item()}]."
            )
        return ImageDataset(
            name=self.name,
            images=self.images[pos],
            labels=self.labels[pos],
            indices=self.indices[pos],
        )
