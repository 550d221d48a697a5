"""Ground-truth bundles: export then import reproduces the LDS bitwise; bad bundles are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks import bundle, lds
from benchmarks.errors import UsageError
from benchmarks.pipeline import count_trainings
from benchmarks.settings import get_preset
from benchmarks.store import ArtifactStore
from tests.benchmarks.tiny import TINY_OVERRIDES, tiny_cli_args, tiny_setting

TARGETS = ("loss", "elbo")
METHODS = ("random", "pixel", "retrain")
COLUMNS = ["method", "target", "lds_mean", "lds_se", "ci_low", "ci_high"]


def _lds(cache: Path, out: Path, **kwargs) -> lds.LDSResult:
    return lds.run(
        lds.LDSConfig(
            methods=METHODS,
            preset="smoke",
            overrides=TINY_OVERRIDES,
            targets=TARGETS,
            cache_dir=str(cache),
            out=str(out),
            device="cpu",
            progress=False,
            **kwargs,
        )
    )


@pytest.fixture(scope="module")
def exported(tiny_cache, tmp_path_factory):
    """A store with the tiny ground truth and oracle, its LDS result, and its bundle."""
    root = tmp_path_factory.mktemp("bundle")
    cache = root / "cache"
    shutil.copytree(tiny_cache, cache)
    config = bundle.GroundTruthConfig(
        preset="smoke",
        overrides=TINY_OVERRIDES,
        targets=TARGETS,
        cache_dir=str(cache),
        export=str(root / "bundle"),
        device="cpu",
        progress=False,
    )
    bundle.run(config)
    result = _lds(cache, root / "out-a", recompute_ground_truth=True)
    return cache, root / "bundle", result


def _store_files(root: Path) -> dict[str, bytes]:
    """Every file of a store but its training log, with each entry's write time blanked.

    An entry's ``spec.json`` records when it was written (``created``, in whole seconds), so
    an entry re-imported a second later differs only there; everything else must be equal.
    """
    return {
        str(p.relative_to(root)): _without_write_time(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "trainings.log"
    }


def _without_write_time(path: Path) -> bytes:
    if path.name != "spec.json":
        return path.read_bytes()
    spec = json.loads(path.read_text())
    spec.pop("created")
    return json.dumps(spec, sort_keys=True).encode()


def test_import_in_a_fresh_store_reproduces_the_lds_bitwise_without_training(exported, tmp_path):
    _, path, expected = exported
    cache = tmp_path / "fresh"
    info = bundle.import_bundle(path, ArtifactStore(cache), tiny_setting())
    # 1 base model + 1 query set + 4 subsets x 2 seeds x 2 targets + 2 oracle rows
    assert (info.written, info.kept, info.targets) == (20, 0, TARGETS)
    result = _lds(cache, tmp_path / "out", ground_truth_bundle=str(path))
    assert count_trainings(ArtifactStore(cache)) == 0  # nothing retrained, nor the base model
    pd.testing.assert_frame_equal(result.summary[COLUMNS], expected.summary[COLUMNS])
    pd.testing.assert_frame_equal(result.per_query, expected.per_query)
    retrain = result.summary[result.summary["method"] == "retrain"]
    assert retrain["status"].eq("ok").all() and retrain["seconds"].gt(0).all()


def test_the_bundle_holds_the_stores_arrays_with_their_checksums(exported):
    cache, path, expected = exported
    manifest = json.loads((path / "manifest.json").read_text())
    values = np.load(path / "measurements.loss.npy")
    setting = tiny_setting()
    assert values.shape == (setting.n_seeds, setting.n_subsets, setting.n_queries)
    truth = lds.prepare(
        lds.LDSConfig(
            methods=("random",),
            preset="smoke",
            overrides=TINY_OVERRIDES,
            targets=("loss",),
            cache_dir=str(cache),
            device="cpu",
            progress=False,
            recompute_ground_truth=True,
        )
    ).truth
    np.testing.assert_array_equal(values, truth.values["loss"])
    np.testing.assert_array_equal(np.load(path / "subset_masks.npy"), truth.masks)
    for record in manifest["arrays"].values():
        data = (path / record["file"]).read_bytes()
        assert len(data) == record["bytes"]
    assert manifest["fingerprint"] == setting.fingerprint("ground_truth")
    assert "git_commit" in manifest["provenance"] and "stages" in manifest["provenance"]


def test_a_flipped_byte_is_refused_naming_the_file_and_array_and_the_store_is_untouched(
    exported, tmp_path
):
    _, path, _ = exported
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    file = broken / "measurements.elbo.npy"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x01
    file.write_bytes(bytes(data))
    store = ArtifactStore(tmp_path / "store")
    bundle.import_bundle(path, store, tiny_setting())  # a good import first: entries to keep
    before = _store_files(store.root)
    shutil.rmtree(store.root / "measurement")
    partial = _store_files(store.root)
    with pytest.raises(UsageError) as error:
        bundle.import_bundle(broken, store, tiny_setting())
    message = str(error.value)
    assert "measurements.elbo.npy" in message and "'measurements.elbo'" in message
    assert "sha256" in message and "python -m benchmarks.groundtruth" in message
    assert _store_files(store.root) == partial  # nothing written by the refused import
    bundle.import_bundle(path, store, tiny_setting())
    assert _store_files(store.root) == before


def test_a_bundle_of_another_setting_is_refused(exported, tmp_path):
    _, path, _ = exported
    other = tiny_setting().replace(gt_mc_samples=16)
    with pytest.raises(UsageError, match="gt_mc_samples"):
        bundle.import_bundle(path, ArtifactStore(tmp_path / "store"), other)
    assert not (tmp_path / "store").exists()


def test_a_store_entry_that_differs_is_never_overwritten(exported, tmp_path):
    _, path, _ = exported
    store = ArtifactStore(tmp_path / "store")
    bundle.import_bundle(path, store, tiny_setting())
    entry = next((store.root / "measurement").iterdir())
    spec = json.loads((entry / "spec.json").read_text())["spec"]
    store.delete("measurement", spec)
    store.save_arrays("measurement", spec, {"values": np.zeros(tiny_setting().n_queries)})
    before = _store_files(store.root)
    with pytest.raises(UsageError, match="differ from ground-truth bundle"):
        bundle.import_bundle(path, store, tiny_setting())
    assert _store_files(store.root) == before


def test_export_never_overwrites_a_bundle(exported):
    cache, path, _ = exported
    with pytest.raises(UsageError, match="exists"):
        bundle.export_bundle(ArtifactStore(cache), tiny_setting(), TARGETS, path, n_train=24)


def test_the_command_imports_a_bundle(exported, tmp_path):
    _, path, _ = exported
    args = ["--preset", "smoke", "--import", str(path), "--cache-dir", str(tmp_path / "c")]
    assert bundle.main([*args, *tiny_cli_args()]) == 0
    assert len(ArtifactStore(tmp_path / "c").list("measurement")) == 16


def test_the_lds_imports_the_shipped_bundle_and_says_so(exported, tmp_path, monkeypatch):
    _, path, expected = exported
    shipped = tmp_path / "repo" / "results" / "groundtruth"
    shutil.copytree(path, shipped / "smoke")
    monkeypatch.setattr(bundle, "SHIPPED_BUNDLES", shipped)
    result = _lds(tmp_path / "cache", tmp_path / "out")
    pd.testing.assert_frame_equal(result.summary[COLUMNS], expected.summary[COLUMNS])
    record = json.loads(result.files["record"].read_text())
    commit = json.loads((path / "manifest.json").read_text())["provenance"]["git_commit"]
    assert record["result"]["ground_truth"] == (
        f"shipped bundle results/groundtruth/smoke (commit {str(commit)[:12]})"
    )
    assert record["result"]["notes"][0].startswith("preset smoke is a plumbing check")
    assert count_trainings(ArtifactStore(tmp_path / "cache")) == 0


SHIPPED = sorted(p.name for p in bundle.SHIPPED_BUNDLES.iterdir() if p.is_dir())
"""The presets with a bundle in the repository (``results/groundtruth/<preset>``)."""


def test_quick_has_a_shipped_bundle():
    assert "quick" in SHIPPED, (
        "results/groundtruth/quick/ is missing (python -m benchmarks.groundtruth --preset quick "
        "--export results/groundtruth/quick)"
    )


@pytest.mark.parametrize("preset", SHIPPED)
def test_a_shipped_bundle_matches_its_preset(preset):
    """A preset change without a new bundle fails here (fingerprint, masks and store keys)."""
    path = bundle.shipped_bundle(preset)
    info = bundle.verify_bundle(path, get_preset(preset))
    assert set(info.targets) >= {"loss", "elbo"}
    size = sum(p.stat().st_size for p in path.iterdir())
    assert size <= 5 * 2**20, f"the shipped bundle is {size} bytes, more than 5 MB"
