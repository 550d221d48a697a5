"""Tests of diffusion/train.py: config validation, LR schedule closed form, loss, batching,
determinism, RNG hygiene, and that training on real digits lowers the loss."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from diffusion.schedule import NoiseSchedule
from diffusion.train import (
    TrainConfig,
    TrainingCheckpoint,
    _epoch_batches,
    diffusion_loss,
    evenly_spaced_steps,
    learning_rate,
    train_model,
)
from diffusion.unet import UNet, UNetConfig

TINY = UNetConfig.tiny()
TINY_DROPOUT = dataclasses.replace(TINY, dropout=0.1)


@pytest.fixture(scope="module")
def digits_3_8() -> torch.Tensor:
    """sklearn digits of classes 3 and 8, [N, 1, 8, 8] in [-1, 1] (pixel values 0..16)."""
    d = load_digits()
    keep = (d.target == 3) | (d.target == 8)
    return torch.tensor(d.data[keep], dtype=torch.float32).reshape(-1, 1, 8, 8) / 8.0 - 1.0


def _states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- config and learning rate


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"steps": 0}, "steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"lr_schedule": "linear"}, "lr_schedule"),
        ({"warmup_steps": 11}, "warmup_steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"grad_clip": 0.0}, "grad_clip"),
        ({"hflip": 1}, "hflip"),
        ({"weight_decay": -1e-4}, "weight_decay"),
    ],
)
def test_invalid_train_config_raises(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{"steps": 10, **changes})


def test_grad_clip_none_is_allowed() -> None:
    assert TrainConfig(grad_clip=None).grad_clip is None


def test_cosine_lr_matches_closed_form() -> None:
    lr, steps = 3e-4, 100
    cfg = TrainConfig(steps=steps, lr=lr, lr_schedule="cosine")
    assert learning_rate(cfg, 0) == pytest.approx(lr, rel=1e-15)
    assert learning_rate(cfg, 50) == pytest.approx(lr / 2, rel=1e-12)
    end = lr * 0.5 * (1 + math.cos(math.pi * 99 / 100))
    assert learning_rate(cfg, 99) == pytest.approx(end, rel=1e-12)
    assert 0 < learning_rate(cfg, 99) < 1e-3 * lr


def test_warmup_then_cosine_and_constant() -> None:
    lr = 1e-3
    cos = TrainConfig(steps=110, lr=lr, lr_schedule="cosine", warmup_steps=10)
    assert learning_rate(cos, 0) == pytest.approx(lr / 10)
    assert learning_rate(cos, 4) == pytest.approx(lr / 2)
    assert learning_rate(cos, 9) == pytest.approx(lr)
    assert learning_rate(cos, 10) == pytest.approx(lr)
    assert learning_rate(cos, 60) == pytest.approx(lr / 2)
    const = TrainConfig(steps=110, lr=lr, warmup_steps=10)
    assert [learning_rate(const, s) for s in (4, 10, 109)] == pytest.approx([lr / 2, lr, lr])
    with pytest.raises(ValueError, match="step must be in"):
        learning_rate(const, 110)


def test_training_applies_the_lr_schedule(monkeypatch, digits_3_8) -> None:
    seen: list[float] = []
    original = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    cfg = TrainConfig(steps=6, batch_size=4, lr=1e-3, lr_schedule="cosine", warmup_steps=2)
    train_model(digits_3_8[:16], TINY, cfg, seed=0)
    assert seen == pytest.approx([learning_rate(cfg, s) for s in range(6)], rel=1e-15)


# ---------------------------------------------------------------- loss and batching


def test_diffusion_loss_brute_force() -> None:
    schedule = NoiseSchedule()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(3, 1, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 10, 999])

    def identity_model(x_t, t):  # eps_theta(x_t, t) = x_t
        return x_t

    got = diffusion_loss(identity_model, schedule, x0, t, eps)
    assert got.shape == (3,)
    for b in range(3):
        abar = math.prod(1 - (1e-4 + (0.02 - 1e-4) * s / 999) for s in range(t[b].item() + 1))
        x_t = math.sqrt(abar) * x0[b] + math.sqrt(1 - abar) * eps[b]
        expected = ((eps[b] - x_t) ** 2).mean().item()
        assert got[b].item() == pytest.approx(expected, rel=1e-10)


def test_epoch_batches_use_every_example_equally_often() -> None:
    gen = torch.Generator().manual_seed(0)
    stream = _epoch_batches(5, 3, gen)
    flat = torch.cat([next(stream) for _ in range(10)])  # 30 indices = 6 epochs
    for epoch in flat.view(6, 5):
        assert sorted(epoch.tolist()) == [0, 1, 2, 3, 4]
    # batch larger than the data set: several epochs per batch
    big = next(_epoch_batches(2, 5, gen))
    assert big.shape == (5,) and sorted(big[:4].tolist()) == [0, 0, 1, 1]


# ---------------------------------------------------------------- training


def test_minibatch_flip_and_timestep_draws(monkeypatch) -> None:
    """Record what the loop feeds the loss: flips of an asymmetric image happen (and only
    with hflip), t covers [0, T), eps is fresh noise."""
    import diffusion.train as train_module

    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    real_loss = train_module.diffusion_loss

    def recording_loss(model, schedule, x0, t, eps):
        calls.append((x0.clone(), t.clone(), eps.clone()))
        return real_loss(model, schedule, x0, t, eps)

    monkeypatch.setattr(train_module, "diffusion_loss", recording_loss)
    image = torch.full((1, 1, 8, 8), -1.0)
    image[..., :4] = 1.0  # left half white: x.flip(-1) != x
    schedule = NoiseSchedule(num_timesteps=3)
    for hflip in (False, True):
        calls.clear()
        train_model(
            image, TINY, TrainConfig(steps=5, batch_size=8, hflip=hflip), seed=0, schedule=schedule
        )
        x0 = torch.cat([c[0] for c in calls])  # [40, 1, 8, 8]
        n_flipped = sum(torch.equal(x, image[0].flip(-1)) for x in x0)
        n_plain = sum(torch.equal(x, image[0]) for x in x0)
        assert n_plain + n_flipped == 40
        assert (n_flipped > 5 and n_plain > 5) if hflip else n_flipped == 0
        t = torch.cat([c[1] for c in calls])
        assert set(t.tolist()) == {0, 1, 2}
        eps = torch.cat([c[2] for c in calls])
        assert abs(eps.mean().item()) < 0.1 and abs(eps.std().item() - 1) < 0.1


def test_training_lowers_loss_on_fixed_draws(digits_3_8) -> None:
    schedule = NoiseSchedule()
    init = UNet(TINY, generator=torch.Generator().manual_seed(7)).eval()
    init_state = {k: v.clone() for k, v in init.state_dict().items()}
    gen = torch.Generator().manual_seed(123)
    x0 = digits_3_8[torch.arange(256) % digits_3_8.shape[0]]  # [256, 1, 8, 8]
    t = torch.randint(0, schedule.num_timesteps, (256,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)

    with torch.no_grad():
        before = diffusion_loss(init, schedule, x0, t, eps).mean().item()
    cfg = TrainConfig(steps=200, batch_size=32, lr=1e-3)
    model = train_model(digits_3_8, TINY, cfg, seed=0, schedule=schedule, init_model=init)
    with torch.no_grad():
        after = diffusion_loss(model, schedule, x0, t, eps).mean().item()

    # the fresh Ho-initialised model outputs 0, so `before` is mean(eps^2) ~ 1
    assert before == pytest.approx(eps.square().mean().item(), rel=1e-6)
    assert after < 0.5 * before, (before, after)
    assert not model.training
    assert next(model.parameters()).device.type == "cpu"
    assert next(model.parameters()).dtype == torch.float32
    assert all(torch.equal(init.state_dict()[k], v) for k, v in init_state.items())  # untouched


def test_same_seed_bitwise_identical_different_seed_differs(digits_3_8) -> None:
    cfg = TrainConfig(steps=4, batch_size=8, hflip=True)
    data = digits_3_8[:20]
    a = train_model(data, TINY_DROPOUT, cfg, seed=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(999)  # a different global RNG state must not matter (dropout)
        b = train_model(data, TINY_DROPOUT, cfg, seed=3)
    c = train_model(data, TINY_DROPOUT, cfg, seed=4)
    assert _states_equal(a, b)
    assert not _states_equal(a, c)


def test_training_leaves_global_rng_untouched(digits_3_8) -> None:
    state = torch.get_rng_state()
    train_model(
        digits_3_8[:20], TINY_DROPOUT, TrainConfig(steps=2, batch_size=8, hflip=True), seed=0
    )
    assert torch.equal(torch.get_rng_state(), state)


def test_train_model_rejects_bad_inputs(digits_3_8) -> None:
    cfg = TrainConfig(steps=1, batch_size=4)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        train_model(digits_3_8[:8] * 8 + 8, TINY, cfg, seed=0)  # pixel values 0..16
    with pytest.raises(ValueError, match="images must be a tensor"):
        train_model(torch.zeros(4, 3, 8, 8), TINY, cfg, seed=0)
    other = UNet(dataclasses.replace(TINY, base_channels=8))
    with pytest.raises(ValueError, match="init_model.config"):
        train_model(digits_3_8[:8], TINY, cfg, seed=0, init_model=other)


def test_evenly_spaced_steps_end_at_the_final_model() -> None:
    assert evenly_spaced_steps(12, 4) == (3, 6, 9, 12)
    assert evenly_spaced_steps(10, 3) == (3, 6, 10)
    assert evenly_spaced_steps(5, 1) == (5,)
    assert evenly_spaced_steps(3, 3) == (1, 2, 3)
    for bad in (0, 4, True):
        with pytest.raises(ValueError, match="n_checkpoints"):
            evenly_spaced_steps(3, bad)


def _checkpointed(data, cfg, steps, seed=3) -> tuple[nn.Module, list[TrainingCheckpoint]]:
    checkpoints: list[TrainingCheckpoint] = []
    model = train_model(
        data, TINY_DROPOUT, cfg, seed=seed, checkpoint_steps=steps, on_checkpoint=checkpoints.append
    )
    return model, checkpoints


def test_checkpoints_leave_training_bitwise_unchanged(digits_3_8) -> None:
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-3, lr_schedule="cosine", warmup_steps=2)
    cfg = dataclasses.replace(cfg, hflip=True)
    data = digits_3_8[:20]
    plain = train_model(data, TINY_DROPOUT, cfg, seed=3)
    model, checkpoints = _checkpointed(data, cfg, (2, 4, 6))
    assert _states_equal(plain, model)
    assert [c.step for c in checkpoints] == [2, 4, 6]
    # the learning rate of the step that produced each checkpoint (warmup, then cosine)
    assert [c.learning_rate for c in checkpoints] == [learning_rate(cfg, s - 1) for s in (2, 4, 6)]
    assert checkpoints[0].learning_rate == 1e-3  # last warmup step
    assert 0 < checkpoints[2].learning_rate < checkpoints[1].learning_rate < 1e-3
    final = model.state_dict()
    assert checkpoints[-1].state_dict.keys() == final.keys()
    assert all(torch.equal(checkpoints[-1].state_dict[k], v) for k, v in final.items())
    assert not torch.equal(checkpoints[0].state_dict["conv_out.weight"], final["conv_out.weight"])


def test_a_checkpoint_is_the_model_after_that_many_steps(digits_3_8) -> None:
    # constant learning rate: training for s steps is the first s steps of a longer training
    data = digits_3_8[:20]
    cfg = TrainConfig(steps=5, batch_size=8, lr=1e-3, hflip=True)
    _, checkpoints = _checkpointed(data, cfg, (1, 3))
    for checkpoint in checkpoints:
        short = train_model(
            data, TINY_DROPOUT, dataclasses.replace(cfg, steps=checkpoint.step), seed=3
        )
        state = short.state_dict()
        assert all(torch.equal(checkpoint.state_dict[k], v) for k, v in state.items())
        assert checkpoint.learning_rate == 1e-3


def test_checkpoint_arguments_are_validated(digits_3_8) -> None:
    data, cfg = digits_3_8[:8], TrainConfig(steps=3, batch_size=4)
    with pytest.raises(ValueError, match=r"\[1, steps=3\]"):
        train_model(data, TINY, cfg, seed=0, checkpoint_steps=(0,), on_checkpoint=print)
    with pytest.raises(ValueError, match=r"\[1, steps=3\]"):
        train_model(data, TINY, cfg, seed=0, checkpoint_steps=(4,), on_checkpoint=print)
    with pytest.raises(ValueError, match="repeated"):
        train_model(data, TINY, cfg, seed=0, checkpoint_steps=(1, 1), on_checkpoint=print)
    with pytest.raises(ValueError, match="needs on_checkpoint"):
        train_model(data, TINY, cfg, seed=0, checkpoint_steps=(1,))
    with pytest.raises(ValueError, match="checkpoint_steps is empty"):
        train_model(data, TINY, cfg, seed=0, on_checkpoint=print)
