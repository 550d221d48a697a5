"""Tests of diffusion/ensemble.py: every member of a vmapped ensemble follows its own
``train_model`` run (float64: to ~1e-12; float32: to rounding), independently of the other
members, and invalid inputs are refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from diffusion.ensemble import train_ensemble
from diffusion.schedule import NoiseSchedule
from diffusion.train import TrainConfig, _epoch_batches, diffusion_loss, learning_rate, train_model
from diffusion.unet import UNet, UNetConfig

SMALL = dataclasses.replace(UNetConfig.tiny(), base_channels=8)  # 18,521 parameters
SCHEDULE = NoiseSchedule(num_timesteps=50)
# Clipping at 0.05 is active at every step (checked below); cosine decay after 2 warmup steps.
RECIPE = TrainConfig(
    steps=5,
    batch_size=16,
    lr=3e-3,
    lr_schedule="cosine",
    warmup_steps=2,
    grad_clip=0.05,
    hflip=True,
    weight_decay=1e-3,
)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """40 random images in [-1, 1], [40, 1, 8, 8]."""
    return torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(scope="module")
def subsets() -> list[torch.Tensor]:
    """Three different (overlapping) 24-image subsets of the 40 images, unsorted."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randperm(40, generator=gen)[:24] for _ in range(3)]


