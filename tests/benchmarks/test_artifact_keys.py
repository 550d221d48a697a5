"""One source for every artifact key: ``Setting.fingerprint(part)`` (issue 11, item 2).

For every Setting field, changing it changes exactly the keys of the artifacts that depend on it
(the table below), through the real spec builders; and a real run after such a change
recomputes only those artifacts.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks import lds
from benchmarks.bundle import bundle_fingerprint
from benchmarks.groundtruth import ground_truth_seed, measurement_spec, model_spec, subset_masks
from benchmarks.pipeline import QuerySet, base_checkpoints_spec, base_model_spec, queries_spec
from benchmarks.runner import Experiment, build_method, method_context, subset_predictions_spec
from benchmarks.settings import FINGERPRINT_PARTS, Setting
from benchmarks.store import ArtifactStore, spec_key
from tests.benchmarks.tiny import TINY_OVERRIDES, tiny_setting

# ---------------------------------------------------------------- the table

ALL = frozenset(
    {
        "base-model",
        "base-checkpoints",
        "queries",
        "subset-model",
        "retrain-model",
        "measurement",
        "kfac-curvature",
        "trak-features",
        "subset-predictions",
        "ground-truth-bundle",
    }
)
"""Every stored artifact kind (a ground-truth measurement is one of a subset model), and a
ground-truth bundle (its fingerprint: what an imported bundle must match)."""
ORACLE = frozenset({"subset-predictions", "ground-truth-bundle"})
"""The exact-retraining oracle's predictions and the bundle holding them: they depend on every
Monte Carlo sample count a method's context offers."""
FROM_BASE_MODEL = ALL - {"subset-model"}
"""What the base model (its data, U-Net, recipe, schedule, seed) determines."""

CHANGES: dict[str, tuple[object, frozenset[str]]] = {
    # field: (a changed value, the artifact kinds whose keys change)
    "name": ("other", frozenset()),
    "dataset": ("digits", ALL),
    "n_train": (20, ALL),
    "unet": ({"base_channels": 4}, ALL),
    "train": ({"steps": 11}, FROM_BASE_MODEL),
    "subset_train": ({"steps": 11}, frozenset({"subset-model", "measurement", *ORACLE})),
    "n_queries": (3, frozenset({"queries", "measurement", *ORACLE})),
    "n_subsets": (5, ORACLE),  # the oracle predicts every subset; the bundle holds them all
    "n_seeds": (3, frozenset({"ground-truth-bundle"})),
    "gt_mc_samples": (9, frozenset({"measurement", *ORACLE})),
    "grad_mc_samples": (5, frozenset({"trak-features", *ORACLE})),
    "kfac_mc_samples": (5, frozenset({"kfac-curvature", *ORACLE})),
    "query_grad_mc_samples": (5, ORACLE),  # query gradients are never stored
    "subset_fraction": (0.25, frozenset({"subset-model", "measurement", *ORACLE})),
    "n_retrain_queries": (2, frozenset()),
    "retrain_fractions": ((0.05,), frozenset()),
    "method_options": ((("proj_dim", 256),), frozenset({"trak-features"})),
    "seed": (1, ALL),
    "schedule": ({"beta_end": 0.01}, ALL),
    # the subset models' training seeds (hence their keys and measurements) and the bundle
    "subset_seeds": ("shared", frozenset({"subset-model", "measurement", "ground-truth-bundle"})),
}

PARTS = {  # kind -> the fingerprint part its spec holds
    "base-model": "base_model",
    "base-checkpoints": "base_model",  # the base model's spec plus the checkpoint count
    "queries": "queries",
    "subset-model": "subset_model",
    "retrain-model": "retrain_model",
    "measurement": "measurement",
    "kfac-curvature": "base_model",  # MethodContext.train_spec
    "trak-features": "base_model",  # MethodContext.train_spec
    "subset-predictions": "subset_predictions",
    "ground-truth-bundle": "ground_truth",
}


# ---------------------------------------------------------------- the specs, built for real


def _context(setting: Setting, model: nn.Module):
    """The runner's method context, on stand-in tensors (the keys need no trained model)."""
    shape = (setting.unet.image_channels, setting.unet.image_size, setting.unet.image_size)
    queries = QuerySet(torch.zeros(setting.n_queries, *shape), None)
    experiment = Experiment(
        setting,
        ArtifactStore("/nonexistent-store"),  # never written: only keys are built
        model,
        torch.zeros(setting.n_train, *shape),
        queries,
        torch.device("cpu"),
        progress=False,
    )
    return method_context(experiment, "loss", "loss")


def artifact_specs(setting: Setting) -> dict[str, dict]:
    """kind -> the spec of one artifact of each kind, as the harness builds it.

    The subset model of subset 0, seed 0 (its positions and seed from ``subset_masks`` and
    ``ground_truth_seed``) and its ``loss`` measurement; a model retrained without example 0
    (seed: the setting's, as ``retrain.run_retrain_task``); K-FAC's curvature and TRAK's
    training features of a fixed stand-in model (the setting reaches them through the
    runner's ``MethodContext.train_spec``, the method options and sample counts).
    """
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ctx = _context(setting, model)
    options = dict(setting.method_options)
    kfac, trak = build_method("kfac", options), build_method("trak", options)
    positions = np.flatnonzero(subset_masks(setting.n_train, setting)[0])
    subset_model = model_spec(setting, "subset_model", positions, ground_truth_seed(setting, 0, 0))
    return {
        "base-model": base_model_spec(setting),
        "base-checkpoints": base_checkpoints_spec(setting, 4),
        "queries": queries_spec(setting, with_trajectories=False),
        "subset-model": subset_model,
        "retrain-model": model_spec(
            setting, "retrain_model", np.arange(1, setting.n_train), setting.seed
        ),
        "measurement": measurement_spec(spec_key("model", subset_model), setting, "loss"),
        "kfac-curvature": kfac._curvature_spec(ctx, model),
        "trak-features": trak._features_spec(ctx, model.state_dict(), trak.config.proj_dim, "cpu"),
        "subset-predictions": subset_predictions_spec(
            setting,
            "retrain",
            asdict(build_method("retrain", {}).config),
            measurement="loss",
            target="loss",
            masks=subset_masks(setting.n_train, setting),
            with_trajectories=False,
        ),
        "ground-truth-bundle": {"setting": bundle_fingerprint(setting)},
    }


