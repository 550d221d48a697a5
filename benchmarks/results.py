"""The results layer: what every runner writes, and reading/formatting it.

An LDS run writes into its output directory (:func:`write_results`):

- ``<name>.summary.csv``: one row per evaluated configuration, columns :data:`SUMMARY_COLUMNS`
  (plus any extra columns a runner wants, e.g. ``dataset``, ``bits``, ``n_mc_samples``);
- ``<name>.per_query.csv``: the per-query LDS in long form, columns :data:`PER_QUERY_COLUMNS`
  (plus extras), so paired differences can be recomputed from stored files;
- ``<name>.paired.csv``: paired differences between methods (when there are any);
- ``<name>.run.json``: the run's record (:class:`RunRecord`: config, setting, provenance,
  stage timings, files), the one JSON schema of every runner (:func:`write_run_record`);
- figure inputs: ``*.model_correlation.npz`` (:func:`save_model_correlation`, Figure 17) and
  ``*.influence_examples.npz`` (:func:`save_influence_examples`, Figure 1).

Every file is written atomically (``benchmarks.io``), and the summary is written last, so a
reader that finds ``<name>.summary.csv`` also finds the others complete.

Columns of the summary table:

======================  ========================================================================
``method``              registered method name (``kfac``, ``trak``, ``retrain``, ...), or
                        :data:`NOISE_CEILING_METHOD` for the seed-to-seed ceiling.
``measurement``         the measurement the method used inside its approximation (``loss``,
                        ``elbo``, ``square-norm``, ``timestep-loss:<t>``, ...).
``target``              the measurement whose change is predicted (the ground truth).
``damping``             damping as if added to the Hessian of the N-normalised loss; NaN when
                        the method has none.
``preset``              the setting preset (``smoke``, ``quick``, ``cifar2``, ...).
``lds_mean``            mean LDS over queries, as a fraction in [-1, 1] (NaN unless ``ok``).
``lds_se``              standard error of that mean.
``n_queries``           number of queries with a defined LDS (see ``benchmarks.metrics``).
``status``              ``ok`` | ``unavailable`` (e.g. missing CLIP weights) | ``failed``.
``reason``              why it is not ``ok`` (empty when ``ok``).
``seconds``             wall time of the method (scoring), NaN when unknown.
``peak_memory_mb``      peak memory of the method in MiB, NaN when unknown.
======================  ========================================================================

Optional columns an LDS run adds (``benchmarks.lds.add_similarity_differences``):
``similarity_reference`` (the best similarity baseline of the run on the row's target),
``vs_similarity_mean`` and ``vs_similarity_se`` (the paired per-query LDS difference to it and
its standard error; NaN where there is no pair). The tables show them as ``Δ vs best sim.``.
"""

from __future__ import annotations

import io
import json
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.io import atomic_write_bytes, atomic_write_text, to_jsonable
from benchmarks.metrics import summarize
from benchmarks.provenance import collect_provenance, stages_to_dict, with_end_of_run_commit
from methods.registry import default_dampings, methods_in_table_order

__all__ = [
    "KEY_COLUMNS",
    "NOISE_CEILING_LABEL",
    "NOISE_CEILING_METHOD",
    "PER_QUERY_COLUMNS",
    "RANDOM_REMOVAL",
    "RUN_RECORD_SUFFIX",
    "STATUSES",
    "SUMMARY_COLUMNS",
    "RunRecord",
    "best_and_default",
    "format_difference",
    "format_lds",
    "format_table",
    "load_influence_examples",
    "load_model_correlation",
    "load_results",
    "method_sort_key",
    "per_query_frame",
    "result_row",
    "retrain_summary",
    "run_record_text",
    "save_influence_examples",
    "save_model_correlation",
    "similarity_difference_text",
    "validate_per_query",
    "validate_summary",
    "write_results",
    "write_run_record",
]

KEY_COLUMNS: tuple[str, ...] = ("method", "measurement", "target", "damping")
"""Columns identifying one evaluated configuration (together with ``preset`` and extras)."""

SUMMARY_COLUMNS: tuple[str, ...] = (
    "method",
    "measurement",
    "target",
    "damping",
    "preset",
    "lds_mean",
    "lds_se",
    "n_queries",
    "status",
    "reason",
    "seconds",
    "peak_memory_mb",
)
"""Required columns of a summary table, in this order (extra columns follow)."""

PER_QUERY_COLUMNS: tuple[str, ...] = ("method", "measurement", "target", "damping", "query", "lds")
"""Required columns of a per-query table (long form; extra columns such as ``preset`` follow)."""

