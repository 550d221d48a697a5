"""Ground-truth bundles: the LDS's ground truth as a small, checksummed data set.

The LDS needs the retrained models' *measurements*, not the models. A bundle is one folder::

    <bundle>/manifest.json                 format, preset, Setting (and its fingerprint),
                                           targets, store keys, provenance, one record per file
    <bundle>/base_model.safetensors        the base model's state dict
    <bundle>/queries.images.npy            # [Q, C, H, W] the queries
    <bundle>/queries_trajectories.*.npy    the queries with their trajectories (only when a
                                           target needs them: trajectory-logprob)
    <bundle>/subset_masks.npy              # [M, N] bool, True = kept
    <bundle>/measurements.<target>.npy     # [K, M, Q] float64, model (subset m, seed k)
    <bundle>/oracle.<target>.npy           # [M, Q] float64, the exact-retraining oracle
    <bundle>/oracle_cost.<target>.npy      # [2] its seconds and peak MB when computed

Every file carries its size and sha256 in the manifest and is verified on import, before
anything is written; the manifest also holds the store key of every entry the bundle stands
for, computed by the spec builders of the code that made it (``pipeline.base_model_spec``,
``pipeline.queries_spec``, ``groundtruth.measurement_spec``,
``runner.subset_predictions_spec``). Importing recomputes them with this code: a bundle made for
another Setting, or by code whose keys differ, is refused (never silently mixed). Import writes
the store entries an LDS run reads (through the store API, never overwriting: an entry already
stored must hold the same bytes), so ``benchmarks.lds`` then runs without retraining anything.
Export writes into a temporary folder renamed into place (atomic) and never overwrites a bundle.

The command: ``python -m benchmarks.groundtruth --preset quick [--target ...] [--export DIR]``
computes (or resumes) the ground truth and the oracle, then exports them;
``python -m benchmarks.groundtruth --preset quick --import DIR`` imports a bundle into
``--cache-dir``. The repository ships the quick preset's bundle in
``results/groundtruth/quick/`` (:func:`shipped_bundle`), which ``./harness lds`` imports.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from benchmarks.cli import (
    RunOptions,
    UsageError,
    add_preset_argument,
    add_run_arguments,
    run_option_values,
    usage_errors,
)
from benchmarks.groundtruth import (
    DEFAULT_ENSEMBLE_SIZE,
    ground_truth_measurement_specs,
    ground_truth_trainer,
    load_ground_truth_values,
    subset_masks,
)
from benchmarks.io import (
    TMP_PREFIX,
    bytes_digest,
    canonical_json,
    fsync_dir,
    to_jsonable,
    write_new_file,
)
from benchmarks.pipeline import base_model_spec, needs_trajectories, queries_spec
from benchmarks.provenance import StageLog, collect_provenance
from benchmarks.runner import (
    SUBSET_PREDICTIONS_KIND,
    build_method,
    prepare_experiment,
    prepare_run,
    run_method,
    subset_predictions_spec,
)
from benchmarks.settings import Setting
from benchmarks.store import ArtifactStore

__all__ = [
    "BUNDLE_FORMAT",
    "BundleInfo",
    "bundle_fingerprint",
    "export_bundle",
    "import_bundle",
    "main",
    "shipped_bundle",
    "verify_bundle",
]

BUNDLE_FORMAT = 1
"""Version of the bundle layout; a bundle of another version is refused."""

MANIFEST = "manifest.json"
ORACLE = "retrain"
"""The registry name of the exact-retraining oracle whose predictions a bundle carries."""

SHIPPED_BUNDLES = Path(__file__).resolve().parents[1] / "results" / "groundtruth"
"""Where the repository's bundles live, one folder per preset (``results/groundtruth/quick``)."""

DEFAULT_TARGETS = ("loss", "elbo")

_FIX = (
    "re-export the bundle (python -m benchmarks.groundtruth --preset PRESET --export DIR) or "
    "recompute the ground truth (python -m benchmarks.groundtruth --preset PRESET, or "
    "./harness lds --recompute-ground-truth)"
)


