"""Acceptance (issue 6): a ground-truth run killed with SIGKILL resumes without retraining
finished models, and its final arrays equal those of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.pipeline import TRAINING_LOG
from benchmarks.results import load_results
from benchmarks.store import TMP_PREFIX
from tests.benchmarks.tiny import tiny_cli_args

REPO = Path(__file__).resolve().parents[2]


def _lds_command(cache: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "benchmarks.lds",
        "--preset",
        "smoke",
        *tiny_cli_args(),
        "--set=n_subsets=6",
        "--method",
        "random",
        "--cache-dir",
        str(cache),
        "--out",
        str(out),
        "--no-progress",
        "--threads",
        "1",
        # in-process: the kill must stop every trainer (an orphaned pool worker would finish
        # its model after the kill, and the resumed run could train the same one again)
        "--executor",
        "local",
    ]


def _trainings(cache: Path) -> list[str]:
    log = cache / TRAINING_LOG
    return [line.split("\t")[1] for line in log.read_text().splitlines()] if log.exists() else []


def _entries(kind_dir: Path) -> list[Path]:
    """The complete store entries of one kind (not the temporary dirs of killed writers)."""
    return sorted(p for p in kind_dir.iterdir() if not p.name.startswith(TMP_PREFIX))


@pytest.mark.slow
def test_sigkill_then_resume(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cache, out = tmp_path / "cache", tmp_path / "out"
    process = subprocess.Popen(
        _lds_command(cache, out),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while len(_trainings(cache)) < 4 and time.time() < deadline:  # base + 3 subset models
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before_kill = _trainings(cache)
    assert 4 <= len(done_before_kill) < 1 + 12, "kill landed outside the ground truth"

    subprocess.run(_lds_command(cache, out), cwd=REPO, env=env, check=True, capture_output=True)
    trainings = _trainings(cache)
    assert len(trainings) == len(set(trainings))  # nothing trained twice
    # Every model exists once (a kill between a model's save and its log line would leave
    # one fewer line, never a retraining).
    # (A kill during a save leaves a ``.tmp-*`` directory, which the store ignores.)
    assert len(_entries(cache / "model")) == 6 * 2
    assert len(trainings) >= 6 * 2
    assert trainings[: len(done_before_kill)] == done_before_kill

    clean_cache, clean_out = tmp_path / "clean-cache", tmp_path / "clean-out"
    subprocess.run(
        _lds_command(clean_cache, clean_out), cwd=REPO, env=env, check=True, capture_output=True
    )
    resumed, _ = load_results(out)
    clean, _ = load_results(clean_out)
    np.testing.assert_array_equal(resumed["lds_mean"].to_numpy(), clean["lds_mean"].to_numpy())
    measurements = _entries(cache / "measurement")
    clean_measurements = _entries(clean_cache / "measurement")
    assert [p.name for p in measurements] == [p.name for p in clean_measurements]
    for a, b in zip(measurements, clean_measurements, strict=True):
        np.testing.assert_array_equal(np.load(a / "values.npy"), np.load(b / "values.npy"))
