"""The leaderboard: ranking, the noise-ceiling and unavailable rows, files written end to end."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from benchmarks import leaderboard
from benchmarks.results import NOISE_CEILING_METHOD, result_row
from methods import get_method
from tests.benchmarks.tiny import tiny_cli_args

PROVENANCE = {"git_commit": "abc1234", "packages": {"torch": "2.x"}, "cpu_count": 2}


def _summary() -> pd.DataFrame:
    intervals = {"random": (0.0, 0.35), "kfac": (0.3, 0.5), "pixel": (0.2, 0.2)}
    rows = [
        result_row("random", "loss", "loss", None, np.array([0.0, 0.1]), preset="p"),
        result_row("kfac", "loss", "loss", 1e-8, np.array([0.3, 0.5]), preset="p"),
        result_row(NOISE_CEILING_METHOD, "loss", "loss", None, np.array([0.6, 0.6]), preset="p"),
        result_row(
            "clip",
            "loss",
            "loss",
            None,
            None,
            preset="p",
            status="unavailable",
            reason="no CLIP weights",
        ),
        result_row("pixel", "loss", "loss", None, np.array([0.2, 0.2]), preset="p"),
    ]
    for row in rows:
        row["ci_low"], row["ci_high"] = intervals.get(row["method"], (np.nan, np.nan))
    return pd.DataFrame(rows)


def _table_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")][1:]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_ranks_by_mean_lds_with_the_ceiling_unranked_and_unavailable_last():
    rows = _table_rows(leaderboard.leaderboard_markdown(_summary(), PROVENANCE, "p"))
    assert [r[0] for r in rows] == ["", "1", "2", "3", "–"]
    assert rows[0][1] == "noise ceiling"
    kfac_label = get_method("kfac").display_name
    assert rows[1][1] == f"{kfac_label} (`kfac`)"
    assert rows[1][2].startswith("40.0")  # mean of 0.3 and 0.5, in %
    assert [r[1].split("`")[1] for r in rows[2:]] == ["pixel", "random", "clip"]
    assert "unavailable: no CLIP weights" in rows[4][2]


def test_marks_the_methods_whose_interval_overlaps_the_leaders():
    rows = _table_rows(leaderboard.leaderboard_markdown(_summary(), PROVENANCE, "p"))
    marks = {r[1].split("`")[1]: r[4] for r in rows[1:4]}
    assert marks == {"kfac": "≈", "pixel": "", "random": "≈"}  # kfac leads; pixel is apart
    assert rows[1][3] == "[30.0, 50.0]"


def test_names_the_commit_and_the_preset():
    markdown = leaderboard.leaderboard_markdown(_summary(), PROVENANCE, "p")
    assert "preset `p`" in markdown.splitlines()[0]
    assert "Commit `abc1234`" in markdown


def test_main_writes_the_table_and_the_figure(tiny_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    out = tmp_path / "out"
    args = ["--preset", "smoke", *tiny_cli_args(), "--method", "random", "--method", "pixel"]
    status = leaderboard.main(
        [*args, "--out", str(out), "--cache-dir", str(cache), "--no-progress"]
    )
    assert status == 0
    markdown = (out / "leaderboard.md").read_text()
    names = [r[1] for r in _table_rows(markdown)]
    assert any("`random`" in n for n in names) and any("`pixel`" in n for n in names)
    assert "noise ceiling" in names  # tiny has two seeds per subset
    assert (out / "leaderboard.png").stat().st_size > 0
    assert "| Δ vs best sim. |" in markdown and "| ref |" in markdown  # pixel: the only one
    assert "best similarity baseline of the run (`pixel`, marked ref)" in markdown
    assert any(line.startswith("regime: nearest/second-nearest") for line in markdown.splitlines())
    assert (out / "leaderboard.elbo.png").stat().st_size > 0  # loss and ELBO by default
    header = markdown.split("## Target")[0]
    assert "preset smoke is a plumbing check" in header and "cannot rank methods" in header
    assert "ground truth: computed (or resumed) in the artifact store" in header
    assert [line for line in markdown.splitlines() if line.startswith("## ")] == [
        "## Target: diffusion loss",
        "## Target: ELBO",
    ]


def test_shows_the_paired_difference_to_the_best_similarity_baseline():
    summary = _summary()
    summary["similarity_reference"] = "pixel"
    summary["vs_similarity_mean"] = [-0.15, 0.2, np.nan, np.nan, 0.0]
    summary["vs_similarity_se"] = [0.05, 0.1, np.nan, np.nan, 0.0]
    markdown = leaderboard.leaderboard_markdown(summary, PROVENANCE, "p", regime="regime: line")
    rows = {r[1].split("`")[1]: r for r in _table_rows(markdown)[1:]}
    assert rows["kfac"][5] == "+20.0 ± 10.0" and rows["random"][5] == "-15.0 ± 5.0"
    assert rows["pixel"][5] == "ref" and len(rows["clip"]) == len(rows["kfac"])
    assert "\nregime: line\n" in markdown


def test_skip_leaves_methods_out_and_says_so(tiny_cache, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    out = tmp_path / "out"
    monkeypatch.setattr(leaderboard, "available_methods", lambda: ["random", "pixel", "kfac"])
    args = ["--preset", "smoke", *tiny_cli_args(), "--skip", "kfac", "--target", "loss"]
    status = leaderboard.main(
        [*args, "--out", str(out), "--cache-dir", str(cache), "--no-progress"]
    )
    assert status == 0
    markdown = (out / "leaderboard.md").read_text()
    names = [r[1] for r in _table_rows(markdown)]
    assert not any("`kfac`" in n for n in names) and any("`random`" in n for n in names)
    assert "Not run in this leaderboard (--skip): `kfac`" in markdown.split("## Target")[0]
    with pytest.raises(SystemExit) as exit_info:
        leaderboard.main(
            [*args[:-2], "--skip", "kfca", "--out", str(out), "--cache-dir", str(cache)]
        )
    assert exit_info.value.code == 2
