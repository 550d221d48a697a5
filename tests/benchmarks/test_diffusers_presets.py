"""Diffusers models in the benchmark pipeline (issue 14): keys, training, the store, the presets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks import lds
from benchmarks.cli import nest_overrides, parse_key_values
from benchmarks.errors import UsageError
from benchmarks.groundtruth import (
    EnsembleTask,
    ensemble_tasks,
    get_or_train_model,
    ground_truth_trainer,
    model_spec,
)
from benchmarks.pipeline import (
    base_model_spec,
    get_base_checkpoints,
    get_base_model,
    load_model,
    load_train_set,
)
from benchmarks.settings import Setting, get_preset
from benchmarks.store import ArtifactStore
from datasets import load_dataset
from diffusion.backends import DiffusersDenoiser, DiffusersUNetConfig, build_denoiser
from diffusion.train import TrainConfig, train_model
from diffusion.unet import count_parameters
from tests.benchmarks.tiny import TINY_OVERRIDES, tiny_setting
from tests.tiny_diffusers import DIFFUSERS_REASON, TINY_UNET2D

diffusers = pytest.importorskip("diffusers", reason=DIFFUSERS_REASON)

# quick-diffusers at tiny size: the tiny sizes with one seed, 4 and 8 channels, 50 noise levels.
TINY_QUICK_DIFFUSERS = {
    **TINY_OVERRIDES,
    "n_seeds": 1,
    "unet": {"block_out_channels": [4, 8], "norm_num_groups": 2},
    "schedule": {"num_timesteps": 50},
}

# github.com/BrunoKM/diffusion-influence, scripts/model_configs/unet_cifar2.json (commit
# c3fa7f7bb345b5f41394b09f9d8484cc5169f934), copied verbatim.
PAPER_UNET_CIFAR2_JSON = """{
  "_class_name": "UNet2DModel",
  "_diffusers_version": "0.0.4",
  "act_fn": "silu",
  "attention_head_dim": null,
  "block_out_channels": [
    128,
    256,
    256,
    256
  ],
  "center_input_sample": false,
  "down_block_types": [
    "DownBlock2D",
    "AttnDownBlock2D",
    "DownBlock2D",
    "DownBlock2D"
  ],
  "downsample_padding": 0,
  "flip_sin_to_cos": false,
  "freq_shift": 1,
  "in_channels": 3,
  "layers_per_block": 2,
  "mid_block_scale_factor": 1,
  "norm_eps": 1e-06,
  "norm_num_groups": 32,
  "out_channels": 3,
  "sample_size": 32,
  "dropout": 0.1,
  "time_embedding_type": "positional",
  "resnet_time_scale_shift": "scale_shift",
  "up_block_types": [
    "UpBlock2D",
    "UpBlock2D",
    "AttnUpBlock2D",
    "UpBlock2D"
  ]
}"""


def _tiny_diffusers_setting() -> Setting:
    """The tiny benchmark setting with the tiny ``UNet2DModel`` of tests/tiny_diffusers.py."""
    return tiny_setting().replace(unet=TINY_UNET2D)


def test_tiny_quick_diffusers_lds_runs_end_to_end(tmp_path):
    config = lds.LDSConfig(
        methods=("kfac", "random"),
        preset="quick-diffusers",
        overrides=TINY_QUICK_DIFFUSERS,
        cache_dir=str(tmp_path / "cache"),
        out=str(tmp_path / "out"),
        progress=False,
        threads=1,
        executor="local",  # no pool workers importing torch and diffusers again
    )
    result = lds.run(config)
    rows = result.summary.set_index("method")
    assert list(rows.loc[["kfac", "random"], "status"]) == ["ok", "ok"]
    assert np.isfinite(rows.loc[["kfac", "random"], "lds_mean"].to_numpy(dtype=float)).all()
    prepared = lds.prepare(config)  # everything is cached now: nothing is retrained
    model = prepared.experiment.model
    assert isinstance(model, DiffusersDenoiser)
    assert model.config.unet["block_out_channels"] == (4, 8)
    assert tuple(prepared.experiment.queries.images.shape) == (2, 1, 8, 8)


def test_backends_never_share_a_key(tmp_path):
    harness, diffusers_setting = tiny_setting(), _tiny_diffusers_setting()
    for part in ("base_model", "queries", "subset_model", "ground_truth"):
        assert harness.fingerprint(part)["unet"] != diffusers_setting.fingerprint(part)["unet"]
    unet = diffusers_setting.fingerprint("base_model")["unet"]
    assert unet == {"backend": "diffusers", "unet": json.loads(json.dumps(TINY_UNET2D.unet))}
    assert "backend" not in harness.fingerprint("base_model")["unet"]  # harness keys unchanged
    store = ArtifactStore(tmp_path)
    assert store.key("base-model", base_model_spec(harness)) != store.key(
        "base-model", base_model_spec(diffusers_setting)
    )


def test_diffusers_config_json_is_stable():
    listed = DiffusersUNetConfig(
        {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [4, 8]}
    )
    tupled = DiffusersUNetConfig(
        {"block_out_channels": (4, 8), "out_channels": 1, "in_channels": 1, "sample_size": 8}
    )
    assert listed == tupled and list(listed.unet) == sorted(listed.unet)
    setting = _tiny_diffusers_setting()
    assert Setting.from_dict(json.loads(json.dumps(setting.to_dict()))) == setting


def test_seeded_diffusers_init_is_reproducible_and_leaves_the_global_rng():
    state = torch.get_rng_state()
    first = build_denoiser(TINY_UNET2D, generator=torch.Generator().manual_seed(3))
    again = build_denoiser(TINY_UNET2D, generator=torch.Generator().manual_seed(3))
    other = build_denoiser(TINY_UNET2D, generator=torch.Generator().manual_seed(4))
    assert torch.equal(torch.get_rng_state(), state)
    weights = first.state_dict()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in weights.items())
    assert not torch.equal(
        weights["unet.conv_in.weight"], other.state_dict()["unet.conv_in.weight"]
    )
    # Diffusers' own initialisation under the global RNG seeded with the generator's first draw.
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=torch.Generator().manual_seed(3)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reference = diffusers.UNet2DModel(**TINY_UNET2D.unet)
    for name, value in reference.state_dict().items():
        assert torch.equal(weights[f"unet.{name}"], value), name


def test_diffusers_training_is_seeded_with_dropout_and_leaves_the_global_rng():
    config = DiffusersUNetConfig({**TINY_UNET2D.unet, "dropout": 0.5})
    images = load_dataset("digits2").images[:16]
    recipe = TrainConfig(steps=3, batch_size=8, lr=1e-3)
    state = torch.get_rng_state()
    runs = [train_model(images, config, recipe, seed=s) for s in (7, 7, 8)]
    assert torch.equal(torch.get_rng_state(), state)
    assert isinstance(runs[0], DiffusersDenoiser) and runs[0].unet.config.dropout == 0.5
    a, b, c = (run.state_dict() for run in runs)
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert not all(torch.equal(v, c[k]) for k, v in a.items())


def test_trained_diffusers_model_round_trips_through_the_store(tmp_path):
    setting = _tiny_diffusers_setting().replace(subset_train={"steps": 3})
    store = ArtifactStore(tmp_path / "cache")
    images = load_train_set(setting).images
    positions = np.arange(0, 24, 2)
    trained = train_model(
        images[torch.as_tensor(positions)],
        setting.unet,
        setting.subset_train,
        seed=5,
        schedule=setting.schedule,
    )
    stored = get_or_train_model(
        setting, store, images, positions, 5, "subset_model", device=torch.device("cpu")
    )
    loaded = load_model(store, "model", model_spec(setting, "subset_model", positions, 5), setting)
    for model in (stored, loaded):
        assert isinstance(model, DiffusersDenoiser) and not model.training
        assert model.state_dict().keys() == trained.state_dict().keys()
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in trained.state_dict().items())


def test_tracin_checkpoints_of_a_diffusers_base_model(tmp_path):
    setting = _tiny_diffusers_setting().replace(train={"steps": 4, "warmup_steps": 1})
    store, train_set = ArtifactStore(tmp_path / "cache"), load_train_set(setting)
    cpu = torch.device("cpu")
    base = get_base_model(setting, store, train_set, device=cpu, progress=False)
    checkpoints = get_base_checkpoints(
        setting, store, train_set.images, 2, device=cpu, progress=False
    )
    assert [type(model) for _, model in checkpoints] == [DiffusersDenoiser] * 2
    first, last = (model.state_dict() for _, model in checkpoints)
    assert all(torch.equal(v, last[k]) for k, v in base.state_dict().items())  # the base model
    assert not all(torch.equal(v, first[k]) for k, v in last.items())


def test_ground_truth_of_a_diffusers_model_trains_one_at_a_time(tmp_path):
    setting = _tiny_diffusers_setting()
    assert ground_truth_trainer(setting, 8) == "single"
    assert ground_truth_trainer(setting, None) == "single"
    assert ground_truth_trainer(tiny_setting(), 8) == "ensemble"  # the harness U-Net
    with pytest.raises(ValueError, match="harness U-Net without dropout .*DiffusersUNetConfig"):
        ensemble_tasks(setting, ArtifactStore(tmp_path), ["loss"])
    with pytest.raises(ValueError, match="use GroundTruthTask"):
        EnsembleTask(setting, str(tmp_path), None, ((0, 0),), ("loss",))


def test_set_overrides_unet2d_arguments_and_names_an_unknown_or_misfitting_one():
    preset = get_preset("quick-diffusers")
    overrides = nest_overrides(parse_key_values(["unet.block_out_channels=[16,32]"], "--set"))
    changed = preset.replace(**overrides)
    assert changed.unet.unet["block_out_channels"] == (16, 32)
    assert {k: v for k, v in changed.unet.unet.items() if k != "block_out_channels"} == {
        k: v for k, v in preset.unet.unet.items() if k != "block_out_channels"
    }
    bad = nest_overrides(parse_key_values(["unet.block_out_chanels=[16,32]"], "--set"))
    with pytest.raises(UsageError, match=r"\['block_out_chanels'\] is not an argument"):
        preset.replace(**bad)
    with pytest.raises(UsageError, match="not a JSON list"):
        parse_key_values(["unet.block_out_channels=[16,"], "--set")
    # Arguments that do not fit together are refused when the Setting is made, not when the
    # first model trains: three channel counts for two down blocks, and groups that do not
    # divide the channels.
    for wrong, why in (
        ("unet.block_out_channels=[16,16,16]", "same number of `block_out_channels`"),
        ("unet.norm_num_groups=5", "divisible by num_groups"),
    ):
        with pytest.raises(UsageError, match=f"UNet2DModel refuses these arguments: .*{why}"):
            preset.replace(**nest_overrides(parse_key_values([wrong], "--set")))


def test_quick_diffusers_is_quick_with_a_unet2d_model():
    quick, preset = get_preset("quick"), get_preset("quick-diffusers")
    images = load_dataset("digits2").images
    unet = preset.unet
    assert (unet.image_channels, unet.image_size, unet.image_size) == tuple(images.shape[1:])
    assert preset.replace(name="quick", unet=quick.unet) == quick  # only the model differs
    assert unet.unet["block_out_channels"] == (16, 16) and unet.dropout == 0.0
    model = build_denoiser(unet, generator=torch.Generator().manual_seed(0))
    assert count_parameters(model) == 80_401  # quick's U-Net: 72,113


def test_cifar2_paper_is_the_papers_unet2d_model_and_recipe():
    preset, cifar2 = get_preset("cifar2-paper"), get_preset("cifar2")
    paper = json.loads(PAPER_UNET_CIFAR2_JSON)
    assert preset.unet == DiffusersUNetConfig(paper)  # drops "_class_name", "_diffusers_version"
    assert len(preset.unet.unet) == len(paper) - 2
    model = build_denoiser(preset.unet, generator=torch.Generator().manual_seed(0))
    assert count_parameters(model) == 38_306_691
    assert preset.dataset == "cifar2" and preset.schedule == cifar2.schedule
    for recipe, steps in ((preset.train, 32_000), (preset.subset_train, 16_000)):
        assert recipe == TrainConfig(
            steps=steps,
            batch_size=128,
            lr=1e-4,
            lr_schedule="cosine",
            warmup_steps=steps // 10,
            grad_clip=1.0,
            hflip=True,
        )
    protocol = ("n_subsets", "n_seeds", "n_queries", "gt_mc_samples", "grad_mc_samples")
    assert [getattr(preset, f) for f in protocol] == [getattr(cifar2, f) for f in protocol]
    assert ground_truth_trainer(preset, 8) == "single"
