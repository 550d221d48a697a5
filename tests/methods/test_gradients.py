"""Per-example Monte Carlo gradients (methods/gradients.py) against explicit autograd loops."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from torch import nn

from diffusion.measurements import per_draw
from methods.gradients import (
    ExampleDraws,
    ParameterLayout,
    ParameterList,
    draw_examples,
    example_seed,
    iter_gradient_chunks,
    per_example_gradients,
    resolve_backend,
)
from tests.methods.conftest import SMOKE_SCHEDULE, digits_images, smoke_model


def _flat_grad(model: nn.Module, layout: ParameterLayout) -> torch.Tensor:
    """``# [n_params]`` the .grad of the layout's parameters, ``[W.flatten(1) | b]`` per layer."""
    params = dict(model.named_parameters())
    parts = []
    for block in layout.blocks:
        w = params[block.weight].grad.reshape(block.d_out, -1)
        if block.bias is not None:
            w = torch.cat([w, params[block.bias].grad[:, None]], dim=1)
        parts.append(w.reshape(-1))
    return torch.cat(parts)


def _loop_gradients(model, schedule, images, draws: ExampleDraws, measurement, trajectories=None):
    """Reference: one example and one draw at a time, ``loss.backward()`` accumulation."""
    layout = ParameterLayout.from_model(model)
    out = []
    for j in range(images.shape[0]):
        model.zero_grad()
        n_samples = draws.t.shape[1]
        for s in range(n_samples):
            x0 = images[j : j + 1]
            if draws.flip is not None and bool(draws.flip[j, s]):
                x0 = x0.flip(-1)
            value = per_draw(
                measurement,
                model,
                schedule,
                x0,
                draws.t[j : j + 1, s : s + 1],
                draws.eps[j : j + 1, s : s + 1].to(x0.dtype),
                trajectory=None if trajectories is None else trajectories[j : j + 1],
            )
            (value.sum() / n_samples).backward()
        out.append(_flat_grad(model, layout))
    return torch.stack(out)


@pytest.fixture(scope="module")
def model64() -> nn.Module:
    return smoke_model().double()


def test_layout_covers_linear_and_conv_only(model64):
    layout = ParameterLayout.from_model(model64)
    expected = sum(
        p.numel()
        for m in model64.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
        for p in m.parameters(recurse=False)
    )
    assert layout.n_params == expected
    norm_params = sum(
        p.numel() for m in model64.modules() if isinstance(m, nn.GroupNorm) for p in m.parameters()
    )
    assert norm_params > 0
    assert layout.n_params + norm_params == sum(p.numel() for p in model64.parameters())
    assert all(not name.startswith("norm") for name in layout.param_names())


BACKENDS = pytest.mark.parametrize("backend", ["hooks", "vmap", "loop"])


@BACKENDS
@pytest.mark.parametrize("measurement", ["loss", "elbo", "square-norm"])
def test_batched_gradients_equal_explicit_loop(model64, measurement, backend):
    images = digits_images(0, 3).double()
    draws = draw_examples(range(3), 3, (1, 8, 8), SMOKE_SCHEDULE.num_timesteps, seed=1, stream="s")
    batched = per_example_gradients(
        model64, SMOKE_SCHEDULE, images, draws, measurement=measurement, backend=backend
    )  # [3, P]
    reference = _loop_gradients(model64, SMOKE_SCHEDULE, images, draws, measurement)
    assert batched.shape == reference.shape
    assert batched.abs().max() > 0
    torch.testing.assert_close(batched, reference, rtol=1e-9, atol=1e-12)


