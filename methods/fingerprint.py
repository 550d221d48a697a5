"""The one tensor fingerprint of methods' cache keys (methods never import ``benchmarks``)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch

__all__ = ["tensor_fingerprint"]


def tensor_fingerprint(
    tensors: Mapping[str, torch.Tensor] | Iterable[torch.Tensor] | torch.Tensor,
    *,
    named: bool,
) -> str:
    """sha256 hex digest of tensors' bytes, each preceded by a header of its shape and dtype.

    Cache keys hold it, so it must change whenever a model or a data set does, and its value
    for given tensors must never change (a changed value recomputes every cached entry). The
    two header styles are those of the two keys that existed before this function:

    - ``named=True`` (TRAK's keys): header ``f"{name}|{shape}|{dtype}|"`` per tensor, the names
      of a mapping, or ``""`` for one bare tensor;
    - ``named=False`` (K-FAC's keys): header ``str((shape, str(dtype)))`` per tensor of a
      sequence (or of one bare tensor); names are not hashed.

    Args:
        tensors: one tensor, a sequence of tensors, or (``named=True``) a mapping name -> tensor.
        named: the header style, see above.

    Returns:
        64 hex characters.
    """
    if isinstance(tensors, torch.Tensor):
        items: Iterable[tuple[str, torch.Tensor]] = [("", tensors)]
    elif isinstance(tensors, Mapping):
        if not named:
            raise TypeError("a mapping of tensors needs named=True (its names are hashed)")
        items = tensors.items()
    else:
        items = (("", t) for t in tensors)
    digest = hashlib.sha256()
    for name, tensor in items:
        t = tensor.detach().to("cpu").contiguous()
        if named:
            header = f"{name}|{tuple(t.shape)}|{t.dtype}|"
        else:
            header = str((tuple(t.shape), str(t.dtype)))
        digest.update(header.encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
