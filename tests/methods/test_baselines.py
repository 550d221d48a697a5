"""random, pixel and pixel-l2 baselines: closed forms and determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusion.schedule import NoiseSchedule
from methods import MethodContext, create_method, get_method, similarity_baselines
from methods.baselines import PixelCosine, PixelL2, RandomScores


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


@pytest.mark.parametrize("channels", [1, 3])
def test_pixel_l2_equals_minus_numpy_euclidean_distance(channels):
    ctx = make_ctx(channels=channels)
    scores = create_method("pixel-l2").score(ctx)
    assert scores.shape == (3, 5) and scores.dtype == np.float64
    q = ctx.query_images.double().numpy().reshape(3, -1)
    x = ctx.train_images.double().numpy().reshape(5, -1)
    expected = -np.sqrt(((q[:, None, :] - x[None, :, :]) ** 2).sum(axis=2))  # [3, 5]
    np.testing.assert_allclose(scores, expected, rtol=1e-9, atol=1e-9)
    flat_q, flat_x = ctx.query_images.flatten(1).double(), ctx.train_images.flatten(1).double()
    np.testing.assert_allclose(scores, -torch.cdist(flat_q, flat_x).numpy(), rtol=0, atol=1e-12)


def test_pixel_l2_ranks_an_exact_duplicate_first():
    ctx = make_ctx(n_train=40, n_queries=3)
    copies = ctx.train_images[[7, 0, 39]]  # each query is an exact copy of one training image
    dup = MethodContext(
        model=ctx.model, schedule=ctx.schedule, train_images=ctx.train_images, query_images=copies
    )
    scores = PixelL2().score(dup)
    assert (np.argmax(scores, axis=1) == [7, 0, 39]).all()
    assert np.abs(scores[[0, 1, 2], [7, 0, 39]]).max() < 1e-5  # distance ~0 (cdist's mm form)


def test_pixel_l2_is_not_scale_free_unlike_cosine():
    """A faint copy (x / 2) of a training image is cosine-identical to it but not L2-nearest."""
    train = torch.stack([torch.full((1, 2, 2), 0.8), torch.full((1, 2, 2), 0.3)])  # [2, 1, 2, 2]
    train[1, 0, 0, 0] = 0.35
    query = train[:1] / 2  # [1, 1, 2, 2], 0.4 everywhere
    ctx = MethodContext(
        model=torch.nn.Identity(),
        schedule=NoiseSchedule(num_timesteps=10),
        train_images=train,
        query_images=query,
    )
    assert np.argmax(PixelCosine().score(ctx)[0]) == 0
    assert np.argmax(PixelL2().score(ctx)[0]) == 1


def test_similarity_baselines_are_marked_in_the_registry():
    assert similarity_baselines() == ["pixel", "pixel-l2", "clip"]
    assert get_method("pixel-l2").display_name == "pixel L2"
    assert not get_method("random").similarity and not get_method("kfac").similarity


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
