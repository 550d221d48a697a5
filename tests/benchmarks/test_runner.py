"""The method runner (benchmarks.runner): outcomes of a method run, building methods, and the
input check every runner does first."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from benchmarks.cli import UsageError
from benchmarks.pipeline import (
    count_trainings,
    get_base_checkpoints,
    get_base_model,
    get_queries,
    load_train_set,
)
from benchmarks.runner import (
    Experiment,
    build_method,
    check_options,
    method_context,
    method_options,
    prepare_run,
    run_method,
)
from benchmarks.store import ArtifactStore
from methods import AttributionMethod, UnknownMethodError, get_method
from methods.registry import REGISTRY, register_method
from tests.benchmarks.tiny import TINY_OVERRIDES, tiny_setting

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def experiment(tiny_cache) -> Experiment:
    setting = tiny_setting()
    store = ArtifactStore(tiny_cache)  # read only: these method runs store nothing
    train_set = load_train_set(setting)
    model = get_base_model(setting, store, train_set, device=CPU, progress=False)
    queries = get_queries(setting, store, model, device=CPU, progress=False)
    return Experiment(setting, store, model, train_set.images, queries, CPU, progress=False)


@dataclass(frozen=True)
class _NoOptions:
    """No options."""


class _NaNScores(AttributionMethod):
    """A broken method: NaN scores."""

    Config = _NoOptions

    def score(self, ctx):
        return np.full((ctx.n_queries, ctx.n_train), np.nan)


class _NoWeights(AttributionMethod):
    """A method that cannot run here."""

    Config = _NoOptions

    def availability(self):
        return False, "no weights here; pass --option weights=PATH"

    def score(self, ctx):  # pragma: no cover - never called when unavailable
        raise AssertionError("an unavailable method must not be run")


@pytest.fixture
def registered():
    names = {"test-runner-nan": _NaNScores, "test-runner-unavailable": _NoWeights}
    for name, cls in names.items():
        register_method(name)(cls)
    yield names
    for name in names:
        REGISTRY.remove(name)


def test_run_method_ok(experiment):
    outcome = run_method(experiment, "random", {}, measurement="loss", target="loss")
    assert (outcome.status, outcome.reason) == ("ok", "")
    assert outcome.scores.shape == (2, 24) and outcome.scores.dtype == np.float64
    assert outcome.predictions is None and outcome.measurement == "loss"
    assert outcome.seconds >= 0 and outcome.peak_memory_mb >= 0
    again = run_method(experiment, "random", {}, measurement="loss", target="loss")
    np.testing.assert_array_equal(outcome.scores, again.scores)  # seeded by the setting


def test_run_method_unavailable(experiment, registered):
    outcome = run_method(
        experiment, "test-runner-unavailable", {}, measurement="loss", target="loss"
    )
    assert outcome.status == "unavailable" and "no weights here" in outcome.reason
    assert outcome.scores is None
    # A subset-prediction method without subsets is unavailable too, not a crash.
    oracle = run_method(experiment, "retrain", {}, measurement="loss", target="loss")
    assert oracle.status == "unavailable" and "needs training subsets" in oracle.reason


def test_run_method_failed_on_nan_scores(experiment, registered):
    outcome = run_method(experiment, "test-runner-nan", {}, measurement="loss", target="loss")
    assert outcome.status == "failed"
    assert "48 non-finite values" in outcome.reason and "damping" in outcome.reason


def test_run_method_bad_config_is_a_failed_cell(experiment):
    outcome = run_method(
        experiment, "retrain", {"seed_offset": -1}, measurement="loss", target="loss"
    )
    assert outcome.status == "failed" and outcome.config == {}
    assert outcome.reason.startswith("bad configuration:") and "seed_offset" in outcome.reason


def test_tracin_runs_on_the_stored_base_checkpoints(experiment, tiny_cache, tmp_path):
    shutil.copytree(tiny_cache, tmp_path / "cache")
    store = ArtifactStore(tmp_path / "cache")
    writable = replace(experiment, store=store)
    outcome = run_method(
        writable, "tracin", {"n_checkpoints": 2}, measurement="loss", target="loss"
    )
    assert (outcome.status, outcome.reason) == ("ok", "")
    trainings = count_trainings(store)
    checkpoints = get_base_checkpoints(
        experiment.setting, store, experiment.train_images, 2, device=CPU
    )
    assert count_trainings(store) == trainings  # stored by the run, reused here
    ctx = method_context(writable, "loss", "loss")
    grad_dot = get_method("grad-dot").build(quantize=None)
    expected = sum(lr * 24 * grad_dot.score(replace(ctx, model=m)) for lr, m in checkpoints)
    np.testing.assert_allclose(outcome.scores, expected, rtol=1e-10, atol=0)


def test_build_method_ignores_options_its_config_lacks():
    method = build_method("retrain", {"seed_offset": 7, "proj_dim": 4096, "damping": 1e-3})
    assert method.config.seed_offset == 7
    assert not hasattr(method.config, "proj_dim") and not hasattr(method.config, "damping")
    assert build_method("random", {"damping": 1e-3}).config == build_method("random", {}).config


@pytest.fixture
def restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def test_prepare_run_resolves_and_validates_names(restore_threads):
    setting, device = prepare_run(
        "smoke", TINY_OVERRIDES, ("loss", "elbo"), ("kfac", "random"), "cpu", 1
    )
    assert setting == tiny_setting() and device == CPU and torch.get_num_threads() == 1
    with pytest.raises(UnknownMethodError, match="kfca"):
        prepare_run("smoke", {}, ("loss",), ("kfca",), "cpu", 1)
    with pytest.raises(ValueError, match="los"):
        prepare_run("smoke", {}, ("los",), ("kfac",), "cpu", 1)
    with pytest.raises(ValueError, match="quik"):
        prepare_run("quik", {}, ("loss",), ("kfac",), "cpu", 1)
    with pytest.raises(ValueError, match="n_subsetz"):
        prepare_run("smoke", {"n_subsetz": 3}, ("loss",), ("kfac",), "cpu", 1)


def test_prepare_run_raises_usage_errors_for_bad_input(restore_threads):
    """Bad input is a UsageError (exit status 2 in the CLIs); other ValueErrors are bugs."""
    with pytest.raises(UsageError, match="los"):
        prepare_run("smoke", {}, ("los",), ("kfac",), "cpu", 1)
    with pytest.raises(UsageError, match="quik"):
        prepare_run("quik", {}, ("loss",), ("kfac",), "cpu", 1)
    with pytest.raises(UsageError, match="n_subsetz"):
        prepare_run("smoke", {"n_subsetz": 3}, ("loss",), ("kfac",), "cpu", 1)
    with pytest.raises(UsageError, match="n_subsets must be an int >= 3"):
        prepare_run("smoke", {"n_subsets": 2}, ("loss",), ("kfac",), "cpu", 1)
    with pytest.raises(UsageError, match="--device gpu"):
        prepare_run("smoke", {}, ("loss",), ("kfac",), "gpu", 1)


def test_prepare_run_checks_each_option_belongs_to_a_selected_method(restore_threads):
    setting, _ = prepare_run(
        "smoke", {}, ("loss",), ("kfac", "random"), "cpu", 1, {"damping": 1e-3, "quantize": None}
    )
    assert setting.name == "smoke"
    with pytest.raises(UsageError, match="--option proj_dim") as info:
        prepare_run("smoke", {}, ("loss",), ("kfac", "random"), "cpu", 1, {"proj_dim": 8})
    assert f"kfac: {', '.join(method_options('kfac'))}" in str(info.value)
    assert "random: (none)" in str(info.value)
    with pytest.raises(UnknownMethodError, match="kfca"):
        check_options({"damping": 1.0}, ("kfca",))


def test_the_oracle_on_a_process_pool_equals_its_in_process_loop_and_resumes(tiny_cache, tmp_path):
    """Exact retraining through ``MethodContext.retrain_many`` (the experiment's executor, here
    a 2-process pool) gives bitwise the predictions of the in-process loop over ``train_fn`` and
    ``measure_fn`` (no executor). Every oracle model and measurement is stored under its own key:
    predicting one more subset afterwards trains one model."""
    import shutil

    from benchmarks.executors import PoolExecutor
    from benchmarks.groundtruth import subset_masks
    from benchmarks.pipeline import count_trainings

    def oracle(experiment, masks):
        run = run_method(experiment, "retrain", {}, measurement="loss", target="loss", masks=masks)
        assert run.status == "ok", run.reason
        return run.predictions

    predictions = {}
    for name, executor in (("loop", None), ("pool", PoolExecutor(workers=2, progress=False))):
        root = tmp_path / name
        shutil.copytree(tiny_cache, root)
        setting, store = tiny_setting(), ArtifactStore(root)
        train_set = load_train_set(setting)
        model = get_base_model(setting, store, train_set, device=CPU, progress=False)
        queries = get_queries(setting, store, model, device=CPU, progress=False)
        experiment = Experiment(
            setting, store, model, train_set.images, queries, CPU, False, None, executor
        )
        masks = subset_masks(len(train_set), setting)
        before = count_trainings(store)
        predictions[name] = oracle(experiment, masks[:3])
        assert count_trainings(store) - before == 3
        if executor is not None:
            more = oracle(experiment, masks[:4])
            assert count_trainings(store) - before == 4
            np.testing.assert_array_equal(more[:3], predictions[name])
    assert predictions["loop"].shape == (3, 2)
    np.testing.assert_array_equal(predictions["pool"], predictions["loop"])


def test_the_oracle_entry_keys_on_trajectories_only_for_a_target_that_reads_them(
    tiny_cache, tmp_path
):
    """A run whose queries carry trajectories (e.g. for journey-trak) stores the oracle's loss
    predictions under the same key as a run without them (the images are the same), so a
    shipped bundle's oracle entry is reused rather than retrained."""
    import shutil

    from benchmarks.groundtruth import subset_masks
    from benchmarks.runner import subset_predictions_spec

    shutil.copytree(tiny_cache, tmp_path / "c")
    setting, store = tiny_setting(), ArtifactStore(tmp_path / "c")
    train_set = load_train_set(setting)
    model = get_base_model(setting, store, train_set, device=CPU, progress=False)
    queries = get_queries(setting, store, model, device=CPU, progress=False, with_trajectories=True)
    assert queries.trajectories is not None
    experiment = Experiment(setting, store, model, train_set.images, queries, CPU, progress=False)
    masks = subset_masks(len(train_set), setting)[:1]
    run = run_method(experiment, "retrain", {}, measurement="loss", target="loss", masks=masks)
    assert run.status == "ok", run.reason

    def key(with_trajectories: bool) -> dict:
        return subset_predictions_spec(
            setting,
            "retrain",
            run.config,
            measurement="loss",
            target="loss",
            masks=masks,
            with_trajectories=with_trajectories,
        )

    assert store.exists("subset-predictions", key(False))
    assert not store.exists("subset-predictions", key(True))
