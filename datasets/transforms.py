"""Data augmentation on image batches."""

from __future__ import annotations

import torch

__all__ = ["paste_on_canvas", "random_hflip"]


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


def paste_on_canvas(
    images: torch.Tensor, offsets: torch.Tensor, canvas_size: int, background: float
) -> torch.Tensor:
    """Paste each image onto a larger square canvas at its own offset.

    Args:
        images: ``[N, C, h, w]`` batch.
        offsets: ``[N, 2]`` integer (row, column) of each image's top-left corner on the canvas,
            each in ``[0, canvas_size - h]`` (rows) and ``[0, canvas_size - w]`` (columns).
        canvas_size: side S of the square canvas, >= h and >= w.
        background: value of every canvas pixel no image covers.

    Returns:
        ``[N, C, S, S]`` new tensor (``images``' dtype and device): ``out[i, :, r:r + h, c:c + w]
        == images[i]`` with ``(r, c) = offsets[i]``, ``background`` elsewhere.
    """
    if images.ndim != 4:
        raise ValueError(f"paste_on_canvas expects images [N, C, h, w], got {tuple(images.shape)}.")
    n, channels, height, width = images.shape
    if offsets.shape != (n, 2) or offsets.is_floating_point():
        raise ValueError(
            f"offsets must be an integer tensor [N, 2] = [{n}, 2], got shape "
            f"{tuple(offsets.shape)} dtype {offsets.dtype}."
        )
    if canvas_size < max(height, width):
        raise ValueError(f"canvas_size={canvas_size} is smaller than the {height}x{width} images.")
    rows, cols = offsets[:, 0], offsets[:, 1]  # [N], [N]
    if n and (
        rows.min() < 0
        or cols.min() < 0
        or rows.max() > canvas_size - height
        or cols.max() > canvas_size - width
    ):
        raise ValueError(
            f"offsets must keep every {height}x{width} image inside the {canvas_size}x"
            f"{canvas_size} canvas: rows in [0, {canvas_size - height}], columns in "
            f"[0, {canvas_size - width}]."
        )
    canvas = images.new_full((n, channels, canvas_size, canvas_size), background)
    for i, (row, col) in enumerate(offsets.tolist()):
        canvas[i, :, row : row + height, col : col + width] = images[i]
    return canvas
