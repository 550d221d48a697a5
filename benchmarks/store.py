"""Content-addressed, atomically written artifacts with a verified JSON sidecar.

Contract (DESIGN.md, "Contract: artifacts and caching"):

- Every expensive result is stored under ``key = f"{kind}-{sha256(canonical_json(spec))[:16]}"``
  where ``spec`` holds everything that determines the result (setting fingerprint, subset
  indices, seed, ...). ``canonical_json`` sorts keys, drops whitespace, writes floats by ``repr``,
  lists for tuples, plain numbers for numpy/torch scalars, dicts for dataclasses and strings for
  paths; it refuses NaN/inf and unsupported types with a ``TypeError`` naming where they are
  (``benchmarks.io``).
- An entry is the directory ``root/<kind>/<key>/``: payload files plus the sidecar ``spec.json``
  (kind, key, format, spec, creation time, provenance, size and sha256 of every payload file).
- Writes are atomic: the entry is written into ``root/<kind>/.tmp-<key>-<uuid>/`` (files fsynced,
  sidecar last) and then renamed onto the final directory, so *an entry is complete iff its
  directory exists*. Two writers of one key both succeed: the loser of the rename discards its
  temporary directory. A killed writer leaves a ``.tmp-*`` directory that everything ignores and
  :meth:`ArtifactStore.cleanup_tmp` removes.
- Reuse is verified: loading compares the sidecar's spec with the requested one
  (:class:`CacheMismatchError`) and the payload's size and sha256 with the sidecar
  (:class:`CorruptArtifactError`). Nothing is ever deleted automatically.

Payload formats (``fmt``): ``"tensors"`` (dict of tensors -> ``tensors.safetensors``),
``"state_dict"`` (module state dict -> ``state_dict.safetensors``), ``"arrays"`` (dict of numpy
arrays -> one ``<name>.npy`` each, no pickling) and ``"json"`` (any JSON-able value ->
``payload.json``; NaN/inf kept as Python's json extensions so floats round-trip exactly).

Work directories: ``root/_work/<kind>/<key>/`` (:meth:`ArtifactStore.work_dir`) hold the files
of a library that writes its own (TRAK's save_dir); they are kept, never verified, and live
beside the entries (``_work`` is not a kind: kinds start with a letter or digit).

**The interface methods use.** ``methods/`` never imports ``benchmarks/``; the runner passes an
:class:`ArtifactStore` as ``MethodContext.cache`` and a method calls only what the Protocol
``methods.context.ArtifactCache`` lists: ``get_or_compute``, ``exists`` and ``work_dir``. Any
object with these methods and the same signatures will do.
"""

from __future__ import annotations

import builtins
import dataclasses
import errno
import io
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load as _safetensors_load
from safetensors.torch import save as _safetensors_save
from torch import nn

from benchmarks.io import (
    TMP_PREFIX,
    bytes_digest,
    canonical_json,
    fsync_dir,
    to_jsonable,
    write_new_file,
)
from benchmarks.provenance import collect_provenance

__all__ = [
    "FORMATS",
    "ArtifactEntry",
    "ArtifactNotFoundError",
    "ArtifactStore",
    "CacheMismatchError",
    "CorruptArtifactError",
    "spec_key",
]

FORMATS: tuple[str, ...] = ("tensors", "arrays", "json", "state_dict")
"""Payload formats an entry can hold."""

Format = Literal["tensors", "arrays", "json", "state_dict"]

SIDECAR_NAME = "spec.json"
STORE_VERSION = 1

_PAYLOAD_FILES = {
    "tensors": "tensors.safetensors",
    "state_dict": "state_dict.safetensors",
    "json": "payload.json",
}
_KIND_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_WORK_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
WORK_DIR = "_work"
_ARRAY_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class CacheMismatchError(RuntimeError):
    """An entry exists under the requested key but was stored for a different spec or format."""


class CorruptArtifactError(RuntimeError):
    """An entry's sidecar or payload is missing, truncated, or fails its checksum."""


class ArtifactNotFoundError(FileNotFoundError):
    """No entry exists for the requested (kind, spec)."""


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def _check_kind(kind: str) -> None:
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise ValueError(
            f"artifact kind must match {_KIND_RE.pattern} (letters, digits, '_' and '-', not "
            f"starting with '-' or '_'), got {kind!r}"
        )


