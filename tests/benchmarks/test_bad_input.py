"""Bad input (issue 6): one clear message naming the fix, exit status 2, nothing lost.

Each case here is a row of the README's "Bad input" table.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from benchmarks import lds, retrain, runner
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
        (
            ["--option", "no_such_field=1"],
            ["--option no_such_field", "no selected method has", "kfac: ", "damping", "quantize"],
        ),
        (
            ["--method", "random", "--option", "damping=1e-3"],
            ["--option damping", "random: (none)"],
        ),
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


def test_retrain_option_no_method_has(capsys, tmp_path):
    message = _exit_message(
        capsys,
        retrain.main,
        ["--method", "random", "--option", "proj_dim=8", "--cache-dir", str(tmp_path)],
    )
    assert "--option proj_dim" in message and "random:" in message
    assert not (tmp_path / "base-model").exists()


REPO = Path(__file__).resolve().parents[2]


def test_a_bug_in_the_runner_keeps_its_traceback_and_exits_1(tmp_path):
    """A ValueError raised by the runner itself (not bad input) is a bug: it is not turned into
    the one-line usage format and exit status 2."""
    script = textwrap.dedent(
        f"""
        from benchmarks import lds, runner

        def broken_stage(*args, **kwargs):
            raise ValueError("internal bug in a runner stage")

        runner.load_train_set = broken_stage
        lds.main(["--preset", "smoke", "--method", "random", "--no-progress",
                  "--cache-dir", {str(tmp_path / "cache")!r}, "--out", {str(tmp_path)!r}])
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback (most recent call last)" in done.stderr
    assert "ValueError: internal bug in a runner stage" in done.stderr
    assert "error: internal bug" not in done.stderr  # not the usage format


def test_a_bug_in_the_runner_propagates_in_process(monkeypatch, tmp_path):
    def broken_stage(*args, **kwargs):
        raise ValueError("internal bug in a runner stage")

    monkeypatch.setattr(runner, "load_train_set", broken_stage)
    argv = ["--preset", "smoke", "--method", "random", "--cache-dir", str(tmp_path)]
    with pytest.raises(ValueError, match="internal bug"):
        lds.main(argv)


class _Raises(AttributionMethod):
    """A method with a bug: its score raises."""

    Config = _NoOptions

    def score(self, ctx):
        raise ValueError("bug inside the method")


def _tiny_config(tmp_path, tiny_cache, methods, **fields) -> LDSConfig:
    shutil.copytree(tiny_cache, tmp_path / "cache")  # the base model and the queries
    return LDSConfig(
        methods=methods,
        preset="smoke",
        overrides=TINY_OVERRIDES,
        cache_dir=str(tmp_path / "cache"),
        out=str(tmp_path / "out"),
        progress=False,
        threads=1,
        **fields,
    )


def test_a_failing_method_is_a_failed_cell_with_its_traceback(capsys, tmp_path, tiny_cache):
    register_method("test-raises")(_Raises)
    try:
        result = lds.run(_tiny_config(tmp_path, tiny_cache, ("test-raises", "random")))
    finally:
        REGISTRY.remove("test-raises")
    rows = result.summary.set_index("method")
    assert rows.loc["test-raises", "status"] == "failed"
    assert rows.loc["test-raises", "reason"] == "ValueError: bug inside the method"
    assert rows.loc["random", "status"] == "ok"
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert 'raise ValueError("bug inside the method")' in err


@dataclass(frozen=True)
class _QuantizeOptions:
    """Options like K-FAC's: a damping and a query-gradient quantisation (default int8)."""

    damping: float = 1e-3
    quantize: str | None = "int8"


class _Quantized(AttributionMethod):
    """Fixed scores; records each configuration it scores with."""

    Config = _QuantizeOptions
    calls: Counter = Counter()

    def score(self, ctx):
        type(self).calls[(self.config.damping, self.config.quantize)] += 1
        return np.random.default_rng(0).normal(size=(ctx.n_queries, ctx.n_train))


def test_compression_ablation_evaluates_each_cell_once(tmp_path, tiny_cache):
    register_method("test-quantized")(_Quantized)
    _Quantized.calls.clear()
    try:
        config = _tiny_config(
            tmp_path, tiny_cache, ("test-quantized",), damping=0.5, compression_ablation=True
        )
        result = lds.run(config)
    finally:
        REGISTRY.remove("test-quantized")
    assert _Quantized.calls == {(0.5, None): 1, (0.5, "int16"): 1, (0.5, "int8"): 1}
    rows = result.summary[result.summary["method"] == "test-quantized"]
    assert rows["bits"].isna().sum() == 1  # the plain row (the default, int8) ...
    assert sorted(rows["bits"].dropna()) == [8, 16, 32]  # ... and one row per bit width
    plain = rows[rows["bits"].isna()].iloc[0]
    int8 = rows[rows["bits"] == 8].iloc[0]
    assert plain["lds_mean"] == int8["lds_mean"]