STATUSES: tuple[str, ...] = ("ok", "unavailable", "failed")
"""Allowed values of the ``status`` column."""

HELD_OUT_SELECTION = "held-out"
"""``selection`` value of a row whose damping was chosen on held-out subsets (cross-fitted)."""

RANDOM_REMOVAL = "random-removal"
"""``method`` value of the retraining benchmark's uniformly random removals (Figure 3's
baseline)."""

NOISE_CEILING_METHOD = "noise-ceiling"
"""``method`` value of rows holding :func:`benchmarks.metrics.noise_ceiling` summaries."""

NOISE_CEILING_LABEL = "noise ceiling"
"""Label of the :data:`NOISE_CEILING_METHOD` rows in tables and figures (it is not a registered
method; the methods' labels are their registry display names)."""

_GROUP_EXTRAS: tuple[str, ...] = ("preset", "dataset")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")
_SUMMARY_SUFFIX = ".summary.csv"
_PER_QUERY_SUFFIX = ".per_query.csv"
RUN_RECORD_SUFFIX = ".run.json"
"""File suffix of every run's record (:class:`RunRecord`)."""


# ---------------------------------------------------------------- building rows


def result_row(
    method: str,
    measurement: str,
    target: str,
    damping: float | None,
    lds: np.ndarray | None,
    *,
    preset: str,
    status: str = "ok",
    reason: str = "",
    seconds: float | None = None,
    peak_memory_mb: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One summary row; ``lds_mean``/``lds_se``/``n_queries`` come from ``lds``.

    Args:
        method: the method's registry name.
        measurement: the measurement the method attributed.
        target: the ground truth's measurement target.
        damping: the damping of the configuration, or None (NaN in the table).
        lds: ``# [n_queries]`` per-query LDS; None only when ``status`` is not ``ok`` (then
            the LDS columns are NaN, NaN, 0).
        preset: the preset's name.
        status: one of :data:`STATUSES`.
        reason: what went wrong and how to fix it; required for, and only for, rows that are
            not ``ok``.
        seconds: the method's run time, or None (NaN).
        peak_memory_mb: its peak memory, or None (NaN).
        **extra: extra columns; they must not clash with the schema's columns.

    Returns:
        Column name -> value of the row.
    """
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}.")
    if status == "ok":
        if lds is None:
            raise ValueError("an 'ok' row needs its per-query LDS values.")
        if reason:
            raise ValueError("reason is for rows that are not 'ok'; leave it empty.")
    elif not reason:
        raise ValueError(f"a {status!r} row needs a reason (what went wrong and how to fix it).")
    if lds is None:
        mean, se, n = math.nan, math.nan, 0
    else:
        mean, se, n = summarize(np.asarray(lds, dtype=np.float64))
    row = {
        "method": method,
        "measurement": measurement,
        "target": target,
        "damping": math.nan if damping is None else float(damping),
        "preset": preset,
        "lds_mean": mean,
        "lds_se": se,
        "n_queries": n,
        "status": status,
        "reason": reason,
        "seconds": math.nan if seconds is None else float(seconds),
        "peak_memory_mb": math.nan if peak_memory_mb is None else float(peak_memory_mb),
    }
    clash = set(extra) & set(row)
    if clash:
        raise ValueError(f"extra columns {sorted(clash)} clash with the schema's columns.")
    row.update(extra)
    return row


def per_query_frame(
    method: str,
    measurement: str,
    target: str,
    damping: float | None,
    lds: np.ndarray,
    **extra: Any,
) -> pd.DataFrame:
    """Long per-query table for one configuration, one row per query.

    Args:
        method: the method's registry name.
        measurement: the measurement the method attributed.
        target: the ground truth's measurement target.
        damping: the damping of the configuration, or None (NaN in the table).
        lds: ``# [n_queries]`` per-query LDS; the query column is its index.
        **extra: extra columns (a scalar or one value per query); they must not clash with
            the schema's columns.

    Returns:
        ``n_queries`` rows: method, measurement, target, damping, query, lds, then ``extra``.
    """
    lds = np.asarray(lds, dtype=np.float64)
    if lds.ndim != 1:
        raise ValueError(f"lds must be 1-D [n_queries], got shape {lds.shape}.")
    frame = pd.DataFrame(
        {
            "method": method,
            "measurement": measurement,
            "target": target,
            "damping": math.nan if damping is None else float(damping),
            "query": np.arange(lds.size, dtype=np.int64),
            "lds": lds,
        }
    )
    for key, value in extra.items():
        if key in frame.columns:
            raise ValueError(f"extra column {key!r} clashes with the schema's columns.")
        frame[key] = value
    return frame


# ---------------------------------------------------------------- validation


def _require_columns(df: pd.DataFrame, required: Iterable[str], what: str) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(
            f"{what} is missing column(s) {missing}; required: {list(required)} "
            "(see benchmarks.results)."
        )


def validate_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Check a summary table and return it with normalised dtypes (columns in schema order)."""
    _require_columns(df, SUMMARY_COLUMNS, "summary table")
    out = df.copy()
    bad = sorted(set(out["status"].astype(str)) - set(STATUSES))
    if bad:
        raise ValueError(f"summary table has unknown status value(s) {bad}; allowed {STATUSES}.")
    for column in ("damping", "lds_mean", "lds_se", "seconds", "peak_memory_mb"):
        out[column] = pd.to_numeric(out[column], errors="raise").astype(np.float64)
    out["n_queries"] = pd.to_numeric(out["n_queries"], errors="raise").astype(np.int64)
    out["reason"] = ["" if pd.isna(v) else str(v) for v in out["reason"]]
    for column in ("method", "measurement", "target", "preset", "status"):
        out[column] = out[column].astype(str)
    extras = [c for c in out.columns if c not in SUMMARY_COLUMNS]
    return out[list(SUMMARY_COLUMNS) + extras].reset_index(drop=True)