def spec_key(kind: str, spec: Mapping[str, Any]) -> str:
    """``f"{kind}-{sha256(canonical_json(spec))[:16]}"``: the entry's key (and directory name)."""
    _check_kind(kind)
    digest = bytes_digest(canonical_json(spec).encode("ascii"))
    return f"{kind}-{digest[:16]}"


# --------------------------------------------------------------------------------------------
# Payload (de)serialisation
# --------------------------------------------------------------------------------------------


def _tensors_to_bytes(tensors: Mapping[str, torch.Tensor], what: str) -> bytes:
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{what} must be a mapping str -> torch.Tensor, got {type(tensors)}")
    prepared: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"{what} must map str -> torch.Tensor, got {name!r}: {type(tensor).__name__}"
            )
        t = tensor.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if t.numel() and (ptr in seen_storages or storage.nbytes() != t.nbytes):
            # safetensors refuses tensors that share memory; views of a larger buffer are copied.
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        if t.numel():
            seen_storages.add(ptr)
        prepared[name] = t
    return _safetensors_save(prepared)


def _arrays_to_files(arrays: Mapping[str, np.ndarray]) -> dict[str, bytes]:
    if not isinstance(arrays, Mapping):
        raise TypeError(f"arrays must be a mapping str -> numpy array, got {type(arrays)}")
    files: dict[str, bytes] = {}
    for name, array in arrays.items():
        if not isinstance(name, str) or not _ARRAY_NAME_RE.match(name):
            raise ValueError(
                f"array name {name!r} must match {_ARRAY_NAME_RE.pattern} (it becomes a file name)"
            )
        array = np.asarray(array)
        if array.dtype.hasobject:
            raise TypeError(f"array {name!r} has object dtype; only plain dtypes are stored")
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        files[f"{name}.npy"] = buf.getvalue()
    return files


def _json_to_bytes(payload: Any) -> bytes:
    return json.dumps(to_jsonable(payload, nonfinite="keep"), indent=1, allow_nan=True).encode()


@dataclasses.dataclass(frozen=True)
class ArtifactEntry:
    """One complete entry, as listed by :meth:`ArtifactStore.list`.

    Attributes:
        kind: the artifact kind (first directory level).
        key: ``f"{kind}-{hash16}"``, the entry's directory name.
        path: the entry's directory.
        format: one of :data:`FORMATS`.
        spec: the spec it was stored for (as JSON types).
        created: UTC ISO time of the write.
    """

    kind: str
    key: str
    path: Path
    format: str
    spec: Any
    created: str


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