@BACKENDS
def test_hflip_draws_flip_each_sample(model64, backend):
    images = digits_images(0, 2).double()
    draws = draw_examples(
        range(2), 8, (1, 8, 8), SMOKE_SCHEDULE.num_timesteps, seed=0, stream="s", hflip=True
    )
    assert draws.flip is not None and draws.flip.any() and not draws.flip.all()
    batched = per_example_gradients(model64, SMOKE_SCHEDULE, images, draws, backend=backend)
    reference = _loop_gradients(model64, SMOKE_SCHEDULE, images, draws, "loss")
    torch.testing.assert_close(batched, reference, rtol=1e-9, atol=1e-12)
    unflipped = ExampleDraws(t=draws.t, eps=draws.eps)
    plain = per_example_gradients(model64, SMOKE_SCHEDULE, images, unflipped, backend=backend)
    assert not torch.allclose(plain, batched)  # the flips do enter


@BACKENDS
def test_trajectory_logprob_gradients(model64, backend):
    schedule = SMOKE_SCHEDULE
    images = digits_images(0, 2).double()
    gen = torch.Generator().manual_seed(3)
    trajectories = torch.randn(2, schedule.num_timesteps + 1, 1, 8, 8, generator=gen).double()
    draws = draw_examples(range(2), 4, (1, 8, 8), schedule.num_timesteps, seed=0, stream="q")
    batched = per_example_gradients(
        model64,
        schedule,
        images,
        draws,
        measurement="trajectory-logprob",
        trajectories=trajectories,
        backend=backend,
    )
    reference = _loop_gradients(
        model64, schedule, images, draws, "trajectory-logprob", trajectories
    )
    torch.testing.assert_close(batched, reference, rtol=1e-9, atol=1e-9)


def test_draws_depend_only_on_seed_stream_and_index():
    all_draws = draw_examples(range(6), 5, (1, 8, 8), 50, seed=7, stream="train", hflip=True)
    one = draw_examples([4], 5, (1, 8, 8), 50, seed=7, stream="train", hflip=True)
    torch.testing.assert_close(one.t[0], all_draws.t[4])
    torch.testing.assert_close(one.eps[0], all_draws.eps[4])
    torch.testing.assert_close(one.flip[0], all_draws.flip[4])
    other_stream = draw_examples([4], 5, (1, 8, 8), 50, seed=7, stream="query")
    other_seed = draw_examples([4], 5, (1, 8, 8), 50, seed=8, stream="train")
    assert not torch.equal(other_stream.eps, one.eps)
    assert not torch.equal(other_seed.eps, one.eps)


def test_hooks_and_vmap_agree_with_frozen_parameters():
    """The hooks backend works whatever the parameters' requires_grad, and restores it."""
    model = smoke_model().double()
    for param in model.parameters():
        param.requires_grad_(False)
    images = digits_images(0, 4).double()
    draws = draw_examples(range(4), 3, (1, 8, 8), 50, seed=2, stream="s", hflip=True)
    hooks = per_example_gradients(model, SMOKE_SCHEDULE, images, draws, backend="hooks")
    vmapped = per_example_gradients(model, SMOKE_SCHEDULE, images, draws, backend="vmap")
    torch.testing.assert_close(hooks, vmapped, rtol=1e-9, atol=1e-12)
    assert not any(p.requires_grad for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed


def test_auto_backend_falls_back_for_grouped_convolutions():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1, groups=2)
            self.out = nn.Conv2d(2, 1, 1)

        def forward(self, x, t):
            return self.out(torch.tanh(self.conv(torch.cat([x, x], dim=1))))

    model = Grouped().double()
    images = digits_images(0, 2).double()
    draws = draw_examples(range(2), 2, (1, 8, 8), 50, seed=0, stream="s")
    layout = ParameterLayout.from_model(model)
    assert resolve_backend("auto", model, layout) == "loop"  # on CPU; vmap elsewhere
    auto = per_example_gradients(model, SMOKE_SCHEDULE, images, draws)
    reference = _loop_gradients(model, SMOKE_SCHEDULE, images, draws, "loss")
    torch.testing.assert_close(auto, reference, rtol=1e-9, atol=1e-12)
    vmapped = per_example_gradients(model, SMOKE_SCHEDULE, images, draws, backend="vmap")
    torch.testing.assert_close(vmapped, reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["vmap", "loop", "auto"])
