"""A benchmark setting small enough for end-to-end tests (seconds on one CPU thread)."""

from __future__ import annotations

from benchmarks.settings import get_preset

TINY_OVERRIDES = {
    "n_train": 24,
    "n_queries": 2,
    "n_subsets": 4,
    "n_seeds": 2,
    "gt_mc_samples": 8,
    "grad_mc_samples": 4,
    "kfac_mc_samples": 4,
    "query_grad_mc_samples": 4,
    "n_retrain_queries": 1,
    "train": {"steps": 12, "warmup_steps": 2},
    "subset_train": {"steps": 12, "warmup_steps": 2},
}
"""Overrides of the smoke preset (also usable as ``--set`` pairs, see ``tiny_cli_args``)."""


def tiny_setting():
    return get_preset("smoke").replace(**TINY_OVERRIDES)


def tiny_cli_args() -> list[str]:
    args = []
    for key, value in TINY_OVERRIDES.items():
        if isinstance(value, dict):
            args += [f"--set={key}.{k}={v}" for k, v in value.items()]
        else:
            args.append(f"--set={key}={value}")
    return args
