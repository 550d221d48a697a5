"""Data augmentation on image batches."""

from __future__ import annotations

import torch

__all__ = ["random_hflip"]


def random_hflip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image left-right with probability 1/2.

    Exactly ``N`` uniforms are drawn from ``generator`` (on the generator's device) whatever the
    outcome, so a seeded generator gives the same flips every time and its state advances by
    the same amount on every call.

    Args:
        images: ``[N, C, H, W]`` batch (any dtype/device).
        generator: Source of the coin flips.

    Returns:
        ``[N, C, H, W]`` new tensor: image ``i`` is ``images[i].flip(-1)`` where its coin came up
        heads, else a copy of ``images[i]``.
    """
    if images.ndim != 4:
        raise ValueError(f"random_hflip expects images [N, C, H, W], got {tuple(images.shape)}.")
    n = images.shape[0]
    flip = torch.rand(n, generator=generator, device=generator.device) < 0.5  # [N] bool
    flip = flip.to(images.device).view(n, 1, 1, 1)
    return torch.where(flip, images.flip(-1), images)
