"""scikit-learn's bundled 8x8 handwritten digits: ``digits`` and its two-class subset ``digits2``.

The data ship inside scikit-learn (no download). ``import sklearn.datasets`` is absolute, so it
is not confused with this package, which is also named ``datasets``.
"""

from __future__ import annotations

import torch

from .base import ImageDataset

__all__ = ["DIGITS2_CLASSES", "load_digits", "load_digits2"]

#: The two classes of ``digits2``. 3 and 8 share most of their strokes (the right-hand arcs;
#: an 8 is a 3 with its left side closed), so at 8x8 they are a commonly confused pair and a
#: model must learn fine detail to tell them apart: the analogue of CIFAR-2's car/horse pair,
#: which is not trivially separable either. 183 threes + 174 eights = 357 images.
DIGITS2_CLASSES: tuple[int, int] = (3, 8)


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
