"""Bad input (issue 6): one clear message naming the fix, exit status 2, nothing lost.

Each case here is a row of the README's "Bad input" table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from benchmarks import lds, retrain
from benchmarks.lds import LDSConfig
from methods import AttributionMethod
from methods.registry import REGISTRY, register_method
from tests.benchmarks.tiny import TINY_OVERRIDES, tiny_cli_args


def _exit_message(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--method", "kfca"], ["unknown method 'kfca'", "Did you mean 'kfac'", "trak"]),
        (["--target", "los"], ["los", "loss, elbo"]),
        (["--measurement", "elbow"], ["elbow", "loss, elbo"]),
        (["--preset", "quik"], ["unknown preset 'quik'", "smoke, quick", "'quick'"]),
        (["--set", "dataset=mnist"], ["mnist", "digits2"]),
        (["--set", "n_subsetz=3"], ["n_subsetz", "n_subsets"]),
        (["--damping", "-1"], ["damping must be a finite number > 0"]),
        (["--damping", "nan"], ["damping must be a finite number > 0"]),
        (["--damping", "abc"], ["invalid float value: 'abc'"]),
        (["--option", "proj_dim"], ["--option takes KEY=VALUE"]),
    ],
)
def test_lds_usage_errors(capsys, tmp_path, argv, expected):
    message = _exit_message(
        capsys, lds.main, [*argv, "--cache-dir", str(tmp_path), "--out", str(tmp_path)]
    )
    for text in expected:
        assert text in message, message
    assert not (tmp_path / "base-model").exists()  # rejected before any work


@pytest.mark.parametrize("fraction", ["1.5", "0", "-0.1"])
def test_retrain_fraction_outside_unit_interval(capsys, tmp_path, fraction):
    message = _exit_message(
        capsys, retrain.main, ["--fraction", fraction, "--cache-dir", str(tmp_path)]
    )
    assert "--fraction must lie in (0, 1)" in message


def test_cifar_directory_without_data(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    message = _exit_message(
        capsys,
        lds.main,
        ["--preset", "cifar2", "--data-dir", str(empty), "--cache-dir", str(tmp_path / "c")],
    )
    assert "--data-dir" in message and "cifar-10-batches-py" in message


@dataclass(frozen=True)
class _NoOptions:
    """No options."""


class _NaNScores(AttributionMethod):
    """Returns NaN scores (a broken method)."""

    Config = _NoOptions

    def score(self, ctx):
        return np.full((ctx.n_queries, ctx.n_train), np.nan)


@pytest.fixture
def nan_method():
    register_method("test-nan-scores")(_NaNScores)
    yield "test-nan-scores"
    REGISTRY.remove("test-nan-scores")


def test_nan_scores_are_a_failed_cell_and_the_table_is_written(tmp_path, nan_method):
    config = LDSConfig(
        methods=(nan_method, "random"),
        preset="smoke",
        overrides=TINY_OVERRIDES,
        cache_dir=str(tmp_path / "cache"),
        out=str(tmp_path / "out"),
        progress=False,
        threads=1,
    )
    result = lds.run(config)
    rows = result.summary.set_index("method")
    assert rows.loc[nan_method, "status"] == "failed"
    assert "non-finite" in rows.loc[nan_method, "reason"]
    assert rows.loc["random", "status"] == "ok"
    assert result.files["summary"].exists()


def _run_tiny(capsys, tmp_path):
    argv = [
        "--preset",
        "smoke",
        *tiny_cli_args(),
        "--method",
        "random",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
    ]
    return argv


def test_mismatched_and_corrupt_cache_entries(capsys, tmp_path):
    argv = _run_tiny(capsys, tmp_path)
    assert lds.main(argv) == 0
    capsys.readouterr()
    entry = next((tmp_path / "cache" / "base-model").iterdir())
    sidecar = entry / "spec.json"
    original = sidecar.read_text()
    document = json.loads(original)
    document["spec"]["seed"] = 12345  # an entry stored for another configuration
    sidecar.write_text(json.dumps(document))
    message = _exit_message(capsys, lds.main, argv)
    assert str(entry) in message and "seed" in message and "delete" in message
    assert sidecar.exists()  # nothing deleted automatically

    sidecar.write_text(original)
    payload = next(p for p in entry.iterdir() if p.name != "spec.json")
    payload.write_bytes(payload.read_bytes()[:-7])  # truncated weights
    message = _exit_message(capsys, lds.main, argv)
    assert str(entry) in message
    assert len(list((tmp_path / "cache" / "model").iterdir())) == 8  # all kept
