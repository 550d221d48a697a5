"""Tests of provenance collection and stage timing/memory (run records: test_results.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from datetime import datetime, timedelta

import numpy as np
import pytest
import torch

from benchmarks import provenance as prov
from benchmarks.provenance import StageTimer, collect_provenance, with_end_of_run_commit

KEYS = {
    "git_commit",
    "git_dirty",
    "python",
    "packages",
    "platform",
    "machine",
    "cpu_count",
    "device",
    "hostname",
    "timestamp",
    "argv",
}


def test_collect_provenance_has_the_keys_and_true_values():
    info = collect_provenance()
    assert set(info) == KEYS
    assert info["packages"]["torch"] == torch.__version__
    assert info["packages"]["numpy"] == np.__version__
    assert {"curvlinops", "traker", "open_clip", "pandas"} <= set(info["packages"])
    assert info["cpu_count"] == os.cpu_count()
    assert info["device"]["cuda_available"] == torch.cuda.is_available()
    stamp = datetime.fromisoformat(info["timestamp"])
    assert stamp.utcoffset() == timedelta(0)
    json.dumps(info, allow_nan=False)  # JSON-able


def test_missing_package_is_none(monkeypatch):
    monkeypatch.setitem(prov.PACKAGES, "nope", "surely-not-an-installed-distribution-xyz")
    assert collect_provenance()["packages"]["nope"] is None


def test_outside_git_commit_is_unknown(tmp_path):
    info = collect_provenance(repo_dir=tmp_path)
    assert info["git_commit"] == "unknown" and info["git_dirty"] is None


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_commit_and_dirty_flag(tmp_path):
    def git(*args):
        return subprocess.run(
            ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    git("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    git("add", "f.txt")
    git("commit", "-q", "-m", "init")
    head = git("rev-parse", "HEAD")
    info = collect_provenance(repo_dir=tmp_path)
    assert info["git_commit"] == head and len(head) == 40
    assert info["git_dirty"] is False
    (tmp_path / "f.txt").write_text("b")
    assert collect_provenance(repo_dir=tmp_path)["git_dirty"] is True


def test_stage_timer_measures_a_sleep():
    with StageTimer("sleep") as stage:
        time.sleep(0.3)
    assert 0.3 <= stage.seconds < 1.5
    assert stage.peak_memory_mb is not None and stage.peak_memory_mb >= 0.0
    assert stage.cuda_peak_memory_mb is None
    assert set(stage.to_dict()) == {
        "seconds",
        "peak_memory_mb",
        "peak_rss_mb",
        "cuda_peak_memory_mb",
    }


def test_stage_timer_sees_a_transient_200mb_tensor():
    with StageTimer("alloc", device="cpu", sample_interval_s=0.01) as stage:
        x = torch.ones(50_000_000)  # 200 MB, written so that its pages are resident
        time.sleep(0.2)
        del x  # freed before the stage ends: only the sampler can have seen the peak
    assert stage.peak_memory_mb >= 150.0, stage.peak_memory_mb
    assert stage.peak_rss_mb >= stage.peak_memory_mb


def test_stage_timer_records_on_exception_and_validates():
    with pytest.raises(RuntimeError, match="boom"), StageTimer("fail") as stage:
        raise RuntimeError("boom")
    assert stage.seconds is not None
    with pytest.raises(RuntimeError, match="has not finished"):
        StageTimer("x").to_dict()
    with pytest.raises(ValueError, match="name"):
        StageTimer("")
    with pytest.raises(ValueError, match="sample_interval_s"):
        StageTimer("x", sample_interval_s=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stage_timer_cuda_peak_nested():
    with StageTimer("outer", device="cuda") as outer:
        a = torch.ones(25_000_000, device="cuda")  # 100 MB
        del a
        with StageTimer("inner", device="cuda") as inner:
            b = torch.ones(12_500_000, device="cuda")  # 50 MB
            del b
    assert 45 <= inner.cuda_peak_memory_mb < 100
    assert outer.cuda_peak_memory_mb >= 95  # the inner reset did not hide the outer peak


def test_end_of_run_commit_flags_a_checkout_that_changed(tmp_path):
    """A run records the commit it started at; a commit made while it ran is flagged."""
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
        ).stdout.strip()

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (repo / "f.txt").write_text("a\n")
    git("add", "f.txt")
    git("commit", "-qm", "first")
    start = collect_provenance(repo)
    assert with_end_of_run_commit(start, repo) == start  # nothing changed: nothing added

    (repo / "f.txt").write_text("b\n")
    edited = with_end_of_run_commit(start, repo)
    assert edited["git_commit"] == start["git_commit"]
    assert edited["git_dirty_at_end"] is True and edited["git_changed_during_run"] is True

    git("commit", "-qam", "second")
    committed = with_end_of_run_commit(start, repo)
    assert committed["git_commit_at_end"] == git("rev-parse", "HEAD") != start["git_commit"]