def validate_per_query(df: pd.DataFrame) -> pd.DataFrame:
    """Check a per-query table and return it with normalised dtypes."""
    _require_columns(df, PER_QUERY_COLUMNS, "per-query table")
    out = df.copy()
    out["damping"] = pd.to_numeric(out["damping"], errors="raise").astype(np.float64)
    out["lds"] = pd.to_numeric(out["lds"], errors="raise").astype(np.float64)
    out["query"] = pd.to_numeric(out["query"], errors="raise").astype(np.int64)
    for column in ("method", "measurement", "target"):
        out[column] = out[column].astype(str)
    extras = [c for c in out.columns if c not in PER_QUERY_COLUMNS]
    return out[list(PER_QUERY_COLUMNS) + extras].reset_index(drop=True)


# ---------------------------------------------------------------- writing and loading


@dataclass(frozen=True)
class RunRecord:
    """What a run records beside its tables: the one JSON record of every runner.

    :func:`write_run_record` writes it as ``{"config", "setting", "provenance", "stages",
    "files", "result"}`` into ``<name>.run.json`` (strict JSON: non-finite floats become
    ``null``).

    Attributes:
        config: the runner's configuration (a dataclass, converted with its fields, or a dict).
        setting: the benchmark setting (``Setting.to_dict()``), or None.
        stages: seconds and peak memory of each stage: a ``benchmarks.provenance.StageLog``,
            finished ``StageTimer`` s, or a dict stage name -> timing dict.
        provenance: commit, package versions, device, ... (``collect_provenance()``); None:
            collected when the record is written.
        result: outcomes that the run's tables do not hold (e.g. failed tasks), or None.
    """

    config: Any
    setting: Mapping[str, Any] | None = None
    stages: Any = ()
    provenance: Mapping[str, Any] | None = None
    result: Any = None


def _file_names(files: Mapping[str, str | Path], directory: Path) -> dict[str, str]:
    """``files`` as paths relative to ``directory`` where they lie inside it."""
    out = {}
    for key, path in files.items():
        path = Path(path)
        out[key] = (
            path.relative_to(directory).as_posix()
            if path.is_relative_to(directory)
            else path.as_posix()
        )
    return out


def run_record_text(
    record: RunRecord, files: Mapping[str, str | Path], directory: str | Path
) -> str:
    """The JSON text of ``record`` with the run's ``files``.

    Args:
        record: the run's record; without provenance, the current one is collected.
        files: key -> path of the files the run wrote.
        directory: the record's own directory; paths inside it are written relative to it.

    Returns:
        Indented JSON (non-finite floats as null), ending with a newline.

    Raises:
        TypeError: a value is not JSON-serialisable (the message says where).
    """
    provenance = (
        collect_provenance()
        if record.provenance is None
        else with_end_of_run_commit(record.provenance)
    )
    document = {
        "config": record.config,
        "setting": record.setting,
        "provenance": dict(provenance),
        "stages": stages_to_dict(record.stages),
        "files": _file_names(files, Path(directory)),
        "result": record.result,
    }
    try:
        plain = to_jsonable(document, nonfinite="null")
    except TypeError as error:
        raise TypeError(
            f"the run record is not JSON-serialisable: {error}; convert the value to "
            "str/int/float/list/dict first."
        ) from error
    return json.dumps(plain, indent=2, allow_nan=False) + "\n"


