"""CIFAR-10 and CIFAR-2 from torchvision's on-disk format (``cifar-10-batches-py``).

Source of the images, in order:

1. ``data_dir`` when given: either the directory that *contains* ``cifar-10-batches-py`` or that
   directory itself. Nothing is downloaded into a ``data_dir``.
2. Otherwise the default cache :func:`default_cache_dir` (``~/.cache/diffusion-attribution/
   cifar10``): used if it already holds the data, else filled by torchvision's downloader (the
   archive's md5 is verified) when ``download=True``.
3. Otherwise :class:`~datasets.base.DatasetUnavailableError`, naming both remedies.

The batches are read directly with a restricted unpickler (only numpy array reconstruction is
allowed), not through ``torchvision.datasets.CIFAR10``: its per-file md5 check would reject a
small test copy, and a plain ``pickle.load`` would run arbitrary code from a tampered file.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import DatasetUnavailableError, ImageDataset

__all__ = [
    "CIFAR2_CLASSES",
    "CIFAR2_PER_CLASS",
    "CIFAR2_SEED",
    "CIFAR_FOLDER",
    "cifar2_indices",
    "default_cache_dir",
    "load_cifar10",
    "load_cifar2",
    "read_cifar10_train",
    "resolve_cifar10_dir",
]

#: Folder name of the python version of CIFAR-10 (as extracted from cifar-10-python.tar.gz).
CIFAR_FOLDER = "cifar-10-batches-py"
#: The five training batches, concatenated in this order: their rows are the source indices.
TRAIN_BATCHES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
#: CIFAR-10 class ids of CIFAR-2 (paper, App. G): automobile (1) and horse (7).
CIFAR2_CLASSES: tuple[int, int] = (1, 7)
#: Images sampled per class for CIFAR-2 (of the 5000 per class in the train set).
CIFAR2_PER_CLASS = 2500
#: Seed of the torch.Generator that samples CIFAR-2.
CIFAR2_SEED = 0

_IMAGE_SHAPE = (3, 32, 32)
_ROW_SIZE = 3 * 32 * 32  # 3072 bytes per image: 1024 R, then 1024 G, then 1024 B (row-major)

# (module, name) pairs a CIFAR batch pickle may reference: numpy array reconstruction for numpy
# 1.x (numpy.core) and 2.x (numpy._core), pickle protocols 2-5, and the bytes codec of protocol
# 2 pickles written by Python 3.
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("codecs", "encode"),
    }
)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals in :data:`_ALLOWED_GLOBALS`."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"CIFAR batch references {module}.{name}, which a CIFAR-10 batch never needs; "
                "refusing to load it (is the file really from cifar-10-python.tar.gz?)."
            )
        return getattr(importlib.import_module(module), name)


def default_cache_dir() -> Path:
    """Where CIFAR-10 is downloaded when no ``data_dir`` is given."""
    return Path.home() / ".cache" / "diffusion-attribution" / "cifar10"


def _unavailable(reason: str) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f"CIFAR-10 is not available: {reason}. Either pass --data-dir PATH pointing at a "
        f"directory that contains {CIFAR_FOLDER}/ (the python version, "
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extracted), or enable network "
        f"download (download=True) so that torchvision fetches it into {default_cache_dir()}."
    )


def _find_batches(root: Path) -> Path | None:
    """``root/cifar-10-batches-py`` or ``root`` itself, whichever holds all five train batches."""
    for candidate in (root / CIFAR_FOLDER, root):
        if all((candidate / batch).is_file() for batch in TRAIN_BATCHES):
            return candidate
    return None


def _download(root: Path) -> None:
    """Download and extract cifar-10-python.tar.gz into ``root`` (md5-verified by torchvision)."""
    from torchvision.datasets import CIFAR10  # deferred: heavy, only to download
    from torchvision.datasets.utils import download_and_extract_archive  # deferred: as above

    root.mkdir(parents=True, exist_ok=True)
    download_and_extract_archive(
        CIFAR10.url, download_root=str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5
    )


def resolve_cifar10_dir(data_dir: str | Path | None = None, *, download: bool = True) -> Path:
    """The ``cifar-10-batches-py`` directory to read, downloading it if allowed and needed.

    Args:
        data_dir: A directory containing ``cifar-10-batches-py``, or that directory itself. When
            given, it is the only place looked at.
        download: When no ``data_dir`` is given and the default cache is empty, whether to
            download CIFAR-10 (about 170 MB) into :func:`default_cache_dir`.

    Raises:
        DatasetUnavailableError: The data are neither on disk nor downloadable.
    """
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        found = _find_batches(root)
        if found is None:
            raise _unavailable(
                f"--data-dir {root} holds neither {CIFAR_FOLDER}/data_batch_1..5 nor "
                "data_batch_1..5 itself"
            )
        return found
    cache = default_cache_dir()
    found = _find_batches(cache)
    if found is not None:
        return found
    if not download:
        raise _unavailable(f"no --data-dir was given, {cache} is empty and download is disabled")
    try:
        _download(cache)
    except Exception as exc:  # offline, DNS, proxy, md5 mismatch, torchvision missing, ...
        raise _unavailable(
            f"downloading into {cache} failed ({type(exc).__name__}: {exc})"
        ) from exc
    found = _find_batches(cache)
    if found is None:
        raise _unavailable(f"the download into {cache} did not produce {CIFAR_FOLDER}/")
    return found


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: ``([n, 3072] uint8 rows, [n] int64 labels)``."""
    with open(path, "rb") as f:
        entry = _BatchUnpickler(f, encoding="bytes").load()
    if not isinstance(entry, dict) or b"data" not in entry or b"labels" not in entry:
        raise ValueError(
            f"{path} is not a CIFAR-10 batch: expected a dict with b'data', b'labels'."
        )
    data = np.asarray(entry[b"data"])
    labels = np.asarray(entry[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW_SIZE:
        raise ValueError(
            f"{path}: b'data' must be uint8 [n, {_ROW_SIZE}], got {data.dtype} {data.shape}."
        )
    if labels.shape != (data.shape[0],):
        raise ValueError(
            f"{path}: {labels.shape[0] if labels.ndim else 0} labels for {data.shape[0]} images."
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels must be CIFAR-10 class ids 0..9.")
    return data, labels


def read_cifar10_train(batches_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The raw CIFAR-10 train set: ``data_batch_1..5`` concatenated in order.

    Returns:
        ``(rows [N, 3072] uint8, labels [N] int64)``; ``N = 50000`` for the real data set.
    """
    parts = [_read_batch(Path(batches_dir) / batch) for batch in TRAIN_BATCHES]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _to_dataset(
    name: str, rows: np.ndarray, labels: np.ndarray, indices: np.ndarray
) -> ImageDataset:
    """Rows ``[K, 3072]`` uint8 -> images ``[K, 3, 32, 32]`` float32 ``x / 127.5 - 1``."""
    images = torch.from_numpy(np.ascontiguousarray(rows)).to(torch.float32)  # [K, 3072]
    images = images.div_(127.5).sub_(1.0).reshape(-1, *_IMAGE_SHAPE)  # [K, 3, 32, 32]
    return ImageDataset(
        name=name,
        images=images,
        labels=torch.from_numpy(np.asarray(labels, dtype=np.int64)),
        indices=torch.from_numpy(np.asarray(indices, dtype=np.int64)),
    )


def load_cifar10(data_dir: str | Path | None = None, *, download: bool = True) -> ImageDataset:
    """The CIFAR-10 train set (50000 images; the test batch is not used).

    Returns:
        ImageDataset "cifar10": images ``[N, 3, 32, 32]`` float32 in ``[-1, 1]`` (pixel ``x``
        maps to ``x / 127.5 - 1``; channels R, G, B), labels ``[N]`` CIFAR-10 ids, indices
        ``[N]`` = ``0..N-1``, the row in the concatenated ``data_batch_1..5``.
    """
    rows, labels = read_cifar10_train(resolve_cifar10_dir(data_dir, download=download))
    return _to_dataset("cifar10", rows, labels, np.arange(rows.shape[0], dtype=np.int64))


def cifar2_indices(labels: np.ndarray, per_class: int = CIFAR2_PER_CLASS) -> np.ndarray:
    """Source indices of CIFAR-2: ``per_class`` images of each of :data:`CIFAR2_CLASSES`.

    For each class in order (1, then 7), ``min(per_class, available)`` of its train positions
    are drawn without replacement by ``torch.randperm`` from one ``torch.Generator`` seeded
    :data:`CIFAR2_SEED`. The paper's own draw is unpublished, so this is a fixed draw of the
    same protocol, not the paper's exact images. On a small copy of CIFAR-10 (tests) a class
    with fewer than ``per_class`` images is taken whole.

    Args:
        labels: ``[N]`` CIFAR-10 train labels.
        per_class: Images per class (2500 in the paper).

    Returns:
        ``[K]`` int64 positions in the train set, sorted ascending.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}.")
    labels = np.asarray(labels)
    generator = torch.Generator().manual_seed(CIFAR2_SEED)
    chosen = []
    for cls in CIFAR2_CLASSES:
        positions = np.flatnonzero(labels == cls)  # [n_cls], ascending
        k = min(per_class, positions.size)
        perm = torch.randperm(positions.size, generator=generator)[:k].numpy()
        chosen.append(positions[perm])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def load_cifar2(
    data_dir: str | Path | None = None,
    *,
    download: bool = True,
    per_class: int = CIFAR2_PER_CLASS,
) -> ImageDataset:
    """CIFAR-2: 2500 automobiles + 2500 horses from the CIFAR-10 train set (paper, App. G).

    See :func:`cifar2_indices` for the draw. Labels keep their CIFAR-10 ids (1 and 7).

    Args:
        data_dir: directory holding ``cifar-10-batches-py`` (or where to download it).
        download: download CIFAR-10 when it is not found (where the network allows).
        per_class: images per class.

    Returns:
        ImageDataset "cifar2": images ``[5000, 3, 32, 32]``, labels ``[5000]``, indices
        ``[5000]`` ascending positions in the 50000-image CIFAR-10 train set.
    """
    rows, labels = read_cifar10_train(resolve_cifar10_dir(data_dir, download=download))
    idx = cifar2_indices(labels, per_class)
    return _to_dataset("cifar2", rows[idx], labels[idx], idx)