@dataclass(frozen=True)
class BundleInfo:
    """What a verified (or imported) bundle holds.

    Attributes:
        path: the bundle folder.
        preset: the preset it was made for.
        targets: its measurement names.
        provenance: commit, package versions, device and seconds of the run that made it.
        written: store entries the import wrote (0 for :func:`verify_bundle`).
        kept: store entries the import found already stored with the same bytes.
    """

    path: Path
    preset: str
    targets: tuple[str, ...]
    provenance: dict[str, Any]
    written: int = 0
    kept: int = 0

    @property
    def commit(self) -> str:
        """The git commit of the code that made the bundle (``unknown`` if not recorded)."""
        return str(self.provenance.get("git_commit") or "unknown")


def bundle_fingerprint(setting: Setting) -> dict[str, Any]:
    """What a bundle must match: the ``ground_truth`` part of ``Setting.fingerprint``."""
    return setting.fingerprint("ground_truth")


def shipped_bundle(preset: str) -> Path | None:
    """The repository's bundle of ``preset`` (``results/groundtruth/<preset>``), or None."""
    path = SHIPPED_BUNDLES / preset
    return path if (path / MANIFEST).is_file() else None


# ---------------------------------------------------------------- what a bundle stands for


@dataclass(frozen=True)
class _Plan:
    """The store entries of a bundle for one setting, by the spec builders of this code."""

    setting: Setting
    targets: tuple[str, ...]
    masks: np.ndarray  # [M, N] bool
    trainer: str
    oracle_config: dict[str, Any]

    @property
    def with_trajectories(self) -> bool:
        return needs_trajectories(self.targets)

    def base_model(self) -> dict:
        return base_model_spec(self.setting)

    def queries(self, with_trajectories: bool) -> dict:
        return queries_spec(self.setting, with_trajectories)

    def measurements(self, store: ArtifactStore) -> dict[tuple[int, int, str], dict]:
        return ground_truth_measurement_specs(
            store, self.setting, self.masks, self.targets, self.trainer
        )

    def oracle(self, target: str) -> dict:
        return subset_predictions_spec(
            self.setting,
            ORACLE,
            self.oracle_config,
            measurement=target,
            target=target,
            masks=self.masks,
            with_trajectories=self.with_trajectories,
        )

    def keys(self, store: ArtifactStore) -> dict[str, Any]:
        """Entry name -> store key (measurements: ``[K][M]`` keys per target)."""
        keys: dict[str, Any] = {
            "base_model": store.key("base-model", self.base_model()),
            "queries": store.key("queries", self.queries(False)),
        }
        if self.with_trajectories:
            keys["queries_trajectories"] = store.key("queries", self.queries(True))
        specs = self.measurements(store)
        s = self.setting
        for target in self.targets:
            keys[f"measurements.{target}"] = [
                [store.key("measurement", specs[(m, k, target)]) for m in range(s.n_subsets)]
                for k in range(s.n_seeds)
            ]
            keys[f"oracle.{target}"] = store.key(SUBSET_PREDICTIONS_KIND, self.oracle(target))
        return keys


def _plan(setting: Setting, targets: Sequence[str], masks: np.ndarray) -> _Plan:
    oracle = build_method(ORACLE, dict(setting.method_options))  # as an LDS run builds it
    return _Plan(
        setting,
        tuple(targets),
        masks,
        ground_truth_trainer(setting, DEFAULT_ENSEMBLE_SIZE),  # the LDS run's trainer
        asdict(oracle.config),
    )


# ---------------------------------------------------------------- export


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _bundle_files(store: ArtifactStore, plan: _Plan) -> dict[str, tuple[str, bytes, dict]]:
    """Array name -> (file name, bytes, extra manifest fields), read through the store API."""
    state = store.load_state_dict("base-model", plan.base_model())
    files = {
        "base_model": (
            "base_model.safetensors",
            safetensors_save({k: v.contiguous() for k, v in state.items()}),
            {"tensors": list(state)},
        )
    }
    arrays: dict[str, np.ndarray] = {}
    arrays["queries.images"] = store.load_tensors("queries", plan.queries(False))["images"].numpy()
    if plan.with_trajectories:
        tensors = store.load_tensors("queries", plan.queries(True))
        for name, tensor in tensors.items():
            arrays[f"queries_trajectories.{name}"] = tensor.numpy()
    arrays["subset_masks"] = plan.masks
    values = load_ground_truth_values(store, plan.setting, plan.measurements(store))
    for target in plan.targets:
        arrays[f"measurements.{target}"] = values[target]
        oracle = store.load_arrays(SUBSET_PREDICTIONS_KIND, plan.oracle(target))
        arrays[f"oracle.{target}"] = oracle["predictions"]
        arrays[f"oracle_cost.{target}"] = oracle["cost"]
    for name, array in arrays.items():
        files[name] = (f"{name}.npy", _npy_bytes(array), {"shape": list(array.shape)})
        files[name][2]["dtype"] = str(array.dtype)
    return files