def write_run_record(
    path: str | Path, record: RunRecord, files: Mapping[str, str | Path] | None = None
) -> Path:
    """Write a run's record (see :class:`RunRecord`) atomically to ``path``.

    Args:
        path: the record's file, ``<name>.run.json``.
        record: the run's record.
        files: key -> path of the files the run wrote.

    Returns:
        ``path``.
    """
    path = Path(path)
    return atomic_write_text(path, run_record_text(record, files or {}, path.parent))


def _check_run_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"result name {name!r} must start with a letter or digit and contain only letters, "
            "digits and _ . + = - (no path separators)."
        )


def write_results(
    out_dir: str | Path,
    summary_df: pd.DataFrame,
    per_query_df: pd.DataFrame,
    record: RunRecord,
    name: str,
    *,
    tables: Mapping[str, pd.DataFrame] | None = None,
    files: Mapping[str, str | Path] | None = None,
) -> dict[str, Path]:
    """Write an LDS run atomically into ``out_dir``: its tables and its record.

    Files: ``<name>.per_query.csv``, ``<name>.<key>.csv`` for each of ``tables``, the record
    ``<name>.run.json`` (:func:`write_run_record`, listing every file of the run), then
    ``<name>.summary.csv`` (last: its presence marks a complete run). An existing run of the
    same name is replaced. Nothing is written when a table or the record is invalid.

    Args:
        out_dir: the run's directory.
        summary_df: the summary table (:data:`SUMMARY_COLUMNS`).
        per_query_df: the per-query table (:data:`PER_QUERY_COLUMNS`).
        record: the run's record.
        name: the run's file stem.
        tables: further tables (e.g. ``{"paired": ...}``), written as CSV.
        files: files the run already wrote (e.g. figure inputs), listed in the record.

    Returns:
        ``{"per_query": path, <each key of tables>: path, "record": path, "summary": path}``.
    """
    _check_run_name(name)
    if not isinstance(record, RunRecord):
        raise ValueError(f"record must be a RunRecord, got {type(record).__name__}.")
    summary = validate_summary(summary_df)
    per_query = validate_per_query(per_query_df)
    out_dir = Path(out_dir)
    paths = {"per_query": out_dir / f"{name}{_PER_QUERY_SUFFIX}"}
    paths.update({key: out_dir / f"{name}.{key}.csv" for key in tables or {}})
    paths["record"] = out_dir / f"{name}{RUN_RECORD_SUFFIX}"
    paths["summary"] = out_dir / f"{name}{_SUMMARY_SUFFIX}"
    record_text = run_record_text(record, {**(files or {}), **paths}, out_dir)
    atomic_write_text(paths["per_query"], per_query.to_csv(index=False, float_format="%.17g"))
    for key, table in (tables or {}).items():
        atomic_write_text(paths[key], table.to_csv(index=False))
    atomic_write_text(paths["record"], record_text)
    atomic_write_text(paths["summary"], summary.to_csv(index=False, float_format="%.17g"))
    return paths


# ---------------------------------------------------------------- figure inputs


def _save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return atomic_write_bytes(Path(path), buffer.getvalue())


def save_model_correlation(
    path: str | Path,
    values_a: np.ndarray,
    values_b: np.ndarray,
    *,
    label_a: str,
    label_b: str,
    measurement: str,
) -> Path:
    """Store the input of Figure 17: one measurement on the same queries by two models.

    The two models are trained separately.

    Args:
        path: the file to write atomically; should end in ``.model_correlation.npz``.
        values_a: ``# [n_queries]`` the first model's measurement.
        values_b: ``# [n_queries]`` the second model's measurement.
        label_a: the first model's label.
        label_b: the second model's label.
        measurement: the measurement's name.

    Returns:
        ``path``.
    """
    a = np.asarray(values_a, dtype=np.float64)
    b = np.asarray(values_b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"values must be two [n_queries] arrays, got {a.shape} and {b.shape}.")
    return _save_npz(
        path,
        a=a,
        b=b,
        label_a=np.str_(label_a),
        label_b=np.str_(label_b),
        measurement=np.str_(measurement),
    )


def load_model_correlation(path: str | Path) -> dict[str, object]:
    """Read :func:`save_model_correlation`'s file: keys a, b, label_a, label_b, measurement."""
    with np.load(path, allow_pickle=False) as data:
        return {
            "a": data["a"],
            "b": data["b"],
            "label_a": str(data["label_a"]),
            "label_b": str(data["label_b"]),
            "measurement": str(data["measurement"]),
        }


