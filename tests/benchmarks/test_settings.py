"""Tests of the Setting dataclass, its presets, fingerprints and overrides."""

from __future__ import annotations

import dataclasses
import json

import pytest

from benchmarks.settings import FINGERPRINT_PARTS, PRESETS, Setting, get_preset
from benchmarks.store import spec_key
from diffusion.schedule import NoiseSchedule
from diffusion.train import TrainConfig
from diffusion.unet import UNet, UNetConfig, count_parameters


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate_and_round_trip_through_json(name):
    setting = get_preset(name)
    assert setting.name == name
    text = json.dumps(setting.to_dict(), allow_nan=False)
    rebuilt = Setting.from_dict(json.loads(text))
    assert rebuilt == setting
    # Re-validation from scratch (all fields through __post_init__ again).
    assert Setting(**{f.name: getattr(setting, f.name) for f in dataclasses.fields(setting)})


def test_preset_names():
    assert list(PRESETS) == [
        "smoke",
        "quick",
        "translate",
        "quick-diffusers",
        "cifar2",
        "cifar2-paper",
        "cifar10",
    ]
    with pytest.raises(TypeError):
        PRESETS["mine"] = get_preset("quick")  # read-only


def test_paper_presets_follow_appendix_g():
    for name, full, schedule in (("cifar2", 32_000, "cosine"), ("cifar10", 160_000, "constant")):
        s = get_preset(name)
        assert s.dataset == name and s.n_train is None
        assert s.unet == UNetConfig.cifar()
        assert (s.train.steps, s.subset_train.steps) == (full, full // 2)  # App. G.7
        for cfg in (s.train, s.subset_train):
            assert (cfg.batch_size, cfg.lr, cfg.lr_schedule) == (128, 2e-4, schedule)
            assert cfg.hflip and cfg.grad_clip == 1.0
        assert (s.n_subsets, s.n_seeds, s.n_queries, s.subset_fraction) == (100, 5, 200, 0.5)
        assert s.gt_mc_samples == 5000  # App. G.5
        assert s.grad_mc_samples == s.kfac_mc_samples == s.query_grad_mc_samples == 250
        assert (s.n_retrain_queries, s.retrain_fractions) == (5, (0.02, 0.10))  # App. G.6
        assert s.schedule == NoiseSchedule(1000, 1e-4, 0.02)


def test_quick_and_smoke_sizes():
    quick, smoke = get_preset("quick"), get_preset("smoke")
    assert quick.dataset == "digits2" and quick.n_train is None
    assert quick.unet == UNetConfig.tiny()
    assert (quick.train.steps, quick.train.batch_size) == (1500, 64)
    assert (quick.n_subsets, quick.n_seeds, quick.n_queries) == (32, 2, 32)
    assert (quick.gt_mc_samples, quick.grad_mc_samples) == (256, 64)
    assert smoke.schedule.num_timesteps == 1000
    assert smoke.train.steps <= 200 and smoke.n_queries == 4 and smoke.n_seeds == 1
    assert smoke.n_subsets == 6 and smoke.gt_mc_samples <= 32
    n_smoke = count_parameters(UNet(smoke.unet))
    assert n_smoke < count_parameters(UNet(quick.unet)) and n_smoke < 30_000


def test_unknown_preset_lists_names_and_closest():
    with pytest.raises(ValueError) as info:
        get_preset("quik")
    message = str(info.value)
    for name in PRESETS:
        assert name in message
    assert "Did you mean 'quick'" in message


def test_base_model_fingerprint_ignores_benchmark_sizes():
    s = get_preset("quick")
    base = s.fingerprint("base_model")
    changed = s.replace(name="other", n_subsets=64, n_seeds=5, gt_mc_samples=7, grad_mc_samples=3)
    assert changed.fingerprint("base_model") == base
    assert spec_key("base-model", changed.fingerprint("base_model")) == spec_key("base-model", base)
    for part in set(FINGERPRINT_PARTS) - {"ground_truth"}:  # a bundle holds all M x K
        assert s.replace(n_subsets=64, n_seeds=5).fingerprint(part) == s.fingerprint(part), part
    # ... but everything that determines the base model does change it.
    for override in (
        {"seed": 1},
        {"train": {"steps": 1499}},
        {"train": {"lr": 1.0000001e-3}},
        {"n_train": 100},
        {"schedule": {"beta_end": 0.03}},
        {"unet": {"base_channels": 8}},
    ):
        assert s.replace(**override).fingerprint("base_model") != base, override
    assert s.replace(subset_train={"steps": 100}).fingerprint("base_model") == base
    assert s.replace(subset_train={"steps": 100}).fingerprint("subset_model") != s.fingerprint(
        "subset_model"
    )
    assert s.replace(gt_mc_samples=7).fingerprint("measurement") != s.fingerprint("measurement")


def test_fingerprint_contents_and_unknown_part():
    s = get_preset("smoke")
    fp = s.fingerprint("base_model")
    assert set(fp) == {*FINGERPRINT_PARTS["base_model"], "fingerprint_version"}
    assert fp["train"]["steps"] == s.train.steps and "name" not in fp
    json.dumps(fp, allow_nan=False)
    with pytest.raises(ValueError, match="known parts: base_model"):
        s.fingerprint("base-model")


def test_replace_nested_and_unknown_fields():
    s = get_preset("quick")
    r = s.replace(train={"steps": 100}, n_subsets=8)
    assert r.train == dataclasses.replace(s.train, steps=100) and r.n_subsets == 8
    assert r.unet is s.unet and s.train.steps == 1500  # original untouched
    assert s.replace(unet=UNetConfig.tiny()).unet == UNetConfig.tiny()
    with pytest.raises(ValueError, match="Did you mean 'n_subsets'"):
        s.replace(n_subset=8)
    with pytest.raises(ValueError, match=r"Setting\.train fields \['stepz'\]"):
        s.replace(train={"stepz": 8})
    with pytest.raises(ValueError, match="n_subsets"):
        s.replace(n_subsets=2)  # re-validated
    with pytest.raises(ValueError, match=r"Setting\.train: steps must be a positive int"):
        s.replace(train={"steps": 0})  # TrainConfig's own validation, located


@pytest.mark.parametrize(
    "override, fragment",
    [
        ({"name": ""}, "name"),
        ({"dataset": "cifar3"}, "Did you mean 'cifar"),
        ({"dataset": "cifar2"}, "image_channels"),  # tiny 8x8x1 U-Net on 32x32x3 images
        ({"n_train": 1}, "n_train"),
        ({"n_train": 10.0}, "n_train"),
        ({"unet": "tiny"}, "Setting.unet must be a UNetConfig"),
        ({"train": TrainConfig(), "subset_train": None}, "subset_train"),
        ({"schedule": 1000}, "schedule"),
        ({"n_queries": 0}, "n_queries"),
        ({"n_subsets": 2}, "n_subsets"),
        ({"n_seeds": 0}, "n_seeds"),
        ({"gt_mc_samples": 1.5}, "gt_mc_samples"),
        ({"grad_mc_samples": 0}, "grad_mc_samples"),
        ({"kfac_mc_samples": True}, "kfac_mc_samples"),
        ({"query_grad_mc_samples": -1}, "query_grad_mc_samples"),
        ({"subset_fraction": 1.0}, "subset_fraction"),
        ({"subset_fraction": 0.0}, "subset_fraction"),
        ({"n_retrain_queries": 33}, "n_retrain_queries"),
        ({"retrain_fractions": ()}, "retrain_fractions"),
        ({"retrain_fractions": (0.1, 0.1)}, "retrain_fractions"),
        ({"retrain_fractions": (1.5,)}, "retrain_fractions"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(override, fragment):
    with pytest.raises(ValueError, match=fragment):
        dataclasses.replace(get_preset("quick"), **override)


def test_from_dict_rejects_unknown_fields():
    data = get_preset("smoke").to_dict()
    data["n_subset"] = 3
    with pytest.raises(ValueError, match="Did you mean 'n_subsets'"):
        Setting.from_dict(data)