def _reference_train(
    images: torch.Tensor,
    unet_config: UNetConfig,
    config: TrainConfig,
    seed: int,
    schedule: NoiseSchedule,
    dtype: torch.dtype,
) -> tuple[UNet, list[float]]:
    """``train_model``'s loop written out with a dtype (independent of diffusion/ensemble.py).

    Returns the model and the pre-clipping gradient norm of every step.
    """
    master = torch.Generator().manual_seed(seed)
    init_seed, index_seed, data_seed, _ = torch.randint(0, 2**62, (4,), generator=master).tolist()
    data_gen = torch.Generator().manual_seed(data_seed)
    model = UNet(unet_config, generator=torch.Generator().manual_seed(init_seed)).to(dtype).train()
    optimizer = torch.optim.Adam(
        model.parameters(), lr=learning_rate(config, 0), weight_decay=config.weight_decay
    )
    data = images.to(dtype)  # [N, C, H, W]
    batches = _epoch_batches(
        data.shape[0], config.batch_size, torch.Generator().manual_seed(index_seed)
    )
    norms = []
    for step in range(config.steps):
        x0 = data[next(batches)]  # [B, C, H, W]
        if config.hflip:
            flip = torch.rand(x0.shape[0], generator=data_gen) < 0.5  # [B]
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), generator=data_gen)  # [B]
        eps = torch.randn(x0.shape, generator=data_gen, dtype=dtype)  # [B, C, H, W]
        loss = diffusion_loss(model, schedule, x0, t, eps).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norms.append(nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip).item())
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        optimizer.step()
    return model.eval(), norms


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(
        (p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def _states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_reference_loop_is_train_model(images: torch.Tensor) -> None:
    """The float64 reference below is trustworthy: in float32 it IS train_model, bitwise."""
    ref, _ = _reference_train(images[:24], SMALL, RECIPE, 7, SCHEDULE, torch.float32)
    model = train_model(images[:24], SMALL, RECIPE, seed=7, schedule=SCHEDULE)
    assert _states_equal(ref, model)


def test_float64_members_match_their_sequential_runs(
    images: torch.Tensor, subsets: list[torch.Tensor]
) -> None:
    """The exactness test: 3 members on different subsets, clipping active, cosine schedule."""
    seeds = [11, 22, 33]
    members = train_ensemble(
        images, subsets, SMALL, RECIPE, seeds=seeds, schedule=SCHEDULE, dtype=torch.float64
    )
    refs = []
    for subset, seed in zip(subsets, seeds, strict=True):
        ref, norms = _reference_train(images[subset], SMALL, RECIPE, seed, SCHEDULE, torch.float64)
        assert min(norms) > RECIPE.grad_clip  # clipping scaled every step
        refs.append(ref)
    for k, member in enumerate(members):
        assert member.conv_in.weight.dtype == torch.float64 and not member.training
        assert _max_diff(member, refs[k]) < 1e-10
        for other in range(len(refs)):  # member k is seed k's model, not another one's
            if other != k:
                assert _max_diff(member, refs[other]) > 1e-2
    # Same seed on another subset gives another model (the subset is really used).
    other_subset, _ = _reference_train(
        images[subsets[1]], SMALL, RECIPE, seeds[0], SCHEDULE, torch.float64
    )
    assert _max_diff(members[0], other_subset) > 1e-4


def test_float32_agrees_with_train_model_to_rounding(
    images: torch.Tensor, subsets: list[torch.Tensor]
) -> None:
    """3 steps in float32: each member equals its own train_model run up to rounding (the
    steps move the weights by ~1e-2; measured difference ~1e-7)."""
    recipe = dataclasses.replace(RECIPE, steps=3, warmup_steps=0)
    seeds = [5, 6]
    members = train_ensemble(images, subsets[:2], SMALL, recipe, seeds=seeds, schedule=SCHEDULE)
    singles = [
        train_model(images[s], SMALL, recipe, seed=seed, schedule=SCHEDULE)
        for s, seed in zip(subsets[:2], seeds, strict=True)
    ]
    for k in range(2):
        assert members[k].conv_in.weight.dtype == torch.float32
        assert _max_diff(members[k], singles[k]) < 1e-5
        assert _max_diff(members[k], singles[1 - k]) > 1e-2


def test_member_does_not_depend_on_the_other_members(
    images: torch.Tensor, subsets: list[torch.Tensor]
) -> None:
    """Bitwise (float32): member (subset 0, seed 3) alone, in a pair and in a trio."""
    recipe = dataclasses.replace(RECIPE, steps=3)
    trio = train_ensemble(images, subsets, SMALL, recipe, seeds=[3, 4, 5], schedule=SCHEDULE)
    pair = train_ensemble(
        images, [subsets[2], subsets[0]], SMALL, recipe, seeds=[9, 3], schedule=SCHEDULE
    )
    alone = train_ensemble(images, subsets[:1], SMALL, recipe, seeds=[3], schedule=SCHEDULE)
    assert len(alone) == 1 and len(pair) == 2 and len(trio) == 3
    assert _states_equal(trio[0], pair[1])
    assert _states_equal(trio[0], alone[0])


def test_member_does_not_depend_on_the_ensemble_size_at_the_default_size(
    images: torch.Tensor,
) -> None:
    """Bitwise (float32): the last 5 of 8 members retrained as an ensemble of 5, as a resumed
    ground truth does (smoke-sized steps; this caught a K-dependent bias gradient of oneDNN's
    grouped convolution that the 3-member case above does not)."""
    recipe = dataclasses.replace(RECIPE, steps=12, batch_size=32, hflip=False)
    gen = torch.Generator().manual_seed(2)
    subsets = [torch.randperm(24, generator=gen)[:12] for _ in range(8)]
    eight = train_ensemble(images[:24], subsets, SMALL, recipe, seeds=list(range(8)))
    five = train_ensemble(images[:24], subsets[3:], SMALL, recipe, seeds=list(range(3, 8)))
    assert all(_states_equal(a, b) for a, b in zip(eight[3:], five, strict=True))


def test_dropout_is_refused(images: torch.Tensor, subsets: list[torch.Tensor]) -> None:
    with pytest.raises(ValueError, match="dropout"):
        train_ensemble(
            images,
            subsets[:2],
            dataclasses.replace(SMALL, dropout=0.1),
            RECIPE,
            seeds=[0, 1],
            schedule=SCHEDULE,
        )


@pytest.mark.parametrize(
    ("subsets_arg", "seeds", "match"),
    [
        ([torch.arange(10), torch.arange(12)], [0, 1], "same length"),
        ([torch.arange(10), torch.arange(10)], [0], "one seed per member"),
        ([torch.arange(35, 45)], [0], "outside"),
        ([torch.arange(10).float()], [0], "integer"),
        ([], [], "non-empty"),
        ([torch.arange(10)], [1.5], "seeds"),
    ],
)
def test_invalid_members_are_refused(
    images: torch.Tensor, subsets_arg: list, seeds: list, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        train_ensemble(images, subsets_arg, SMALL, RECIPE, seeds=seeds, schedule=SCHEDULE)


def test_invalid_dtype_and_images_are_refused(images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="dtype"):
        train_ensemble(images, [torch.arange(10)], SMALL, RECIPE, seeds=[0], dtype=torch.float16)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        train_ensemble(images * 3, [torch.arange(10)], SMALL, RECIPE, seeds=[0])


# ---------------------------------------------------------------- ground truth integration


def test_ground_truth_ensembles_regroup_and_resume_bitwise(tmp_path) -> None:
    """The ground truth's ensemble path: the same arrays, bitwise, whatever the ensemble size
    and after losing some models; one-at-a-time models get other keys (never mixed in)."""
    import shutil

    import numpy as np

    from benchmarks.executors import LocalExecutor
    from benchmarks.groundtruth import (
        compute_ground_truth,
        ground_truth_seed,
        measurement_spec,
        model_spec,
        subset_masks,
    )
    from benchmarks.pipeline import count_trainings, get_base_model, get_queries, load_train_set
    from benchmarks.store import ArtifactStore
    from tests.benchmarks.tiny import tiny_setting

    # 3 subsets x 2 seeds, 12 steps, no dropout; 50 timesteps to sample the queries quickly.
    setting = tiny_setting().replace(n_subsets=3, schedule=NoiseSchedule(num_timesteps=50))
    cpu = torch.device("cpu")
    train_set = load_train_set(setting)
    prepared = ArtifactStore(tmp_path / "prepared")
    base = get_base_model(setting, prepared, train_set, device=cpu, progress=False)
    get_queries(setting, prepared, base, device=cpu, progress=False)
    stores = {}
    for name in ("eight", "four"):
        shutil.copytree(prepared.root, tmp_path / name)
        stores[name] = ArtifactStore(tmp_path / name)
    n, run = len(train_set), LocalExecutor(progress=False)

    def truth(store, size):
        return compute_ground_truth(
            setting, store, ["loss"], n_train=n, executor=run, ensemble_size=size
        ).values["loss"]  # [n_seeds, n_subsets, n_queries]

    eight = truth(stores["eight"], 8)  # one ensemble of all 6 models
    four = truth(stores["four"], 4)  # ensembles of 4 and 2
    np.testing.assert_array_equal(eight, four)
    assert count_trainings(stores["four"]) == 1 + 6

    # Lose two models (and their measurements): only they are retrained, as an ensemble of 2.
    masks = subset_masks(n, setting)
    for m, k in ((1, 0), (2, 1)):
        spec = model_spec(
            setting,
            "subset_model",
            np.flatnonzero(masks[m]),
            ground_truth_seed(setting, m, k),
            trainer="ensemble",
        )
        assert stores["four"].load("model", spec)  # stored under the ensemble spec
        key = stores["four"].key("model", spec)
        assert stores["four"].delete("model", spec)
        assert stores["four"].delete("measurement", measurement_spec(key, setting, "loss"))
    np.testing.assert_array_equal(truth(stores["four"], 8), eight)
    assert count_trainings(stores["four"]) == 1 + 6 + 2

    # One-at-a-time training: its own 6 models (other keys), equal up to rounding only.
    single = truth(stores["eight"], None)
    assert count_trainings(stores["eight"]) == 1 + 6 + 6
    assert len(stores["eight"].list("model")) == 12
    np.testing.assert_allclose(single, eight, rtol=1e-4)
