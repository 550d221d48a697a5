"""The harness's one copy of each small I/O helper.

JSON conversion, durable and atomic file writes, and byte digests:

- :func:`to_jsonable` / :func:`canonical_json`: plain JSON types from configs, numpy/torch values,
  dataclasses and paths; the canonical text is what artifact keys hash (``benchmarks.store``).
- :func:`atomic_write_bytes` / :func:`atomic_write_text`: a temporary sibling, fsync, then
  ``os.replace`` and an fsync of the directory: readers see the old file or the complete new one.
- :func:`write_new_file` / :func:`fsync_dir`: the durable steps the store builds its entries from.
- :func:`bytes_digest`: the sha256 of a payload (store checksums, position digests).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import uuid
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "TMP_PREFIX",
    "atomic_write_bytes",
    "atomic_write_text",
    "bytes_digest",
    "canonical_json",
    "fsync_dir",
    "to_jsonable",
    "write_new_file",
]

TMP_PREFIX = ".tmp-"
"""Name prefix of temporary files and directories; every reader ignores them."""


# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------


def to_jsonable(obj: Any, *, nonfinite: Literal["error", "null", "keep"] = "error") -> Any:
    """Convert ``obj`` to plain JSON types (dict with str keys, list, str, int, float, bool, None).

    Converts tuples to lists, numpy/torch scalars to Python numbers, numpy arrays and torch
    tensors to nested lists, dataclass instances to dicts of their fields, and paths to POSIX
    strings.

    Args:
        obj: the value to convert.
        nonfinite: what to do with NaN/inf floats: ``"error"`` raises ``TypeError`` (specs: they
            must hash stably), ``"null"`` writes ``None`` (result files for strict JSON readers),
            ``"keep"`` keeps them (Python's json writes ``NaN``/``Infinity``).

    Raises:
        TypeError: for unsupported types, non-str dict keys, object arrays, and NaN/inf with
            ``nonfinite="error"``; the message names where in ``obj`` the value sits.
    """
    if nonfinite not in ("error", "null", "keep"):
        raise ValueError(f"nonfinite must be 'error', 'null' or 'keep', got {nonfinite!r}")
    return _convert(obj, nonfinite, "spec")


def _convert(obj: Any, nonfinite: str, where: str) -> Any:
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        value = float(obj)
        if not math.isfinite(value):
            if nonfinite == "error":
                raise TypeError(
                    f"{where} is {value!r}: NaN/inf cannot be part of an artifact spec (its hash "
                    "must be stable); replace it with a finite number or None."
                )
            if nonfinite == "null":
                return None
        return value
    if isinstance(obj, np.generic):
        if isinstance(obj, np.complexfloating | np.datetime64 | np.timedelta64 | np.void):
            raise TypeError(f"{where} has unsupported numpy type {type(obj).__name__}")
        return _convert(obj.item(), nonfinite, where)
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(
                f"{where} is a numpy array of dtype {obj.dtype}; only bool/int/float arrays can "
                "be converted to JSON."
            )
        return _convert(obj.tolist(), nonfinite, where)
    if isinstance(obj, torch.Tensor):
        if obj.is_complex():
            raise TypeError(f"{where} is a complex tensor; it cannot be converted to JSON.")
        return _convert(obj.detach().cpu().tolist(), nonfinite, where)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: _convert(getattr(obj, f.name), nonfinite, f"{where}.{f.name}")
            for f in dataclasses.fields(obj)
        }
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(
                    f"{where} has a dict key {k!r} of type {type(k).__name__}; keys must be str "
                    "(JSON would silently turn 1 and '1' into the same key)."
                )
            out[k] = _convert(v, nonfinite, f"{where}[{k!r}]")
        return out
    if isinstance(obj, list | tuple):
        return [_convert(v, nonfinite, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, PurePath):
        return obj.as_posix()
    raise TypeError(
        f"{where} has unsupported type {type(obj).__module__}.{type(obj).__qualname__}; use "
        "str/int/float/bool/None, lists, str-keyed dicts, dataclasses, paths, numpy or torch "
        "numbers/arrays (convert e.g. a torch.dtype with str())."
    )


def canonical_json(spec: Any) -> str:
    """The canonical JSON text of ``spec``: sorted keys, no whitespace, ASCII, floats by repr.

    Raises:
        TypeError: see :func:`to_jsonable` (NaN/inf and unsupported types are refused).
    """
    return json.dumps(
        to_jsonable(spec, nonfinite="error"),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=False,
    )


# --------------------------------------------------------------------------------------------
# Durable file writes
# --------------------------------------------------------------------------------------------


def write_new_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file at ``path`` and fsync it."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (renames, new files); a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write a single file atomically: a temporary sibling, fsync, then ``os.replace``.

    Readers see either the old file or the complete new one, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex}")
    try:
        write_new_file(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def bytes_digest(data: bytes) -> str:
    """The sha256 hex digest (64 characters) of ``data``."""
    return hashlib.sha256(data).hexdigest()