def save_influence_examples(
    path: str | Path,
    query_images: np.ndarray,
    scores: np.ndarray,
    *,
    dataset: str,
    data_dir: str | Path | None = None,
) -> Path:
    """Store the input of Figure 1: queries, their scores, and where the training set is.

    The training images are not stored: column ``j`` of ``scores`` is position ``j`` of the
    training set, i.e. of the first ``N`` images of ``datasets.load_dataset(dataset,
    data_dir=data_dir)`` (the setting's training set, ``benchmarks.pipeline.load_train_set``).

    Args:
        path: the file to write atomically; should end in ``.influence_examples.npz``.
        query_images: ``# [Q, C, H, W]`` in [-1, 1] (stored as float32).
        scores: ``# [Q, N]`` attribution scores (stored as float64); ``N`` is stored as
            ``n_train``.
        dataset: the training set's data set name (``Setting.dataset``).
        data_dir: the data directory it was loaded from (None: the data set's default); stored
            as an absolute path, so a report run from elsewhere finds it.

    Returns:
        ``path``.
    """
    q = np.asarray(query_images, dtype=np.float32)
    s = np.asarray(scores, dtype=np.float64)
    if q.ndim != 4 or s.ndim != 2 or s.shape[0] != q.shape[0]:
        raise ValueError(
            f"need query_images [Q, C, H, W] and scores [Q, N]; got {q.shape}, {s.shape}."
        )
    if not dataset:
        raise ValueError("dataset must name the training set's data set.")
    return _save_npz(
        path,
        query_images=q,
        scores=s,
        dataset=np.str_(dataset),
        n_train=np.int64(s.shape[1]),
        data_dir=np.str_("" if data_dir is None else str(Path(data_dir).expanduser().resolve())),
    )


def load_influence_examples(path: str | Path) -> dict[str, Any]:
    """Read :func:`save_influence_examples`'s file.

    Returns:
        ``query_images`` ``# [Q, C, H, W]``, ``scores`` ``# [Q, N]``, and the training set's
        reference: ``dataset`` (str), ``n_train`` (int, ``N``), ``data_dir`` (str or None).
        A file written before the reference existed holds the pixels instead: then
        ``train_images`` ``# [N, C, H, W]`` is returned and ``dataset``/``data_dir`` are None.
    """
    with np.load(path, allow_pickle=False) as data:
        examples: dict[str, Any] = {
            "query_images": data["query_images"],
            "scores": data["scores"],
        }
        if "train_images" in data.files:  # old format: the training set itself
            examples.update(
                train_images=data["train_images"],
                n_train=int(data["train_images"].shape[0]),
                dataset=None,
                data_dir=None,
            )
        else:
            examples.update(
                dataset=str(data["dataset"]),
                n_train=int(data["n_train"]),
                data_dir=str(data["data_dir"]) or None,
            )
        return examples


# ---------------------------------------------------------------- loading


