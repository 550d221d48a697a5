"""Image data sets for the attribution benchmark, as ``[N, C, H, W]`` float32 tensors in [-1, 1].

Name clash: this top-level package is called ``datasets``, the import name of the Hugging Face
``datasets`` library. It is meant to be used from the repository checkout (repository root on
``sys.path``), where it shadows theirs; it must never be installed into site-packages, and
nothing here imports Hugging Face's library. Third-party imports (scikit-learn, torchvision) are
absolute and made lazily inside the loaders, so ``import datasets`` stays light.

``load_dataset(name)`` with ``name`` in :data:`DATASET_NAMES`:

- ``digits``: scikit-learn's 1797 8x8 digits, shipped with scikit-learn (no download).
- ``digits2``: the digits 3 and 8 (357 images), the CIFAR-2 analogue.
- ``digits2-translated``: each ``digits2`` image at a random place on a 16x16 blank canvas (the
  places are fixed data, the same in every run), where pixel distance and model similarity part.
- ``cifar10``: the 50000 CIFAR-10 training images.
- ``cifar2``: 2500 automobiles + 2500 horses sampled from CIFAR-10 (paper, App. G).
"""

from __future__ import annotations

import difflib
from pathlib import Path

from .base import DatasetUnavailableError, ImageDataset
from .transforms import paste_on_canvas, random_hflip

__all__ = [
    "DATASET_NAMES",
    "DatasetUnavailableError",
    "ImageDataset",
    "load_dataset",
    "paste_on_canvas",
    "random_hflip",
]

#: Names accepted by :func:`load_dataset`.
DATASET_NAMES: tuple[str, ...] = ("digits", "digits2", "digits2-translated", "cifar10", "cifar2")


def load_dataset(
    name: str, *, data_dir: str | Path | None = None, download: bool = True
) -> ImageDataset:
    """Load a data set by name.

    Args:
        name: One of :data:`DATASET_NAMES`.
        data_dir: For cifar10/cifar2, a directory containing ``cifar-10-batches-py`` (or that
            directory itself). Ignored by the digits data sets, which ship with scikit-learn.
        download: For cifar10/cifar2 without ``data_dir``: whether torchvision may download
            CIFAR-10 into the default cache (``~/.cache/diffusion-attribution/cifar10``).

    Returns:
        The :class:`ImageDataset`, images ``[N, C, H, W]`` float32 in ``[-1, 1]``.

    Raises:
        ValueError: Unknown ``name`` (the message lists the known names and the closest one).
        DatasetUnavailableError: CIFAR-10 is neither on disk nor downloadable.
    """
    if name == "digits":
        from .digits import load_digits  # deferred: scikit-learn loads only when used

        return load_digits()
    if name == "digits2":
        from .digits import load_digits2  # deferred: scikit-learn loads only when used

        return load_digits2()
    if name == "digits2-translated":
        from .digits import load_digits2_translated  # deferred: scikit-learn loads only when used

        return load_digits2_translated()
    if name == "cifar10":
        from .cifar import load_cifar10  # deferred: torchvision loads only for CIFAR

        return load_cifar10(data_dir, download=download)
    if name == "cifar2":
        from .cifar import load_cifar2  # deferred: torchvision loads only for CIFAR

        return load_cifar2(data_dir, download=download)
    close = difflib.get_close_matches(str(name), DATASET_NAMES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown dataset {name!r}. Known datasets: {', '.join(DATASET_NAMES)}.{hint}")
