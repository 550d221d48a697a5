"""Throughput of ground-truth retraining: one model at a time vs vmapped ensembles.

Run with ``.venv/bin/python -m pytest perf/test_bench_retraining.py --benchmark-only``.

Every case trains the same 8 quick-preset models (``UNetConfig.tiny()``, batch 64, 178 of the
357 digits2 images each, a few steps of the quick recipe) on one CPU thread: one at a time
with ``train_model``, or in ensembles of 2, 4 or 8 with ``train_ensemble``. ``extra_info`` holds
the model-steps per second and the speedup over one-at-a-time training (measured in the same
session, when that case ran first; also in the suite's ratio table, where the default size 8
is compared with the 1.5x target). Times are CPU seconds of this process (``process_time``),
which other processes on a shared machine disturb far less than wall time. No timing is
asserted.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from benchmarks.settings import get_preset
from datasets import load_dataset
from diffusion.ensemble import train_ensemble
from diffusion.train import train_model

N_MODELS = 8
STEPS = 5
DEFAULT_SIZE = 8  # benchmarks.groundtruth.DEFAULT_ENSEMBLE_SIZE
TARGET_SPEEDUP = 1.5  # the target for the default ensemble size (not asserted)
_BEST_SECONDS: dict[str, float] = {}  # case -> fastest round, for the speedups

# CPU time of this (single-threaded) process: robust to other processes sharing the cores.
pytestmark = pytest.mark.benchmark(timer=time.process_time)


@pytest.fixture(scope="module")
def problem():
    """(images [357, 1, 8, 8], 8 subsets of 178 positions, U-Net config, short quick recipe)."""
    setting = get_preset("quick")
    images = load_dataset("digits2").images
    gen = torch.Generator().manual_seed(0)
    subsets = [
        torch.sort(torch.randperm(images.shape[0], generator=gen)[:178]).values
        for _ in range(N_MODELS)
    ]
    recipe = dataclasses.replace(setting.subset_train, steps=STEPS, warmup_steps=1)
    return images, subsets, setting.unet, recipe


def _record(benchmark, case: str, ratios=None) -> None:
    best = benchmark.stats.stats.min  # CPU seconds of the fastest round
    _BEST_SECONDS[case] = best
    benchmark.extra_info["models"] = N_MODELS
    benchmark.extra_info["steps"] = STEPS
    benchmark.extra_info["model_steps_per_second"] = N_MODELS * STEPS / best
    baseline = _BEST_SECONDS.get("one-at-a-time")
    if baseline is not None and case != "one-at-a-time":
        speedup = baseline / best
        benchmark.extra_info["speedup_vs_one_at_a_time"] = speedup
        if ratios is not None:  # the suite's session table (perf/conftest.py)
            ratios.record(
                benchmark,
                f"retraining: {case} / one-at-a-time throughput",
                speedup,
                at_least=TARGET_SPEEDUP if case == f"ensemble-{DEFAULT_SIZE}" else None,
                detail=f"{baseline:.3f} s / {best:.3f} s CPU for {N_MODELS} models x {STEPS} steps",
            )


def test_one_at_a_time(benchmark, problem) -> None:
    images, subsets, unet, recipe = problem

    def run():
        return [train_model(images[s], unet, recipe, seed=i) for i, s in enumerate(subsets)]

    models = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    assert len(models) == N_MODELS
    _record(benchmark, "one-at-a-time")


@pytest.mark.parametrize("size", [2, 4, 8])
def test_ensemble(benchmark, problem, ratios, size: int) -> None:
    images, subsets, unet, recipe = problem

    def run():
        models = []
        for start in range(0, N_MODELS, size):
            models += train_ensemble(
                images,
                subsets[start : start + size],
                unet,
                recipe,
                seeds=list(range(start, start + size)),
            )
        return models

    models = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    assert len(models) == N_MODELS
    _record(benchmark, f"ensemble-{size}", ratios)