def _summary_paths(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    found: list[Path] = []
    for item in items:
        item = Path(item)
        if item.is_dir():
            found.extend(sorted(item.rglob(f"*{_SUMMARY_SUFFIX}")))
        elif item.is_file() and item.name.endswith(_SUMMARY_SUFFIX):
            found.append(item)
        elif item.is_file():
            raise ValueError(f"{item} is not a '*{_SUMMARY_SUFFIX}' file written by write_results.")
        else:
            raise FileNotFoundError(f"result path {item} does not exist.")
    return [p for p in found if not p.name.startswith(".tmp-")]


def _read_csv(path: Path) -> pd.DataFrame:
    # Only empty cells are missing: a measurement or reason spelled "None" or "NA" stays text.
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


def load_results(
    paths: str | Path | Iterable[str | Path],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Load and concatenate runs written by :func:`write_results`.

    Args:
        paths: a directory (searched recursively for ``*.summary.csv``), a summary CSV file, or
            an iterable of both.

    Returns:
        ``(summary_df, per_query_df)``, validated, each with an added ``run`` column (the run
        name, i.e. the file name without its suffix). A run without its per-query file
        contributes no per-query rows (with a warning).
    """
    summary_paths = _summary_paths(paths)
    if not summary_paths:
        raise FileNotFoundError(
            f"no '*{_SUMMARY_SUFFIX}' result files found in {paths}; run a benchmark first "
            "(e.g. python -m benchmarks.lds) or point to its output directory."
        )
    summaries, per_queries = [], []
    for path in summary_paths:
        run = path.name[: -len(_SUMMARY_SUFFIX)]
        summary = validate_summary(_read_csv(path))
        summary["run"] = run
        summaries.append(summary)
        pq_path = path.with_name(f"{run}{_PER_QUERY_SUFFIX}")
        if pq_path.is_file():
            per_query = validate_per_query(_read_csv(pq_path))
            per_query["run"] = run
            per_queries.append(per_query)
        else:
            warnings.warn(f"{pq_path} is missing; no per-query LDS for run {run!r}.", stacklevel=2)
    summary_df = pd.concat(summaries, ignore_index=True)
    if per_queries:
        per_query_df = pd.concat(per_queries, ignore_index=True)
    else:
        per_query_df = pd.DataFrame(columns=[*PER_QUERY_COLUMNS, "run"])
    return summary_df, per_query_df


# ---------------------------------------------------------------- presenting


def _fmt_number(value: float, fmt: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt % value


def format_lds(mean: float, se: float) -> str:
    """``"21.5 ± 0.9"`` (percent) from fractions; ``"—"`` when undefined."""
    if mean is None or math.isnan(mean):
        return "—"
    if se is None or math.isnan(se):
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * se:.1f}"


def format_difference(mean: float, se: float) -> str:
    """``"+3.2 ± 1.1"`` (percentage points, signed) from fractions; ``"—"`` when undefined."""
    if mean is None or math.isnan(mean):
        return "—"
    if se is None or math.isnan(se):
        return f"{100 * mean:+.1f}"
    return f"{100 * mean:+.1f} ± {100 * se:.1f}"


def similarity_difference_text(row: Mapping[str, Any]) -> str:
    """A summary row's ``Δ vs best sim.`` cell: ``ref`` for the reference itself, else signed."""
    held_out = _is_held_out(row.get("selection"))
    if row.get("method") == row.get("similarity_reference") and not held_out:
        return "ref"
    return format_difference(row.get("vs_similarity_mean", math.nan), row.get("vs_similarity_se"))


def _shorten(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters with an ellipsis (the full reason is in the CSV)."""
    return text if len(text) <= width else text[: width - 1] + "…"


PLUMBING_PRESETS: dict[str, str] = {
    "smoke": "4 queries, 6 subsets, 1 seed",
}
"""Presets too small to rank methods (plumbing checks) -> why, for :func:`ranking_note`."""


def ranking_note(preset: str) -> str | None:
    """The header line of every table made from a plumbing preset (smoke), else None."""
    why = PLUMBING_PRESETS.get(preset)
    if why is None:
        return None
    return (
        f"preset {preset} is a plumbing check ({why}): its LDS cannot rank methods; "
        "use the quick preset (or larger) to compare them"
    )


def format_table(summary_df: pd.DataFrame) -> str:
    """A plain-text table of a summary for the terminal, one line per row, in input order.

    Columns: method | measurement | target | damping (``held-out: a | b`` for a damping chosen
    on held-out subsets, the two folds' choices) | LDS % mean ± s.e. | 95% bootstrap interval
    over queries and subsets | Δ vs best sim. (paired difference to the best similarity
    baseline, percentage points ± s.e.; only when the table has ``vs_similarity_mean``) | n |
    seconds | peak MB | status (with the reason when not ``ok``).
    """
    df = validate_summary(summary_df)
    paired = "vs_similarity_mean" in df.columns
    header = [
        "method",
        "measurement",
        "target",
        "damping",
        "LDS % mean ± s.e.",
        "95% interval",
        *(["Δ vs best sim."] if paired else []),
        "n",
        "seconds",
        "peak MB",
        "status",
    ]
    rows = []
    for r in df.to_dict("records"):
        ok = r["status"] == "ok"
        rows.append(
            [
                r["method"],
                r["measurement"],
                r["target"],
                _damping_text(r),
                format_lds(r["lds_mean"], r["lds_se"]) if ok else "—",
                _interval_text(r),
                *([similarity_difference_text(r) if ok else "—"] if paired else []),
                str(r["n_queries"]) if ok else "—",
                _fmt_number(r["seconds"], "%.1f"),
                _fmt_number(r["peak_memory_mb"], "%.0f"),
                r["status"] if ok else _shorten(f"{r['status']}: {r['reason']}", 72),
            ]
        )
    widths = [
        max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
        for i, h in enumerate(header)
    ]
    right = set(range(3, len(header) - 1))

    def line(cells: list[str]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return " | ".join(parts).rstrip()

    out = [line(header), "-+-".join("-" * w for w in widths)]
    out.extend(line(row) for row in rows)
    return "\n".join(out)


def _tuned_columns(tuned_rows: pd.DataFrame, groups: list[str], key: tuple) -> dict[str, Any]:
    """The held-out-tuned row of one group: ``lds_tuned, se_tuned, n_tuned, chosen_...``, gain."""
    match = tuned_rows
    for column, value in zip(groups, key, strict=True):
        match = match[match[column].isna()] if pd.isna(value) else match[match[column] == value]
    if match.empty:
        return {
            "lds_tuned": math.nan,
            "se_tuned": math.nan,
            "n_tuned": 0,
            "chosen_damping_tuned": "",
            "tuning_gain": math.nan,
            "se_tuning_gain": math.nan,
            **_similarity_columns(None, "tuned"),
        }
    row = match.iloc[0]
    return {
        "lds_tuned": float(row["lds_mean"]),
        "se_tuned": float(row["lds_se"]),
        "n_tuned": int(row["n_queries"]),
        "chosen_damping_tuned": str(row.get("chosen_damping", "")),
        "tuning_gain": float(row.get("tuning_gain", math.nan)),
        "se_tuning_gain": float(row.get("se_tuning_gain", math.nan)),
        **_similarity_columns(row, "tuned"),
    }


_SIMILARITY_COLUMNS = ("vs_similarity_mean", "vs_similarity_se")


def _similarity_columns(row: Mapping[str, Any] | None, suffix: str) -> dict[str, float]:
    """``vs_similarity_mean_<suffix>, vs_similarity_se_<suffix>`` of ``row`` (NaN if absent)."""
    return {
        f"{column}_{suffix}": math.nan
        if row is None or pd.isna(row.get(column, math.nan))
        else float(row[column])
        for column in _SIMILARITY_COLUMNS
    }


def _damping_text(row: Mapping[str, Any]) -> str:
    if _is_held_out(row.get("selection")):
        return f"held-out: {row.get('chosen_damping', '')}"
    return _fmt_number(row["damping"], "%.0e")


def _interval_text(row: Mapping[str, Any]) -> str:
    low, high = row.get("ci_low", math.nan), row.get("ci_high", math.nan)
    if pd.isna(low) or pd.isna(high):
        return ""
    return f"[{100 * low:.1f}, {100 * high:.1f}]"


def _is_held_out(selection: Any) -> bool:
    return isinstance(selection, str) and selection == HELD_OUT_SELECTION


def _group_columns(df: pd.DataFrame) -> list[str]:
    return ["method", "measurement", "target"] + [c for c in _GROUP_EXTRAS if c in df.columns]


def best_and_default(
    summary_df: pd.DataFrame,
    default_damping: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """Per method (and measurement, target, preset, dataset): the best- and default-damping rows.

    Figure 2 convention: the best damping's LDS is the headline number, the default damping's
    LDS is shown in brackets. ``best`` is the ``ok`` row with the highest ``lds_mean`` (first one
    on ties); ``default`` is the ``ok`` row whose damping equals ``default_damping[method]``
    (relative tolerance 1e-9; None: each registered method's default damping,
    :func:`methods.registry.default_dampings`). A method without damping (all NaN) or without an
    entry in ``default_damping`` has ``default`` = ``best`` only when it has a single row, else
    NaN. ``best`` is the in-sample best: optimistic, since the damping is chosen on the numbers
    it reports. A row with ``selection = "held-out"`` (damping chosen on held-out subsets, see
    ``benchmarks.lds.add_held_out_damping``) is never a ``best`` or ``default`` candidate; it
    fills the ``tuned`` columns (NaN without one).

    Args:
        summary_df: a summary table (:data:`SUMMARY_COLUMNS`, optional ``selection``).
        default_damping: method -> default damping (None: the registry's).

    Returns:
        One row per group, in first-appearance order, columns: the group columns, ``status``
        (``ok`` when a best row exists, else the group's first status), ``reason``,
        ``damping_best``, ``lds_best``, ``se_best``, ``n_best``, ``damping_default``,
        ``lds_default``, ``se_default``, ``n_default``, ``lds_tuned``, ``se_tuned``,
        ``n_tuned``, ``chosen_damping_tuned``, ``tuning_gain``, ``se_tuning_gain`` (tuned minus
        default damping on the same folds, paired over queries; NaN without them).
        ``n_tuned``, ``chosen_damping_tuned``, and ``vs_similarity_mean_<s>``,
        ``vs_similarity_se_<s>`` for ``s`` in best, default, tuned (the paired difference to
        the best similarity baseline, NaN when the table has none).
    """
    df = validate_summary(summary_df)
    if default_damping is None:
        default_damping = default_dampings(df["method"])
    held_out = (
        df["selection"].map(_is_held_out)
        if "selection" in df.columns
        else pd.Series(False, index=df.index)
    )
    tuned_rows, df = df[held_out], df[~held_out]
    groups = _group_columns(df)
    records = []
    for key, group in df.groupby(groups, sort=False, dropna=False):
        record = dict(zip(groups, key, strict=True))
        record.update(_tuned_columns(tuned_rows, groups, key))
        ok = group[group["status"] == "ok"]
        ok = ok[ok["lds_mean"].notna()]
        nan = {"damping": math.nan, "lds_mean": math.nan, "lds_se": math.nan, "n_queries": 0}
        if ok.empty:
            first = group.iloc[0]
            record.update(status=first["status"], reason=first["reason"])
            if first["status"] == "ok":  # ok rows but no defined LDS at all
                record.update(status="failed", reason="no query has a defined LDS")
            best = default = nan
        else:
            record.update(status="ok", reason="")
            best = ok.loc[ok["lds_mean"].idxmax()]
            method = record["method"]
            if method in default_damping:
                wanted = float(default_damping[method])
                hit = ok[np.isclose(ok["damping"], wanted, rtol=1e-9, atol=0.0)]
                default = hit.iloc[0] if len(hit) else nan
            elif len(ok) == 1:
                default = best
            else:
                default = nan
        for suffix, row in (("best", best), ("default", default)):
            record[f"damping_{suffix}"] = float(row["damping"])
            record[f"lds_{suffix}"] = float(row["lds_mean"])
            record[f"se_{suffix}"] = float(row["lds_se"])
            record[f"n_{suffix}"] = int(row["n_queries"])
            record.update(_similarity_columns(row if row is not nan else None, suffix))
        records.append(record)
    return pd.DataFrame.from_records(records)


# ---------------------------------------------------------------- retraining (Figure 3)


def method_sort_key(method: str) -> tuple[int, str]:
    """Key of the table order: the noise ceiling, the registry's order, then unknown names."""
    order = methods_in_table_order()
    if method == NOISE_CEILING_METHOD:
        return (-1, method)
    return (order.index(method), method) if method in order else (len(order), method)


def retrain_summary(retrain_df: pd.DataFrame) -> pd.DataFrame:
    """Mean ± s.e. over queries of the change in loss after retraining without top influences.

    With random removals in the table (method :data:`RANDOM_REMOVAL`), each method's change is
    also paired with the random removal of the same query and fraction (common random numbers:
    the same base value and Monte Carlo draws), and the paired difference ``method − random`` is
    summarised over the queries both have.

    Args:
        retrain_df: long table with columns ``method``, ``fraction`` (removed fraction of the
            training set, e.g. 0.02), ``query``, ``delta_loss`` (retrained minus original loss).

    Returns:
        Columns ``method, fraction, mean, se, n, vs_random_mean, vs_random_se, n_pairs``
        (the last three NaN / 0 for the random removal itself or without one), sorted by method
        order then fraction.
    """
    missing = [c for c in ("method", "fraction", "query", "delta_loss") if c not in retrain_df]
    if missing:
        raise ValueError(
            f"retrain table is missing column(s) {missing}; need method, fraction, query, "
            "delta_loss."
        )
    columns = ["method", "fraction", "mean", "se", "n", "vs_random_mean", "vs_random_se"]
    random_delta = retrain_df[retrain_df["method"] == RANDOM_REMOVAL].set_index(
        ["fraction", "query"]
    )["delta_loss"]
    records = []
    for (method, fraction), group in retrain_df.groupby(["method", "fraction"], sort=False):
        mean, se, n = summarize(group["delta_loss"].to_numpy(dtype=np.float64))
        pairs = _paired_with_random(group, random_delta) if method != RANDOM_REMOVAL else None
        diff = summarize(pairs) if pairs is not None and pairs.size else None
        records.append(
            {
                "method": str(method),
                "fraction": float(fraction),
                "mean": mean,
                "se": se,
                "n": n,
                "vs_random_mean": diff.mean if diff else math.nan,
                "vs_random_se": diff.standard_error if diff else math.nan,
                "n_pairs": diff.n if diff else 0,
            }
        )
    out = pd.DataFrame.from_records(records, columns=[*columns, "n_pairs"])
    if out.empty:
        return out
    order = [(method_sort_key(m), f) for m, f in zip(out["method"], out["fraction"], strict=True)]
    return out.iloc[sorted(range(len(out)), key=lambda i: order[i])].reset_index(drop=True)


def _paired_with_random(group: pd.DataFrame, random_delta: pd.Series) -> np.ndarray:
    """``# [n_pairs]`` a method's delta minus the random removal's, per query both have."""
    keys = list(zip(group["fraction"], group["query"], strict=True))
    kept = [i for i, key in enumerate(keys) if key in random_delta.index]
    own = group["delta_loss"].to_numpy(dtype=np.float64)[kept]
    other = random_delta.loc[[keys[i] for i in kept]].to_numpy(dtype=np.float64)
    return own - other
