"""scikit-learn's bundled 8x8 handwritten digits and the data sets made of them.

``digits`` (all of them), its two-class subset ``digits2``, and ``digits2-translated`` (each
``digits2`` image at a random place on a 16x16 canvas). The data ship inside scikit-learn (no download). ``import sklearn.datasets`` is absolute, so it
is not confused with this package, which is also named ``datasets``.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import ImageDataset
from .transforms import paste_on_canvas

__all__ = [
    "DIGITS2_CLASSES",
    "DIGITS_BACKGROUND",
    "TRANSLATED_CANVAS_SIZE",
    "TRANSLATION_SEED",
    "digits2_translation_offsets",
    "load_digits",
    "load_digits2",
    "load_digits2_translated",
]

#: The two classes of ``digits2``. 3 and 8 share most of their strokes (the right-hand arcs;
#: an 8 is a 3 with its left side closed), so at 8x8 they are a commonly confused pair and a
#: model must learn fine detail to tell them apart: the analogue of CIFAR-2's car/horse pair,
#: which is not trivially separable either. 183 threes + 174 eights = 357 images.
DIGITS2_CLASSES: tuple[int, int] = (3, 8)

#: Value of a blank pixel after :func:`load_digits`' scaling (pixel 0 -> ``0 / 8 - 1``).
DIGITS_BACKGROUND: float = -1.0

#: Side of the canvas of ``digits2-translated``: 16, so an 8x8 digit has 9 x 9 placements.
TRANSLATED_CANVAS_SIZE: int = 16

#: Seed of the offsets of ``digits2-translated``. A constant of the data set, not of a run: the
#: data set is the same whatever a benchmark's seed, so its images and indices are stable.
TRANSLATION_SEED: int = 20_160_808


def load_digits() -> ImageDataset:
    """All 1797 of scikit-learn's 8x8 digits.

    Pixel values 0..16 are mapped to ``x / 8 - 1`` in ``[-1, 1]``.

    Returns:
        ImageDataset "digits": images ``[1797, 1, 8, 8]`` float32, labels ``[1797]`` (0..9),
        indices ``[1797]`` = row numbers in ``sklearn.datasets.load_digits().data``.
    """
    from sklearn.datasets import load_digits as _sk_load_digits  # deferred: heavy import

    bunch = _sk_load_digits()
    data = torch.as_tensor(bunch.data, dtype=torch.float64)  # [1797, 64], values 0..16
    images = (data / 8.0 - 1.0).to(torch.float32).reshape(-1, 1, 8, 8)  # [1797, 1, 8, 8]
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)  # [1797]
    indices = torch.arange(images.shape[0], dtype=torch.int64)  # [1797]
    return ImageDataset(name="digits", images=images, labels=labels, indices=indices)


def load_digits2() -> ImageDataset:
    """The digits of classes :data:`DIGITS2_CLASSES` (3 and 8): the CIFAR-2 analogue.

    Unlike cifar2 (which samples 2500 of 5000 images per class) every image of the two classes
    is kept: the digits set is already small.

    Returns:
        ImageDataset "digits2": images ``[357, 1, 8, 8]``, labels in {3, 8} (original digit
        ids), indices = ascending row numbers in scikit-learn's digits array.
    """
    full = load_digits()
    mask = torch.isin(full.labels, torch.tensor(DIGITS2_CLASSES, dtype=torch.int64))  # [1797]
    sub = full.subset(mask)
    return ImageDataset(name="digits2", images=sub.images, labels=sub.labels, indices=sub.indices)


def digits2_translation_offsets() -> torch.Tensor:
    """The canvas offsets of ``digits2-translated``, drawn from :data:`TRANSLATION_SEED`.

    Row and column of each image are independent and uniform on ``{0, ..., 8}``
    (``TRANSLATED_CANVAS_SIZE - 8``), drawn by numpy's PCG64 generator seeded with
    :data:`TRANSLATION_SEED`: the same on every call, machine and run.

    Returns:
        ``[357, 2]`` int64: ``(row, column)`` of the top-left corner of ``digits2`` image ``i``.
    """
    n_images = 183 + 174  # the 3s and 8s of scikit-learn's digits (see DIGITS2_CLASSES)
    high = TRANSLATED_CANVAS_SIZE - 8
    rng = np.random.default_rng(TRANSLATION_SEED)
    offsets = rng.integers(0, high, size=(n_images, 2), endpoint=True)  # [357, 2]
    return torch.as_tensor(offsets, dtype=torch.int64)


def load_digits2_translated() -> ImageDataset:
    """``digits2`` with each digit pasted at its own random place on a 16x16 blank canvas.

    Image ``i`` is ``digits2`` image ``i`` (same label, same index into scikit-learn's digits)
    with its top-left corner at ``digits2_translation_offsets()[i]``; the other pixels are
    :data:`DIGITS_BACKGROUND`. The offsets are data, fixed by :data:`TRANSLATION_SEED`, never
    by a run's seed. Purpose: pixel distances between two digits placed differently are large
    although the digits may be alike (as between photographs of one object framed
    differently), while a convolutional model shares what it learns across positions; this
    separates attribution from pixel similarity (the ``translate`` benchmark preset).

    Returns:
        ImageDataset "digits2-translated": images ``[357, 1, 16, 16]``, labels in {3, 8},
        indices = those of ``digits2``.
    """
    base = load_digits2()
    offsets = digits2_translation_offsets()  # [357, 2]
    if offsets.shape[0] != len(base):
        raise RuntimeError(f"digits2 has {len(base)} images, expected {offsets.shape[0]}")
    images = paste_on_canvas(base.images, offsets, TRANSLATED_CANVAS_SIZE, DIGITS_BACKGROUND)
    return ImageDataset(
        name="digits2-translated", images=images, labels=base.labels, indices=base.indices
    )