def export_bundle(
    store: ArtifactStore,
    setting: Setting,
    targets: Sequence[str],
    path: str | Path,
    *,
    n_train: int,
    provenance: Mapping[str, Any] | None = None,
) -> BundleInfo:
    """Write the ground truth of ``setting`` stored in ``store`` as a bundle folder ``path``.

    Written into a temporary folder beside ``path``, then renamed into place (atomic); an
    existing ``path`` is never overwritten.

    Args:
        store: the artifact store holding the base model, the queries, every measurement of
            ``targets`` and the oracle's predictions (``python -m benchmarks.groundtruth``).
        setting: the benchmark setting.
        targets: measurement names the bundle carries.
        path: the bundle folder to create.
        n_train: the training set size (the masks' width).
        provenance: recorded in the manifest; None: :func:`collect_provenance`.

    Returns:
        What the bundle holds.

    Raises:
        UsageError: ``path`` exists, or the store lacks part of the ground truth.
    """
    path = Path(path)
    if path.exists():
        raise UsageError(f"--export {path}: it exists; nothing was overwritten. Remove it first")
    plan = _plan(setting, targets, subset_masks(n_train, setting))
    try:
        files = _bundle_files(store, plan)
    except FileNotFoundError as error:
        raise UsageError(
            f"the store {store.root} lacks part of the ground truth ({error}); compute it "
            f"first: python -m benchmarks.groundtruth --preset {setting.name}"
        ) from error
    provenance = to_jsonable(
        dict(provenance if provenance is not None else collect_provenance()), nonfinite="null"
    )
    manifest = {
        "format": BUNDLE_FORMAT,
        "preset": setting.name,
        "targets": list(plan.targets),
        "trainer": plan.trainer,
        "oracle": {"method": ORACLE, "config": plan.oracle_config},
        "fingerprint": bundle_fingerprint(setting),
        "setting": setting.to_dict(),
        "keys": plan.keys(store),
        "provenance": provenance,
        "arrays": {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        for name, (file, data, extra) in files.items():
            write_new_file(tmp / file, data)
            manifest["arrays"][name] = {
                "file": file,
                "bytes": len(data),
                "sha256": bytes_digest(data),
                **extra,
            }
        text = json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False) + "\n"
        write_new_file(tmp / MANIFEST, text.encode())  # last: a folder with it is complete
        fsync_dir(tmp)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
    return BundleInfo(path, setting.name, plan.targets, provenance)


# ---------------------------------------------------------------- verify and import


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The bundle's manifest (not verified against its files: see :func:`verify_bundle`).

    Raises:
        UsageError: no readable ``manifest.json`` of a known format in ``path``.
    """
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(
            f"ground-truth bundle {path}: cannot read {MANIFEST} ({error}); pass a bundle folder "
            f"made by python -m benchmarks.groundtruth --export, or {_FIX}"
        ) from error
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise UsageError(
            f"ground-truth bundle {path}: {MANIFEST} is not a bundle of format {BUNDLE_FORMAT}; "
            f"{_FIX}"
        )
    return manifest


def fingerprint_matches(manifest: Mapping[str, Any], setting: Setting) -> bool:
    """Whether a bundle's manifest was made for ``setting`` (:func:`bundle_fingerprint`)."""
    return canonical_json(manifest.get("fingerprint")) == canonical_json(
        bundle_fingerprint(setting)
    )


def _check_fingerprint(path: Path, manifest: Mapping[str, Any], setting: Setting) -> None:
    if fingerprint_matches(manifest, setting):
        return
    theirs, ours = manifest.get("fingerprint") or {}, bundle_fingerprint(setting)
    fields = sorted(
        k
        for k in set(theirs) | set(ours)
        if canonical_json(theirs.get(k)) != canonical_json(ours.get(k))
    )
    raise UsageError(
        f"ground-truth bundle {path} was made for another setting than preset "
        f"{setting.name!r} with these overrides (differing fields: {', '.join(fields)}); "
        f"nothing was imported. Use the preset and --set values it was made for (its "
        f"{MANIFEST} lists them under 'setting'), or {_FIX}"
    )


def _read_array(path: Path, name: str, record: Mapping[str, Any]) -> Any:
    """One verified array of the bundle (a state dict for ``base_model``)."""
    file = path / str(record.get("file", ""))
    problem = ""
    try:
        data = file.read_bytes()
    except OSError as error:
        data, problem = b"", f"cannot be read ({error})"
    if not problem and bytes_digest(data) != record.get("sha256"):
        problem = (
            f"fails its sha256 check ({len(data)} bytes, the manifest says {record.get('bytes')})"
        )
    if not problem:
        try:
            if name == "base_model":
                tensors = safetensors_load(data)
                return {k: tensors[k] for k in record["tensors"]}
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as error:  # noqa: BLE001 - any parse failure means a corrupt file
            problem = f"cannot be parsed ({error})"
        else:
            if list(array.shape) != record.get("shape") or str(array.dtype) != record.get("dtype"):
                problem = f"holds {array.dtype} {list(array.shape)}, not what the manifest says"
            else:
                return array
    raise UsageError(
        f"ground-truth bundle {path} is corrupt: file {file.name} (array {name!r}) {problem}; "
        f"nothing was imported. Fix: {_FIX}"
    )


def _verified(path: Path, setting: Setting) -> tuple[dict, _Plan, dict[str, Any]]:
    """``(manifest, plan, arrays)`` of a bundle checked against ``setting`` and this code."""
    manifest = read_manifest(path)
    _check_fingerprint(path, manifest, setting)
    records = manifest.get("arrays") or {}
    arrays = {name: _read_array(path, name, record) for name, record in records.items()}
    targets = tuple(manifest.get("targets") or ())
    required = ["base_model", "queries.images", "subset_masks"] + [
        f"{p}.{t}" for t in targets for p in ("measurements", "oracle", "oracle_cost")
    ]
    missing = [name for name in required if name not in arrays]
    if missing:
        raise UsageError(f"ground-truth bundle {path} lacks arrays {missing}; {_FIX}")
    masks = arrays["subset_masks"]
    if not np.array_equal(masks, subset_masks(masks.shape[1], setting)):
        raise UsageError(
            f"ground-truth bundle {path}: its subset masks are not this code's subsets of "
            f"preset {setting.name!r}; nothing was imported. {_FIX}"
        )
    plan = _plan(setting, targets, masks)
    ours, theirs = plan.keys(ArtifactStore(path)), manifest.get("keys") or {}
    differing = [name for name in ours if ours[name] != theirs.get(name)]
    if differing or manifest.get("trainer") != plan.trainer:
        raise UsageError(
            f"ground-truth bundle {path} was made by code whose store keys differ from this "
            f"code's (entries {differing or ['trainer']}; bundle commit "
            f"{(manifest.get('provenance') or {}).get('git_commit')}); nothing was imported. "
            f"{_FIX}"
        )
    return manifest, plan, arrays


def verify_bundle(path: str | Path, setting: Setting) -> BundleInfo:
    """Check a bundle against ``setting`` and this code without touching any store.

    Every file's sha256, shape and dtype, the Setting fingerprint, the subset masks and every
    store key (recomputed with this code's spec builders).

    Args:
        path: the bundle folder.
        setting: the setting it must have been made for.

    Returns:
        What the bundle holds.

    Raises:
        UsageError: naming the file and array that fail, or the mismatch, and the fix.
    """
    path = Path(path)
    manifest, plan, _ = _verified(path, setting)
    return BundleInfo(path, str(manifest.get("preset")), plan.targets, manifest["provenance"])


def _entries(store: ArtifactStore, plan: _Plan, arrays: Mapping[str, Any]) -> list[tuple]:
    """``(kind, spec, fmt, payload)`` of every store entry the bundle stands for."""
    entries = [
        ("base-model", plan.base_model(), "state_dict", arrays["base_model"]),
        (
            "queries",
            plan.queries(False),
            "tensors",
            {"images": torch.from_numpy(arrays["queries.images"])},
        ),
    ]
    if plan.with_trajectories:
        tensors = {
            name.split(".", 1)[1]: torch.from_numpy(array)
            for name, array in arrays.items()
            if name.startswith("queries_trajectories.")
        }
        entries.append(("queries", plan.queries(True), "tensors", tensors))
    for (m, k, target), spec in plan.measurements(store).items():
        values = arrays[f"measurements.{target}"][k, m]
        entries.append(("measurement", spec, "arrays", {"values": values}))
    for target in plan.targets:
        payload = {
            "predictions": arrays[f"oracle.{target}"],
            "cost": arrays[f"oracle_cost.{target}"],
        }
        entries.append((SUBSET_PREDICTIONS_KIND, plan.oracle(target), "arrays", payload))
    return entries


def _same_payload(store: ArtifactStore, kind: str, spec: dict, fmt: str, payload) -> bool:
    stored = {"state_dict": store.load_state_dict, "tensors": store.load_tensors}.get(
        fmt, store.load_arrays
    )(kind, spec)
    if list(stored) != list(payload):
        return False
    for name, value in payload.items():
        a, b = np.asarray(stored[name]), np.asarray(value)
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            return False
    return True


def import_bundle(path: str | Path, store: ArtifactStore, setting: Setting) -> BundleInfo:
    """Verify a bundle (:func:`verify_bundle`), then write its store entries.

    Nothing is written unless everything verifies; an entry already stored is kept when it holds
    the same bytes, and the import is refused when one differs (nothing is overwritten).

    Args:
        path: the bundle folder (a local path).
        store: the artifact store to fill.
        setting: the setting the bundle must have been made for.

    Returns:
        What the bundle holds, with how many entries were written and kept.

    Raises:
        UsageError: a corrupt bundle, another setting's, another code's, or a store entry that
            differs from the bundle's.
    """
    path = Path(path)
    manifest, plan, arrays = _verified(path, setting)
    entries = _entries(store, plan, arrays)
    stored = [e for e in entries if store.exists(e[0], e[1])]
    differing = [e for e in stored if not _same_payload(store, *e)]
    if differing:
        kind, spec = differing[0][:2]
        raise UsageError(
            f"the store {store.root} already holds {len(differing)} entries that differ from "
            f"ground-truth bundle {path} (e.g. {store.path(kind, spec)}: a ground truth "
            "computed here, whose float rounding differs); nothing was imported or overwritten. "
            "Use a fresh --cache-dir for the bundle, or keep this store's own ground truth "
            "(./harness lds --recompute-ground-truth)"
        )
    for kind, spec, fmt, payload in entries:
        if not store.exists(kind, spec):
            {
                "state_dict": store.save_state_dict,
                "tensors": store.save_tensors,
                "arrays": store.save_arrays,
            }[fmt](kind, spec, payload)
    preset = str(manifest.get("preset"))
    provenance = manifest["provenance"]
    return BundleInfo(
        path, preset, plan.targets, provenance, len(entries) - len(stored), len(stored)
    )


def import_for_run(
    setting: Setting,
    store: ArtifactStore,
    targets: Sequence[str],
    *,
    bundle: str | Path | None = None,
    recompute: bool = False,
) -> str:
    """Import the ground truth an LDS run starts from; say where its ground truth comes from.

    ``bundle`` given: import it (refused unless it verifies). Else, unless ``recompute``, the
    shipped bundle of the preset (:func:`shipped_bundle`) when its fingerprint matches the
    setting (a preset with ``--set`` overrides has none). Targets the bundle lacks are computed
    by the run.

    Args:
        setting: the run's setting.
        store: the run's artifact store.
        targets: the run's targets.
        bundle: a bundle folder to import, or None.
        recompute: never import the shipped bundle (the store's own ground truth is used and
            completed; a fresh ``--cache-dir`` recomputes everything).

    Returns:
        One line for the table and the run record, e.g. ``shipped bundle
        results/groundtruth/quick (commit abc1234)``.
    """
    computed = f"computed (or resumed) in the artifact store {store.root}"
    path = Path(bundle) if bundle is not None else None
    label = "bundle"
    if path is None and not recompute:
        path, label = shipped_bundle(setting.name), "shipped bundle"
        if path is not None and not fingerprint_matches(read_manifest(path), setting):
            print(
                f"note: the shipped ground-truth bundle {_shown(path)} is for preset "
                f"{setting.name!r} without --set overrides (or an older preset); computing",
                file=sys.stderr,
            )
            path = None
    if path is None:
        return computed
    info = import_bundle(path, store, setting)
    source = f"{label} {_shown(path)} (commit {info.commit[:12]})"
    extra = [t for t in targets if t not in info.targets]
    if extra:
        print(f"note: bundle {_shown(path)} lacks targets {extra}; computing them", file=sys.stderr)
        source += f"; targets {', '.join(extra)} {computed}"
    return source


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it."""
    repo = SHIPPED_BUNDLES.parents[1]
    path = path.resolve()
    return path.relative_to(repo).as_posix() if path.is_relative_to(repo) else str(path)


# ---------------------------------------------------------------- the command


@dataclass(frozen=True)
class GroundTruthConfig(RunOptions):
    """What ``python -m benchmarks.groundtruth`` does.

    Attributes:
        preset: setting preset (``benchmarks.settings.PRESETS``).
        targets: measurement names of the ground truth and the oracle.
        export: bundle folder to write after computing (or resuming), or None.
        import_path: bundle folder to import into ``cache_dir`` instead of computing, or None.
        (and the fields of ``benchmarks.cli.RunOptions``: cache_dir, executor, workers, ...)
    """

    preset: str = "quick"
    targets: tuple[str, ...] = DEFAULT_TARGETS
    export: str | None = None
    import_path: str | None = None

    def __post_init__(self) -> None:
        if self.export and self.import_path:
            raise UsageError("give --export or --import, not both")
        if not self.targets:
            raise UsageError("give at least one --target")
        super().__post_init__()


def compute(config: GroundTruthConfig) -> tuple[Setting, ArtifactStore, int, StageLog]:
    """Compute (or resume) the ground truth and the oracle's predictions of ``config``.

    Returns:
        ``(setting, store, n_train, stages)``.
    """
    setting, device = prepare_run(
        config.preset, config.overrides, config.targets, (ORACLE,), config.device, config.threads
    )
    experiment, stages = prepare_experiment(
        setting, device, config, with_trajectories=needs_trajectories(config.targets)
    )
    with stages.stage("ground_truth"):
        truth = experiment.ground_truth(config.targets)
    with stages.stage("oracle"):
        for target in config.targets:
            outcome = run_method(
                experiment,
                ORACLE,
                dict(setting.method_options),
                measurement=target,
                target=target,
                masks=truth.masks,
            )
            if outcome.status != "ok":
                raise RuntimeError(f"the exact-retraining oracle failed: {outcome.reason}")
    return setting, experiment.store, len(experiment.train_images), stages


def run(config: GroundTruthConfig) -> BundleInfo | None:
    """Import a bundle, or compute the ground truth and export it when asked.

    Returns:
        The imported or exported bundle, or None when only computing.
    """
    if config.import_path:
        setting, _ = prepare_run(
            config.preset, config.overrides, config.targets, (), "cpu", config.threads
        )
        info = import_bundle(config.import_path, ArtifactStore(config.cache_dir), setting)
        print(
            f"imported {info.path} (preset {info.preset}, targets {', '.join(info.targets)}, "
            f"commit {info.commit}) into {config.cache_dir}: {info.written} entries written, "
            f"{info.kept} already stored"
        )
        return info
    setting, store, n_train, stages = compute(config)
    print(f"ground truth of preset {setting.name} stored in {store.root}")
    if not config.export:
        return None
    provenance = {
        **collect_provenance(),
        "stages": stages.to_dict(),
        "command": "python -m benchmarks.groundtruth " + " ".join(sys.argv[1:]),
    }
    info = export_bundle(
        store, setting, config.targets, config.export, n_train=n_train, provenance=provenance
    )
    print(f"exported {info.path}")
    return info


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m benchmarks.groundtruth``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.groundtruth",
        description="Compute (or resume) the LDS ground truth and the exact-retraining oracle "
        "of a preset, and move it between stores as a bundle.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_preset_argument(parser)
    parser.add_argument(
        "--target",
        action="append",
        dest="targets",
        metavar="MEASUREMENT",
        help=f"measurement to record (repeatable; default {' and '.join(DEFAULT_TARGETS)})",
    )
    move = parser.add_mutually_exclusive_group()
    move.add_argument("--export", metavar="DIR", help="write the bundle folder DIR afterwards")
    move.add_argument(
        "--import",
        dest="import_path",
        metavar="DIR",
        help="import the bundle folder DIR (a local path) into --cache-dir instead of computing",
    )
    add_run_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit status 2 for usage errors, with the fix in the message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with usage_errors(parser):
        run(
            GroundTruthConfig(
                preset=args.preset,
                targets=tuple(args.targets or DEFAULT_TARGETS),
                export=args.export,
                import_path=args.import_path,
                **run_option_values(args),
            )
        )
    return 0
