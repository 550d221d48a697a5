"""random and pixel baselines: closed forms and determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusion.schedule import NoiseSchedule
from methods import MethodContext, create_method
from methods.baselines import PixelCosine, RandomScores


def make_ctx(n_train=5, n_queries=3, seed=0, channels=1) -> MethodContext:
    gen = torch.Generator().manual_seed(4)
    images = torch.rand(n_train + n_queries, channels, 4, 4, generator=gen) * 2 - 1
    return MethodContext(
        model=torch.nn.Identity(),
        schedule=NoiseSchedule(num_timesteps=10),
        train_images=images[:n_train],
        query_images=images[n_train:],
        seed=seed,
    )


@pytest.mark.parametrize("channels", [1, 3])
def test_pixel_equals_explicit_cosine_loop(channels):
    ctx = make_ctx(channels=channels)
    scores = create_method("pixel").score(ctx)
    assert scores.shape == (3, 5) and scores.dtype == np.float64
    for q in range(3):
        a = ctx.query_images[q].double().flatten().tolist()
        for j in range(5):
            b = ctx.train_images[j].double().flatten().tolist()
            dot = sum(x * y for x, y in zip(a, b, strict=True))
            norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
            assert scores[q, j] == pytest.approx(dot / norm, rel=1e-12, abs=1e-14)


def test_pixel_self_similarity_is_one_and_maximal():
    ctx = make_ctx()
    same = MethodContext(
        model=ctx.model,
        schedule=ctx.schedule,
        train_images=ctx.train_images,
        query_images=ctx.train_images,
    )
    scores = PixelCosine().score(same)
    np.testing.assert_allclose(np.diag(scores), 1.0, rtol=1e-12)
    assert (np.argmax(scores, axis=1) == np.arange(5)).all()


def test_random_is_seeded_standard_normal():
    a = RandomScores().score(make_ctx(seed=3))
    b = RandomScores().score(make_ctx(seed=3))
    c = RandomScores().score(make_ctx(seed=4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and a.shape == (3, 5) and a.dtype == np.float64
    expected = np.random.default_rng(np.random.SeedSequence([3, 0x52414E44])).standard_normal(
        (3, 5)
    )
    np.testing.assert_array_equal(a, expected)
    big = RandomScores().score(make_ctx(n_train=2000, n_queries=50, seed=1))
    assert abs(big.mean()) < 0.01 and abs(big.std() - 1) < 0.01
    assert RandomScores.knows_self_influence is False