def artifact_keys(setting: Setting) -> dict[str, str]:
    """kind -> the store key of that kind's artifact of :func:`artifact_specs`."""
    return {kind: spec_key(kind, spec) for kind, spec in artifact_specs(setting).items()}


def _setting_part(kind: str, spec: dict) -> dict:
    """The Setting's part of a spec (a method's: in its ``MethodContext.train_spec``)."""
    method_side = kind in ("kfac-curvature", "trak-features")
    return spec["train"]["setting"] if method_side else spec["setting"]


# ---------------------------------------------------------------- the properties


def test_the_table_covers_every_setting_field_and_every_kind():
    assert sorted(CHANGES) == sorted(f.name for f in dataclasses.fields(Setting))
    assert set(PARTS) == ALL and set(PARTS.values()) == set(FINGERPRINT_PARTS)


def test_every_key_takes_the_setting_only_from_its_fingerprint_part():
    setting = tiny_setting()
    specs = artifact_specs(setting)
    assert set(specs) == ALL
    for kind, spec in specs.items():
        assert _setting_part(kind, spec) == setting.fingerprint(PARTS[kind]), kind


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Setting)])
def test_changing_a_field_changes_exactly_the_keys_that_depend_on_it(field):
    base = tiny_setting()
    value, expected = CHANGES[field]
    changed = base.replace(**{field: value})
    assert getattr(changed, field) != getattr(base, field)
    before, after = artifact_keys(base), artifact_keys(changed)
    assert {kind for kind in ALL if before[kind] != after[kind]} == expected


def test_the_model_keys_depend_on_the_noise_schedule():
    """The bug of fingerprint version 1: ``--set schedule...`` reused every retrained model."""
    base = tiny_setting()
    changed = base.replace(schedule={"num_timesteps": 500})
    positions = np.arange(base.n_train)
    for part in ("subset_model", "retrain_model"):
        assert model_spec(base, part, positions, 0) != model_spec(changed, part, positions, 0)


# ---------------------------------------------------------------- a real run recomputes only those


def _entries(root: Path) -> dict[str, set[str]]:
    """kind -> stored keys; ``trak-features``: TRAK's work directories; plus ``trainings``."""
    store = ArtifactStore(root)
    entries = {kind: {e.key for e in store.list(kind)} for kind in store.kinds()}
    work = root / "_work" / "trak"
    entries["trak-features"] = {p.name for p in work.iterdir()} if work.is_dir() else set()
    log = root / "trainings.log"
    entries["trainings"] = set(log.read_text().splitlines()) if log.exists() else set()
    return entries


def _new(before: dict[str, set[str]], after: dict[str, set[str]]) -> dict[str, int]:
    """kind -> how many entries the run added."""
    return {k: len(v - before.get(k, set())) for k, v in after.items() if v - before.get(k, set())}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A fresh store after one tiny LDS run of kfac and trak (50 timesteps: quick sampling)."""
    root = tmp_path_factory.mktemp("keys") / "cache"
    overrides = {**TINY_OVERRIDES, "schedule": {"num_timesteps": 50}}
    _run_lds(root, overrides)
    return root, overrides


def _run_lds(root: Path, overrides: dict) -> None:
    config = lds.LDSConfig(
        methods=("kfac", "trak"),
        preset="smoke",
        overrides=overrides,
        cache_dir=str(root),
        out=str(root.parent / "out"),
        progress=False,
    )
    result = lds.run(config)
    assert (result.summary["status"] == "ok").all()


def test_a_new_n_queries_refits_nothing_of_the_training_side(first_run, tmp_path):
    root, overrides = first_run
    cache = tmp_path / "cache"
    shutil.copytree(root, cache)
    before = _entries(cache)
    n_models = len(before["model"])
    assert n_models == 4 * 2 and len(before["kfac-curvature"]) == len(before["trak-features"]) == 1
    _run_lds(cache, {**overrides, "n_queries": 3})
    # new queries and their measurements (every model measured again); nothing trained or fitted
    assert _new(before, _entries(cache)) == {"queries": 1, "measurement": n_models}


def test_a_new_schedule_retrains_the_base_and_subset_models(first_run, tmp_path):
    root, overrides = first_run
    cache = tmp_path / "cache"
    shutil.copytree(root, cache)
    before = _entries(cache)
    n_models = len(before["model"])
    _run_lds(cache, {**overrides, "schedule": {"num_timesteps": 40}})
    assert _new(before, _entries(cache)) == {
        "base-model": 1,
        "queries": 1,
        "model": n_models,
        "measurement": n_models,
        "kfac-curvature": 1,
        "trak-features": 1,
        "trainings": 1 + n_models,
    }
