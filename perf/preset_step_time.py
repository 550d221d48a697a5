"""CPU milliseconds per training step of presets' models, single-threaded (not a pytest case).

``python perf/preset_step_time.py quick quick-diffusers`` trains each preset's model with its
full-model recipe (``Setting.train``, batch included) for ``--steps`` steps on its training set,
``--repeats`` times, alternating presets so that load on a shared machine hits both alike, and
prints the fastest repeat's CPU time (``process_time``) per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from benchmarks.pipeline import load_train_set
from benchmarks.settings import get_preset
from diffusion.train import train_model


def step_milliseconds(preset: str, steps: int) -> float:
    """CPU ms per step of ``steps`` training steps of ``preset``'s model and recipe."""
    setting = get_preset(preset)
    images = load_train_set(setting).images
    recipe = dataclasses.replace(setting.train, steps=steps, warmup_steps=1)
    start = time.process_time()
    train_model(images, setting.unet, recipe, seed=0, schedule=setting.schedule)
    return 1000 * (time.process_time() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="+")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    best = {preset: float("inf") for preset in args.presets}
    for _ in range(args.repeats):
        for preset in args.presets:
            best[preset] = min(best[preset], step_milliseconds(preset, args.steps))
    for preset, ms in best.items():
        print(f"{preset}: {ms:.2f} ms/step (CPU, 1 thread, fastest of {args.repeats})")


if __name__ == "__main__":
    main()