class ArtifactStore:
    """Content-addressed artifacts under ``root`` (see the module docstring for the contract).

    Args:
        root: the cache directory (``--cache-dir``); created on the first write.
        provenance: JSON-able dict recorded in every sidecar. None collects it once, on the
            first write, with :func:`benchmarks.provenance.collect_provenance`.

    Thread- and process-safe for concurrent writers of the same or different keys (atomic
    renames; no locks); the store holds no open files between calls.
    """

    def __init__(self, root: str | Path, *, provenance: Mapping[str, Any] | None = None) -> None:
        self.root = Path(root).expanduser()
        self._provenance: dict[str, Any] | None = (
            to_jsonable(dict(provenance), nonfinite="null") if provenance is not None else None
        )

    def __repr__(self) -> str:
        return f"ArtifactStore({str(self.root)!r})"

    # ---- addressing ------------------------------------------------------------------------

    def key(self, kind: str, spec: Mapping[str, Any]) -> str:
        """The entry key ``f"{kind}-{sha256(canonical_json(spec))[:16]}"``."""
        return spec_key(kind, spec)

    def path(self, kind: str, spec: Mapping[str, Any]) -> Path:
        """The entry's directory ``root/<kind>/<key>`` (whether or not it exists)."""
        return self.root / kind / self.key(kind, spec)

    def exists(self, kind: str, spec: Mapping[str, Any]) -> bool:
        """True iff a complete entry for (kind, spec) exists.

        Raises:
            CacheMismatchError: the entry under this key was stored for a different spec.
            CorruptArtifactError: its sidecar is unreadable.
        """
        path = self.path(kind, spec)
        if not path.is_dir():
            return False
        self._verify_spec(path, self._read_sidecar(path), kind, spec)
        return True

    def work_dir(self, kind: str, key: str) -> Path:
        """The kept directory ``root/_work/<kind>/<key>`` (created if absent) of a library.

        For a library that writes its own files, e.g. TRAK's save_dir; ``key`` is derived by the
        caller from everything that determines the directory's contents (letters, digits, ``_``,
        ``-``).
        """
        _check_kind(kind)
        if not isinstance(key, str) or not _WORK_KEY_RE.match(key):
            raise ValueError(
                f"work directory key must match {_WORK_KEY_RE.pattern} (it becomes a directory "
                f"name), got {key!r}"
            )
        path = self.root / WORK_DIR / kind / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ---- generic ---------------------------------------------------------------------------

    def get_or_compute(
        self,
        kind: str,
        spec: Mapping[str, Any],
        compute_fn: Callable[[], Any],
        *,
        fmt: str,
    ) -> Any:
        """Return the stored payload for (kind, spec), computing and storing it first if absent.

        Args:
            kind: artifact kind, e.g. ``"base-model"``.
            spec: everything that determines the payload (see :func:`canonical_json`).
            compute_fn: called with no arguments only when the entry is absent; returns the
                payload in the form ``save_<fmt>`` accepts.
            fmt: one of :data:`FORMATS`.

        Returns:
            The payload as ``load_<fmt>`` returns it, *also right after computing it* (read back
            from the store), so callers see one type and the exact stored values whether or
            not the entry was cached, and concurrent writers all return the winning entry.
        """
        self._check_format(fmt)
        if not self.exists(kind, spec):
            payload = compute_fn()
            self._save(fmt, kind, spec, payload)
        return self._load(fmt, kind, spec)

    def load(self, kind: str, spec: Mapping[str, Any]) -> Any:
        """Load an entry in whatever format it was stored."""
        path = self._existing_path(kind, spec)
        sidecar = self._read_sidecar(path)
        self._verify_spec(path, sidecar, kind, spec)
        return self._load(sidecar["format"], kind, spec)

    # ---- formats ---------------------------------------------------------------------------

    def save_tensors(
        self, kind: str, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
    ) -> Path:
        """Store a dict of tensors (any dtype/device; saved from CPU) as safetensors.

        Args:
            kind: artifact kind.
            spec: everything that determines the payload (see :func:`canonical_json`).
            tensors: name -> tensor.

        Returns:
            The entry's directory (an entry already stored under the key is kept as it is).
        """
        data = _tensors_to_bytes(tensors, "tensors")
        files = {_PAYLOAD_FILES["tensors"]: data}
        return self._commit(kind, spec, "tensors", files, extra={"names": list(tensors)})

    def load_tensors(
        self, kind: str, spec: Mapping[str, Any], *, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """The stored tensors, bitwise equal to those saved and in the same order, on ``device``.

        Args:
            kind: artifact kind.
            spec: everything that determines the payload (see :func:`canonical_json`).
            device: where to put the tensors.

        Returns:
            Name -> tensor.
        """
        return self._load_safetensors("tensors", kind, spec, device)

    def save_state_dict(
        self,
        kind: str,
        spec: Mapping[str, Any],
        state_dict: nn.Module | Mapping[str, torch.Tensor],
    ) -> Path:
        """Store a module's state dict (pass the module or its ``state_dict()``) as safetensors.

        Args:
            kind: artifact kind.
            spec: everything that determines the payload (see :func:`canonical_json`).
            state_dict: the module, or its ``state_dict()``.

        Returns:
            The entry's directory (an entry already stored under the key is kept as it is).
        """
        if isinstance(state_dict, nn.Module):
            state_dict = state_dict.state_dict()
        data = _tensors_to_bytes(state_dict, "state_dict")
        files = {_PAYLOAD_FILES["state_dict"]: data}
        return self._commit(kind, spec, "state_dict", files, extra={"names": list(state_dict)})

    def load_state_dict(
        self,
        kind: str,
        spec: Mapping[str, Any],
        *,
        module: nn.Module | None = None,
        device: str | torch.device = "cpu",
    ) -> dict[str, torch.Tensor]:
        """The stored state dict; also loaded (strictly) into ``module`` when one is given.

        Args:
            kind: artifact kind.
            spec: everything that determines the payload (see :func:`canonical_json`).
            module: a module to load the state dict into, or None.
            device: where to put the tensors.

        Returns:
            Parameter/buffer name -> tensor.
        """
        state = self._load_safetensors("state_dict", kind, spec, device)
        if module is not None:
            module.load_state_dict(state, strict=True)
        return state

    def save_arrays(self, kind: str, spec: Mapping[str, Any], arrays: Mapping[str, Any]) -> Path:
        """Store a dict of numpy arrays, one ``<name>.npy`` each (no pickling).

        Args:
            kind: artifact kind.
            spec: everything that determines the payload (see :func:`canonical_json`).
            arrays: name (it becomes a file name) -> array (anything ``np.asarray`` takes; no
                object dtype).

        Returns:
            The entry's directory (an entry already stored under the key is kept as it is).
        """
        files = _arrays_to_files(arrays)
        return self._commit(kind, spec, "arrays", files, extra={"arrays": list(arrays)})

    def load_arrays(self, kind: str, spec: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The stored arrays, bitwise equal to what was saved, in the saved order."""
        path, sidecar = self._open(kind, spec, "arrays")
        names = sidecar.get("arrays")
        if not isinstance(names, builtins.list):
            raise self._corrupt(path, "sidecar lacks the list of arrays")
        out = {}
        for name in names:
            data = self._read_payload(path, sidecar, f"{name}.npy")
            try:
                out[name] = np.load(io.BytesIO(data), allow_pickle=False)
            except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
                raise self._corrupt(path / f"{name}.npy", f"cannot parse .npy: {e}") from e
        return out

    def save_json(self, kind: str, spec: Mapping[str, Any], payload: Any) -> Path:
        """Store a JSON-able payload (see :func:`to_jsonable`; NaN/inf are kept).

        Args:
            kind: artifact kind.
            spec: everything that determines the payload (see :func:`canonical_json`).
            payload: the JSON-able value.

        Returns:
            The entry's directory (an entry already stored under the key is kept as it is).
        """
        data = _json_to_bytes(payload)
        return self._commit(kind, spec, "json", {_PAYLOAD_FILES["json"]: data})

    def load_json(self, kind: str, spec: Mapping[str, Any]) -> Any:
        """The stored JSON payload (tuples come back as lists)."""
        path, sidecar = self._open(kind, spec, "json")
        name = _PAYLOAD_FILES["json"]
        data = self._read_payload(path, sidecar, name)
        try:
            return json.loads(data)
        except ValueError as e:
            raise self._corrupt(path / name, f"cannot parse JSON: {e}") from e

    # ---- maintenance -----------------------------------------------------------------------

    def delete(self, kind: str, spec: Mapping[str, Any]) -> bool:
        """Remove the entry for (kind, spec), whatever its sidecar says; False if there is none.

        The directory is first renamed to a ``.tmp-`` name, so readers never see half of it.
        """
        path = self.path(kind, spec)
        return self._delete_dir(path)

    def list(self, kind: str) -> builtins.list[ArtifactEntry]:
        """The complete entries of ``kind`` sorted by key (temporary directories are skipped)."""
        _check_kind(kind)
        kind_dir = self.root / kind
        if not kind_dir.is_dir():
            return []
        entries = []
        for path in sorted(kind_dir.iterdir()):
            if path.name.startswith(".") or not path.is_dir():
                continue
            sidecar = self._read_sidecar(path)
            entries.append(
                ArtifactEntry(
                    kind=kind,
                    key=path.name,
                    path=path,
                    format=sidecar["format"],
                    spec=sidecar["spec"],
                    created=str(sidecar.get("created", "")),
                )
            )
        return entries

    def kinds(self) -> builtins.list[str]:
        """The kinds that have a directory under ``root``, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _KIND_RE.match(p.name))

    def cleanup_tmp(self, *, min_age_s: float = 3600.0) -> int:
        """Remove temporary directories/files left by killed writers; returns how many.

        Args:
            min_age_s: only remove those not modified for this many seconds, so that a writer
                still running elsewhere (another process, a Ray worker on a shared filesystem)
                keeps its temporary directory. Pass 0 when nothing else writes to the store.
        """
        if min_age_s < 0:
            raise ValueError(f"min_age_s must be >= 0, got {min_age_s}")
        if not self.root.is_dir():
            return 0
        now = time.time()
        removed = 0
        for kind_dir in self.root.iterdir():
            if not kind_dir.is_dir():
                continue
            for path in kind_dir.iterdir():
                if not path.name.startswith(TMP_PREFIX):
                    continue
                try:
                    if now - path.stat().st_mtime < min_age_s:
                        continue
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
                    removed += 1
                except FileNotFoundError:
                    continue
        return removed

    # ---- internals -------------------------------------------------------------------------

    @staticmethod
    def _check_format(fmt: str) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown artifact format {fmt!r}; use one of {FORMATS}")

    def _save(self, fmt: str, kind: str, spec: Mapping[str, Any], payload: Any) -> Path:
        savers = {
            "tensors": self.save_tensors,
            "arrays": self.save_arrays,
            "json": self.save_json,
            "state_dict": self.save_state_dict,
        }
        return savers[fmt](kind, spec, payload)

    def _load(self, fmt: str, kind: str, spec: Mapping[str, Any]) -> Any:
        loaders = {
            "tensors": self.load_tensors,
            "arrays": self.load_arrays,
            "json": self.load_json,
            "state_dict": self.load_state_dict,
        }
        return loaders[fmt](kind, spec)

    def _get_provenance(self) -> dict[str, Any]:
        if self._provenance is None:
            self._provenance = to_jsonable(collect_provenance(), nonfinite="null")
        return self._provenance

    def _commit(
        self,
        kind: str,
        spec: Mapping[str, Any],
        fmt: str,
        files: Mapping[str, bytes],
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write ``files`` and the sidecar into a temporary directory, then rename it into place."""
        key = self.key(kind, spec)
        kind_dir = self.root / kind
        final = kind_dir / key
        if final.is_dir():
            self._verify_existing(final, kind, spec, fmt)
            return final
        sidecar = {
            "store_version": STORE_VERSION,
            "kind": kind,
            "key": key,
            "format": fmt,
            "spec": to_jsonable(spec, nonfinite="error"),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "provenance": self._get_provenance(),
            "files": {},
            **(extra or {}),
        }
        kind_dir.mkdir(parents=True, exist_ok=True)
        tmp = kind_dir / f"{TMP_PREFIX}{key}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for name, data in files.items():
                write_new_file(tmp / name, data)
                sidecar["files"][name] = {
                    "bytes": len(data),
                    "sha256": bytes_digest(data),
                }
            # The sidecar goes last: a directory holding it holds everything.
            write_new_file(tmp / SIDECAR_NAME, json.dumps(sidecar, indent=1).encode())
            fsync_dir(tmp)
            try:
                os.rename(tmp, final)
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY) or final.is_dir():
                    # Another writer finished the same key first: keep theirs, verify it.
                    shutil.rmtree(tmp, ignore_errors=True)
                    self._verify_existing(final, kind, spec, fmt)
                    return final
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(kind_dir)
        return final

    def _verify_existing(self, path: Path, kind: str, spec: Mapping[str, Any], fmt: str) -> None:
        sidecar = self._read_sidecar(path)
        self._verify_spec(path, sidecar, kind, spec)
        self._verify_format(path, sidecar, fmt)

    def _existing_path(self, kind: str, spec: Mapping[str, Any]) -> Path:
        path = self.path(kind, spec)
        if not path.is_dir():
            raise ArtifactNotFoundError(
                f"no {kind!r} artifact for this spec at {path}; compute it first "
                "(e.g. with get_or_compute) or check --cache-dir."
            )
        return path

    def _open(self, kind: str, spec: Mapping[str, Any], fmt: str) -> tuple[Path, dict[str, Any]]:
        path = self._existing_path(kind, spec)
        sidecar = self._read_sidecar(path)
        self._verify_spec(path, sidecar, kind, spec)
        self._verify_format(path, sidecar, fmt)
        return path, sidecar

    def _load_safetensors(
        self, fmt: str, kind: str, spec: Mapping[str, Any], device: str | torch.device
    ) -> dict[str, torch.Tensor]:
        path, sidecar = self._open(kind, spec, fmt)
        name = _PAYLOAD_FILES[fmt]
        data = self._read_payload(path, sidecar, name)
        try:
            tensors = _safetensors_load(data)
        except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
            raise self._corrupt(path / name, f"cannot parse safetensors: {e}") from e
        # safetensors returns tensors in no fixed order: restore the saved one.
        names = sidecar.get("names")
        if not isinstance(names, builtins.list) or sorted(names) != sorted(tensors):
            raise self._corrupt(path / name, "its tensor names differ from the sidecar's list")
        return {k: tensors[k].to(device) for k in names}

    def _read_sidecar(self, path: Path) -> dict[str, Any]:
        sidecar_path = path / SIDECAR_NAME
        try:
            sidecar = json.loads(sidecar_path.read_bytes())
        except (OSError, ValueError) as e:
            raise self._corrupt(
                path, f"sidecar {SIDECAR_NAME} is missing or unreadable: {e}"
            ) from e
        required = ("kind", "key", "format", "spec", "files")
        if not isinstance(sidecar, dict) or any(k not in sidecar for k in required):
            raise self._corrupt(path, f"sidecar {SIDECAR_NAME} lacks one of {required}")
        return sidecar

    def _read_payload(self, path: Path, sidecar: Mapping[str, Any], name: str) -> bytes:
        record = sidecar["files"].get(name)
        if not isinstance(record, dict):
            raise self._corrupt(path, f"sidecar does not list payload file {name!r}")
        try:
            data = (path / name).read_bytes()
        except OSError as e:
            raise self._corrupt(path / name, f"cannot read payload file: {e}") from e
        if len(data) != record.get("bytes"):
            raise self._corrupt(
                path / name, f"size {len(data)} bytes, the sidecar says {record.get('bytes')}"
            )
        if bytes_digest(data) != record.get("sha256"):
            raise self._corrupt(path / name, "sha256 differs from the sidecar's")
        return data

    def _verify_spec(
        self, path: Path, sidecar: Mapping[str, Any], kind: str, spec: Mapping[str, Any]
    ) -> None:
        requested = canonical_json(spec)
        try:
            stored = canonical_json(sidecar["spec"])
        except TypeError as e:
            raise self._corrupt(path, f"sidecar spec is not canonical JSON: {e}") from e
        if sidecar["kind"] == kind and stored == requested:
            return
        diffs = _diff_paths(sidecar["spec"], json.loads(requested))
        shown = ", ".join(diffs[:10]) + (" ..." if len(diffs) > 10 else "")
        raise CacheMismatchError(
            f"the cached artifact at {path} was stored for a different spec than requested "
            f"(stored kind {sidecar['kind']!r}, requested {kind!r}; differing fields: "
            f"{shown or 'none'}). Delete the entry (rm -r '{path}') or use a fresh --cache-dir; "
            "nothing was deleted."
        )

    def _verify_format(self, path: Path, sidecar: Mapping[str, Any], fmt: str) -> None:
        if sidecar["format"] != fmt:
            raise CacheMismatchError(
                f"the cached artifact at {path} holds format {sidecar['format']!r}, but "
                f"{fmt!r} was requested (the same kind and spec must always use one format). "
                f"Delete the entry (rm -r '{path}') or use a fresh --cache-dir; nothing was "
                "deleted."
            )

    @staticmethod
    def _corrupt(path: Path, problem: str) -> CorruptArtifactError:
        return CorruptArtifactError(
            f"cached artifact {path} is corrupt: {problem}. Fix: delete the entry directory "
            "(rm -r it, or ArtifactStore.delete(kind, spec)) and rerun to recompute it."
        )

    def _delete_dir(self, path: Path) -> bool:
        if not path.is_dir():
            return False
        trash = path.with_name(f"{TMP_PREFIX}del-{path.name}-{uuid.uuid4().hex}")
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        fsync_dir(path.parent)
        return True


def _diff_paths(a: Any, b: Any, where: str = "spec") -> builtins.list[str]:
    """Paths at which two JSON values differ (for error messages)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{where}[{k!r}]")
            else:
                out.extend(_diff_paths(a[k], b[k], f"{where}[{k!r}]"))
        return out
    if isinstance(a, builtins.list) and isinstance(b, builtins.list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            out.extend(_diff_paths(x, y, f"{where}[{i}]"))
        return out
    same = json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    return [] if same else [where]
