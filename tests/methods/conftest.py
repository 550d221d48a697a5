"""Smoke-size contexts shared by the method tests and the method contract suite.

Everything is tiny and deterministic: a one-level U-Net with 8 channels (about 10k parameters,
middle attention included), a 50-step noise schedule (so that every timestep still carries
information about the image and per-example gradients are not pure Monte Carlo noise), 24
training images from scikit-learn's digits (``x / 8 - 1``) and 3 queries. The model is not
trained: Ho et al.'s initialisation zeroes the last convolution of every block (the network
outputs exactly 0 and most layers get no gradient), so the weights are perturbed with seeded
noise instead, which makes every layer active. Retraining (``train_fn``) is a few full-batch
Adam steps from those weights; the training checkpoints (``checkpoints_fn``, TracIn-CP) are
snapshots of another such run, computed on first use. The ``diffusers_*`` contexts are the same with the tiny diffusers
``UNet2DModel`` of tests/tiny_diffusers.py, trained for 50 full-batch Adam steps from diffusers'
initialisation (untrained, the reduce variants miss the self-influence check), in float64: its
K-FAC curvature is so ill-conditioned that float32 K-FAC/EK-FAC scores move by up to 1 % of their
scale with the batch size (float32 roundoff amplified by the preconditioner; in float64 they
agree to 1e-12), beyond the contract's float32 tolerance. The torch thread count is set in tests/conftest.py.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import nn

from diffusion.measurements import draw_mc, measure
from diffusion.schedule import NoiseSchedule
from diffusion.unet import UNet, UNetConfig
from methods.context import MethodContext
from tests.tiny_diffusers import DIFFUSERS_REASON, tiny_diffusers_model

SMOKE_UNET = UNetConfig(
    image_channels=1,
    image_size=8,
    base_channels=8,
    channel_mults=(1,),
    num_res_blocks=1,
    attention_resolutions=(),
    num_groups=4,
)
SMOKE_SCHEDULE = NoiseSchedule(num_timesteps=50, beta_start=1e-3, beta_end=0.05)
N_TRAIN = 24
SELF_QUERIES = (0, 7, 13, 21)
"""Training positions used as queries by the self-influence (known-answer) context."""


def digits_images(start: int, stop: int) -> torch.Tensor:
    """scikit-learn digits ``start:stop`` as ``# [n, 1, 8, 8]`` float32 in [-1, 1]."""
    from sklearn.datasets import load_digits

    data = torch.as_tensor(load_digits().data[start:stop], dtype=torch.float32)
    return (data / 8.0 - 1.0).reshape(-1, 1, 8, 8)


def smoke_model(seed: int = 0, scale: float = 0.05) -> UNet:
    """The smoke U-Net at Ho et al.'s init plus ``scale`` * seeded Gaussian noise (eval mode)."""
    model = UNet(SMOKE_UNET, generator=torch.Generator().manual_seed(seed))
    noise = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=noise))
    return model.eval()