def test_parameter_list_covers_every_parameter_in_named_order(model64, backend):
    """TRAK's layout: every parameter (norm layers too), ``named_parameters`` order, flattened."""
    layout = ParameterList.from_model(model64)
    assert layout.n_params == sum(p.numel() for p in model64.parameters())
    images = digits_images(0, 2).double()
    draws = draw_examples(range(2), 3, (1, 8, 8), 50, seed=4, stream="s", hflip=True)
    batched = per_example_gradients(
        model64, SMOKE_SCHEDULE, images, draws, layout=layout, backend=backend
    )
    reference = []
    for j in range(2):
        model64.zero_grad()
        for s in range(3):
            x0 = images[j : j + 1]
            x0 = x0.flip(-1) if bool(draws.flip[j, s]) else x0
            t, eps = draws.t[j : j + 1, s : s + 1], draws.eps[j : j + 1, s : s + 1].double()
            (per_draw("loss", model64, SMOKE_SCHEDULE, x0, t, eps).sum() / 3).backward()
        reference.append(
            torch.cat(
                [
                    torch.zeros(p.numel(), dtype=p.dtype) if p.grad is None else p.grad.flatten()
                    for p in model64.parameters()
                ]
            )
        )
    torch.testing.assert_close(batched, torch.stack(reference), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="hooks"):
        per_example_gradients(
            model64, SMOKE_SCHEDULE, images, draws, layout=layout, backend="hooks"
        )


def test_example_seed_is_the_hash_except_for_traks_streams():
    """The one seed scheme; TRAK's streams keep numpy's SeedSequence derivation (scores pinned)."""
    digest = hashlib.blake2b(b"7|train|3", digest_size=8).digest()
    assert example_seed(7, "train", 3) == int.from_bytes(digest, "little") >> 1
    state = np.random.SeedSequence([7, 0x54524E, 3]).generate_state(2, dtype=np.uint32)
    assert example_seed(7, "trak-train", 3) == (int(state[0]) << 31) ^ int(state[1])
    seeds = {
        example_seed(7, stream, 3) for stream in ("train", "query", "trak-train", "trak-query")
    }
    assert len(seeds) == 4
    assert all(0 <= seed < 2**63 for seed in seeds)


def test_chunking_does_not_change_gradients():
    model = smoke_model()
    images = digits_images(0, 7)
    kwargs = {"n_samples": 5, "seed": 0, "stream": "train", "hflip": True}

    def collect(batch_size, sample_chunk):
        chunks = iter_gradient_chunks(
            model,
            SMOKE_SCHEDULE,
            images,
            batch_size=batch_size,
            sample_chunk=sample_chunk,
            **kwargs,
        )
        return torch.cat([g for _, _, g in chunks])

    reference = collect(7, None)
    assert reference.shape[0] == 7
    for batch_size, sample_chunk in [(1, None), (3, 2), (7, 1)]:
        torch.testing.assert_close(
            collect(batch_size, sample_chunk), reference, rtol=1e-4, atol=1e-6
        )


def test_invalid_arguments_are_rejected(model64):
    images = digits_images(0, 2).double()
    draws = draw_examples(range(2), 2, (1, 8, 8), 50, seed=0, stream="s")
    with pytest.raises(ValueError, match="B = 2"):
        per_example_gradients(model64, SMOKE_SCHEDULE, images[:1], draws)
    with pytest.raises(ValueError, match="trajectory"):
        per_example_gradients(
            model64, SMOKE_SCHEDULE, images, draws, measurement="trajectory-logprob"
        )
    with pytest.raises(ValueError, match="batch_size"):
        next(
            iter_gradient_chunks(
                model64, SMOKE_SCHEDULE, images, n_samples=1, seed=0, stream="s", batch_size=0
            )
        )
    with pytest.raises(ValueError, match="backend"):
        per_example_gradients(model64, SMOKE_SCHEDULE, images, draws, backend="jax")
    with pytest.raises(ValueError, match="no nn.Linear"):
        ParameterLayout.from_model(nn.GroupNorm(1, 1))
