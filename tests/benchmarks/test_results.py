"""Tests of the result-table schema, atomic writing, loading, formatting and best/default."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import pandas as pd
import pytest

from benchmarks.provenance import StageLog, StageTimer
from benchmarks.results import (
    PER_QUERY_COLUMNS,
    SUMMARY_COLUMNS,
    RunRecord,
    best_and_default,
    format_table,
    load_results,
    per_query_frame,
    result_row,
    write_results,
    write_run_record,
)
from methods.registry import default_dampings
from tests.benchmarks.test_provenance import KEYS


def _record(provenance) -> RunRecord:
    return RunRecord({"preset": "smoke"}, provenance=provenance)


def _run_tables(method: str, dampings, lds_by_damping, preset="smoke"):
    rows, frames = [], []
    for damping, lds in zip(dampings, lds_by_damping, strict=True):
        rows.append(result_row(method, "loss", "loss", damping, lds, preset=preset, seconds=1.5))
        frames.append(per_query_frame(method, "loss", "loss", damping, lds, preset=preset))
    return pd.DataFrame(rows), pd.concat(frames, ignore_index=True)


def test_result_row_summarises_lds_and_validates():
    row = result_row("kfac", "loss", "loss", 1e-8, np.array([0.1, 0.3, np.nan]), preset="smoke")
    assert list(row)[: len(SUMMARY_COLUMNS)] == list(SUMMARY_COLUMNS)
    assert row["lds_mean"] == pytest.approx(0.2)
    assert row["lds_se"] == pytest.approx(np.std([0.1, 0.3], ddof=1) / math.sqrt(2))
    assert row["n_queries"] == 2 and row["status"] == "ok"
    na = result_row(
        "clip", "loss", "loss", None, None, preset="smoke", status="unavailable", reason="no w"
    )
    assert math.isnan(na["lds_mean"]) and na["n_queries"] == 0 and math.isnan(na["damping"])
    with pytest.raises(ValueError, match="reason"):
        result_row("clip", "loss", "loss", None, None, preset="smoke", status="failed")
    with pytest.raises(ValueError, match="status"):
        result_row("clip", "loss", "loss", None, None, preset="smoke", status="meh", reason="x")
    with pytest.raises(ValueError, match="per-query"):
        result_row("kfac", "loss", "loss", 1e-8, None, preset="smoke")
    with pytest.raises(ValueError, match="clash"):
        result_row("kfac", "loss", "loss", 1e-8, [0.1], preset="smoke", lds_mean=3)


def test_write_then_load_round_trips_and_concatenates(tmp_path):
    s1, q1 = _run_tables("kfac", [1e-8, 1e-3], [np.array([0.2, 0.4]), np.array([0.1, 0.5])])
    s2, q2 = _run_tables("trak", [1e-9], [np.array([0.05, 0.15, np.nan])])
    s2["dataset"] = "digits2"  # extra columns are kept
    clip = result_row(
        "clip",
        "None",
        "loss",
        None,
        None,
        preset="NA",
        status="unavailable",
        reason="NA",
        dataset="digits2",
    )
    s2 = pd.concat([s2, pd.DataFrame([clip])], ignore_index=True)
    record = _record({"commit": "abc", "n": np.int64(3)})
    paths = write_results(tmp_path / "a", s1, q1, record, "kfac-run")
    write_results(tmp_path / "b", s2, q2, _record({"commit": "def"}), "trak-run")
    written = json.loads(paths["record"].read_text())
    assert written["provenance"] == {"commit": "abc", "n": 3}
    assert written["files"] == {
        "per_query": "kfac-run.per_query.csv",
        "record": "kfac-run.run.json",
        "summary": "kfac-run.summary.csv",
    }
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".tmp-")]

    summary, per_query = load_results(tmp_path)
    assert list(summary.columns[: len(SUMMARY_COLUMNS)]) == list(SUMMARY_COLUMNS)
    assert list(per_query.columns[: len(PER_QUERY_COLUMNS)]) == list(PER_QUERY_COLUMNS)
    assert sorted(summary["run"].unique()) == ["kfac-run", "trak-run"]
    assert len(summary) == 4 and len(per_query) == 7
    kfac = summary[summary["method"] == "kfac"].sort_values("damping")
    np.testing.assert_array_equal(kfac["damping"], [1e-8, 1e-3])  # exact float round trip
    np.testing.assert_allclose(kfac["lds_mean"], [0.3, 0.3])
    trak_q = per_query[per_query["method"] == "trak"]
    assert trak_q["lds"].isna().sum() == 1 and list(trak_q["query"]) == [0, 1, 2]
    assert summary.loc[summary["method"] == "trak", "n_queries"].item() == 2
    assert (summary.loc[summary["status"] == "ok", "reason"] == "").all()
    clip_row = summary[summary["method"] == "clip"].iloc[0]  # "None"/"NA" stay text
    assert (clip_row["measurement"], clip_row["preset"], clip_row["reason"]) == ("None", "NA", "NA")
    assert math.isnan(clip_row["damping"]) and math.isnan(clip_row["lds_mean"])
    assert list(summary["dataset"].fillna("")) == ["", "", "digits2", "digits2"]

    # Loading one file or a list gives the same rows for that run.
    one, _ = load_results([paths["summary"]])
    assert len(one) == 2


def test_write_results_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    s, q = _run_tables("kfac", [1e-8], [np.array([0.2, 0.4])])
    write_results(tmp_path, s, q, _record({"v": 1}), "run")
    before = (tmp_path / "run.summary.csv").read_text()

    def boom(src, dst):
        raise OSError("disk full")

    s2, q2 = _run_tables("kfac", [1e-8], [np.array([0.9, 0.9])])
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_results(tmp_path, s2, q2, _record({"v": 2}), "run")
    monkeypatch.undo()
    assert (tmp_path / "run.summary.csv").read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_write_results_rejects_bad_names_tables_and_provenance(tmp_path):
    s, q = _run_tables("kfac", [1e-8], [np.array([0.2, 0.4])])
    with pytest.raises(ValueError, match="result name"):
        write_results(tmp_path, s, q, _record({}), "../escape")
    with pytest.raises(ValueError, match="missing column"):
        write_results(tmp_path, s.drop(columns=["lds_se"]), q, _record({}), "run")
    with pytest.raises(ValueError, match="status"):
        write_results(tmp_path, s.assign(status="great"), q, _record({}), "run")
    with pytest.raises(TypeError, match="JSON-serialisable"):
        write_results(tmp_path, s, q, _record({"obj": object()}), "run")
    with pytest.raises(ValueError, match="RunRecord"):
        write_results(tmp_path, s, q, {"commit": "abc"}, "run")
    assert not list(tmp_path.iterdir())


def test_load_results_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no '\\*.summary.csv'"):
        load_results(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_results(tmp_path / "missing")
    s, q = _run_tables("kfac", [1e-8], [np.array([0.2, 0.4])])
    paths = write_results(tmp_path, s, q, _record({}), "run")
    paths["per_query"].unlink()
    with pytest.warns(UserWarning, match="missing"):
        summary, per_query = load_results(tmp_path)
    assert len(summary) == 1 and per_query.empty


@dataclasses.dataclass(frozen=True)
class _Config:
    preset: str
    damping: float


def test_run_record_merges_everything(tmp_path):
    log = StageLog()
    with log.stage("fit"):
        pass
    with log.stage("score"):
        pass
    with pytest.raises(ValueError, match="already recorded"), log.stage("fit"):
        pass
    path = tmp_path / "out" / "result.run.json"
    provenance = {"git_commit": "abc"}
    result = {"lds": np.array([0.5, float("nan")]), "mean": np.float64(0.5)}
    record = RunRecord(
        _Config("quick", 1e-8),
        setting={"name": "quick", "n_subsets": 3},
        stages=log,
        provenance=provenance,
        result=result,
    )
    write_run_record(path, record, {"table": path.parent / "result.retrain.csv"})

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    doc = json.loads(path.read_text(), parse_constant=refuse)  # strict JSON
    assert list(doc) == ["config", "setting", "provenance", "stages", "files", "result"]
    assert doc["config"] == {"preset": "quick", "damping": 1e-8}
    assert doc["setting"] == {"name": "quick", "n_subsets": 3}
    assert doc["result"] == {"lds": [0.5, None], "mean": 0.5}
    assert list(doc["stages"]) == ["fit", "score"]
    assert doc["stages"]["fit"]["seconds"] >= 0 and "peak_memory_mb" in doc["stages"]["fit"]
    # the record keeps the start-of-run commit and flags that the checkout differs now
    assert doc["provenance"]["git_commit"] == "abc"
    assert doc["provenance"]["git_changed_during_run"] is True
    assert doc["files"] == {"table": "result.retrain.csv"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.run.json"]


def test_run_record_default_provenance_and_timer_list(tmp_path):
    with StageTimer("a") as a:
        pass
    with StageTimer("a") as b:
        pass
    with pytest.raises(ValueError, match="unique"):
        write_run_record(tmp_path / "r.run.json", RunRecord({}, stages=[a, b]))
    path = write_run_record(tmp_path / "r.run.json", RunRecord({"y": 2}, stages=[a]))
    doc = json.loads(path.read_text())
    assert set(doc["provenance"]) == KEYS and doc["stages"]["a"]["seconds"] >= 0
    assert doc["setting"] is None and doc["result"] is None and doc["files"] == {}


def test_format_table_contents():
    rows = [
        result_row(
            "kfac",
            "loss",
            "loss",
            1e-8,
            [0.2, 0.25],
            preset="smoke",
            seconds=12.34,
            peak_memory_mb=512.4,
        ),
        result_row(
            "clip",
            "loss",
            "loss",
            None,
            None,
            preset="smoke",
            status="unavailable",
            reason="CLIP weights not found",
        ),
    ]
    text = format_table(pd.DataFrame(rows))
    lines = text.splitlines()
    assert len(lines) == 4
    assert "LDS % mean ± s.e." in lines[0]
    kfac = lines[2]
    assert "kfac" in kfac and "22.5 ± 2.5" in kfac and "1e-08" in kfac
    assert "12.3" in kfac and "512" in kfac and kfac.endswith("ok")
    assert "unavailable: CLIP weights not found" in lines[3]
    assert len({line.index("|") for line in (lines[0], lines[2], lines[3])}) == 1  # aligned


def test_best_and_default_picks_the_right_rows():
    rows = [
        result_row("kfac", "loss", "loss", 1e-8, [0.20, 0.22], preset="smoke"),
        result_row("kfac", "loss", "loss", 1e-3, [0.25, 0.27], preset="smoke"),
        result_row("kfac", "loss", "loss", 1e-1, [0.01, 0.03], preset="smoke"),
        result_row(
            "kfac", "loss", "loss", 1e1, None, preset="smoke", status="failed", reason="nan"
        ),
        result_row("kfac", "loss", "elbo", 1e-8, [0.10, 0.12], preset="smoke"),
        result_row("trak", "loss", "loss", 1e-9, [0.01, 0.02], preset="smoke"),
        result_row("trak", "loss", "loss", 1e-2, [0.09, 0.11], preset="smoke"),
        result_row("trak", "loss", "loss", 1e-9, [0.40, 0.42], preset="quick"),
        result_row("clip", "loss", "loss", None, [0.05, 0.06], preset="smoke"),
        result_row(
            "retrain",
            "loss",
            "loss",
            None,
            None,
            preset="smoke",
            status="unavailable",
            reason="no retrained models",
        ),
    ]
    out = best_and_default(pd.DataFrame(rows), default_dampings()).set_index(
        ["method", "target", "preset"]
    )
    assert out.equals(best_and_default(pd.DataFrame(rows)).set_index(out.index.names))
    assert len(out) == 6
    kfac = out.loc[("kfac", "loss", "smoke")]
    assert kfac["damping_best"] == 1e-3 and kfac["lds_best"] == pytest.approx(0.26)
    assert kfac["damping_default"] == 1e-8 and kfac["lds_default"] == pytest.approx(0.21)
    assert out.loc[("kfac", "elbo", "smoke")]["lds_best"] == pytest.approx(0.11)
    trak = out.loc[("trak", "loss", "smoke")]
    assert trak["damping_best"] == 1e-2 and trak["lds_default"] == pytest.approx(0.015)
    assert out.loc[("trak", "loss", "quick")]["lds_best"] == pytest.approx(0.41)  # own preset
    clip = out.loc[("clip", "loss", "smoke")]
    assert clip["lds_default"] == clip["lds_best"] == pytest.approx(0.055)
    retrain = out.loc[("retrain", "loss", "smoke")]
    assert retrain["status"] == "unavailable" and math.isnan(retrain["lds_best"])
    assert retrain["reason"] == "no retrained models"


def test_best_and_default_missing_default_is_nan():
    rows = [
        result_row("kfac", "loss", "loss", 1e-3, [0.2, 0.2], preset="smoke"),
        result_row("kfac", "loss", "loss", 1e-1, [0.1, 0.1], preset="smoke"),
    ]
    out = best_and_default(pd.DataFrame(rows), {"kfac": 1e-8})
    assert out["lds_best"].item() == pytest.approx(0.2)
    assert math.isnan(out["lds_default"].item())