def quick_retrain(
    base: nn.Module, images: torch.Tensor, schedule: NoiseSchedule, seed: int, steps: int = 5
) -> nn.Module:
    """``steps`` full-batch Adam steps on the diffusion loss from a copy of ``base``."""
    model = copy.deepcopy(base).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        t = torch.randint(0, schedule.num_timesteps, (images.shape[0],), generator=generator)
        eps = torch.randn(images.shape, generator=generator)
        x_t = schedule.q_sample(images, t, eps)
        loss = (eps - model(x_t, t)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def checkpoint_run(
    base: nn.Module, images: torch.Tensor, schedule: NoiseSchedule, n_checkpoints: int
) -> list[tuple[float, nn.Module]]:
    """``(lr, model)`` snapshots of full-batch Adam from a copy of ``base``, 2 steps apart.

    Checkpoint ``k`` (after ``2 (k + 1)`` steps) carries the learning rate ``1e-3 / (k + 1)``
    that its two steps used (a decaying schedule, so the weights differ between checkpoints).
    """
    model = copy.deepcopy(base).train()
    optimizer = torch.optim.Adam(model.parameters())
    generator = torch.Generator().manual_seed(99)
    checkpoints: list[tuple[float, nn.Module]] = []
    for k in range(n_checkpoints):
        lr = 1e-3 / (k + 1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for _ in range(2):
            t = torch.randint(0, schedule.num_timesteps, (images.shape[0],), generator=generator)
            eps = torch.randn(images.shape, generator=generator, dtype=images.dtype)
            loss = (eps - model(schedule.q_sample(images, t, eps), t)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        checkpoints.append((lr, copy.deepcopy(model).eval()))
    return checkpoints


class DictCache:
    """In-memory stand-in for ``benchmarks.store.ArtifactStore`` (get_or_compute / exists)."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], Any] = {}
        self.computed = 0

    @staticmethod
    def _key(kind: str, spec: Mapping[str, Any]) -> tuple[str, str]:
        import json

        return kind, json.dumps(spec, sort_keys=True, default=str)

    def exists(self, kind: str, spec: Mapping[str, Any]) -> bool:
        return self._key(kind, spec) in self.entries

    def get_or_compute(self, kind: str, spec: Mapping[str, Any], compute_fn, *, fmt: str):
        key = self._key(kind, spec)
        if key not in self.entries:
            self.entries[key] = compute_fn()
            self.computed += 1
        return self.entries[key]


def noising_trajectories(
    images: torch.Tensor, schedule: NoiseSchedule, seed: int = 99
) -> torch.Tensor:
    """``# [n, T + 1, C, H, W]`` stand-in sampling trajectories that end at ``images``.

    ``trajectory[:, k]`` (the sampler's layout: paper ``x_{T-k}``, the state denoised at code
    timestep ``T - 1 - k``) is ``q_sample(image, T - 1 - k, eps)`` with one fixed noise per
    image, and ``trajectory[:, T]`` is the image: tensor arithmetic, no model call, so the smoke
    contexts carry trajectories (for Journey-TRAK) at no cost to the other methods.
    """
    num_t = schedule.num_timesteps
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    eps = eps.to(images.dtype)
    t = torch.arange(num_t - 1, -1, -1)  # code timestep of each state k = 0 .. T-1
    states = [schedule.q_sample(images, t[k].expand(images.shape[0]), eps) for k in range(num_t)]
    return torch.stack([*states, images], dim=1)


def _make_smoke_context(
    model: nn.Module | None = None, dtype: torch.dtype = torch.float32
) -> MethodContext:
    """The smoke context around ``model`` (default: :func:`smoke_model`), images in ``dtype``."""
    images = digits_images(0, N_TRAIN + 3).to(dtype)
    train, queries = images[:N_TRAIN], images[N_TRAIN:]
    model = (smoke_model() if model is None else model).to(dtype)
    schedule = SMOKE_SCHEDULE
    measure_generator_seed = 1234

    def train_fn(positions: torch.Tensor, seed: int) -> nn.Module:
        return quick_retrain(model, train[torch.as_tensor(positions)], schedule, seed)

    @functools.cache
    def checkpoints_fn(n_checkpoints: int) -> list[tuple[float, nn.Module]]:
        return checkpoint_run(model, train, schedule, n_checkpoints)

    def measure_fn(retrained: nn.Module) -> torch.Tensor:
        draws = draw_mc(
            queries.shape[0],
            8,
            queries.shape[1:],
            schedule.num_timesteps,
            generator=torch.Generator().manual_seed(measure_generator_seed),
        )
        with torch.no_grad():
            return measure("loss", retrained, schedule, queries, draws)

    return MethodContext(
        model=model,
        schedule=schedule,
        train_images=train,
        query_images=queries,
        query_trajectories=noising_trajectories(queries, schedule),
        measurement="loss",
        seed=0,
        device="cpu",
        cache=None,
        train_spec={"test": "smoke", "n_train": N_TRAIN},
        train_fn=train_fn,
        measure_fn=measure_fn,
        checkpoints_fn=checkpoints_fn,
        grad_samples=4,
        fit_samples=2,
        query_samples=4,
        progress=False,
    )


@pytest.fixture(scope="session")
def smoke_context() -> MethodContext:
    """24 digits, 3 other digits as queries, 4 gradient / 4 query / 2 fitting MC samples."""
    return _make_smoke_context()


def _self_influence(context: MethodContext) -> MethodContext:
    queries = context.train_images[list(SELF_QUERIES)].clone()
    return replace(
        context,
        query_images=queries,
        query_trajectories=noising_trajectories(queries, context.schedule),
        grad_samples=64,
        fit_samples=8,
        query_samples=64,
    )


@pytest.fixture(scope="session")
def self_influence_context(smoke_context: MethodContext) -> MethodContext:
    """Queries that are training examples (positions :data:`SELF_QUERIES`), 64 / 8 samples.

    More MC samples than the smoke context: a diffusion loss gradient estimated from a few
    (t, eps) draws is mostly noise, and the known-answer check must not be a coin flip.
    """
    return _self_influence(smoke_context)


@pytest.fixture(scope="session")
def diffusers_smoke_context() -> MethodContext:
    """The smoke context with the tiny diffusers ``UNet2DModel`` (tests/tiny_diffusers.py)."""
    pytest.importorskip("diffusers", reason=DIFFUSERS_REASON)
    train = digits_images(0, N_TRAIN)
    base = quick_retrain(tiny_diffusers_model(), train, SMOKE_SCHEDULE, seed=0, steps=50)
    return _make_smoke_context(base, dtype=torch.float64)


@pytest.fixture(scope="session")
def diffusers_self_influence_context(diffusers_smoke_context: MethodContext) -> MethodContext:
    """:func:`self_influence_context` with the tiny diffusers ``UNet2DModel``."""
    return _self_influence(diffusers_smoke_context)


@pytest.fixture(scope="session")
def self_query_positions() -> tuple[int, ...]:
    """The training positions that :func:`self_influence_context` uses as its queries."""
    return SELF_QUERIES
