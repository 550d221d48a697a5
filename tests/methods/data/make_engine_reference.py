"""Pinned TRAK, D-TRAK and K-FAC scores on the smoke context (tests/methods/conftest.py).

``engine_reference.npz`` holds the scores these methods gave with the code *before* the two
per-example gradient computers (``methods.gradients`` and TRAK's own) were merged into one
engine; tests/methods/test_engine_reference.py checks that today's code still gives them.
Regenerate only when a change is meant to alter these scores (and say so in the commit)::

    OMP_NUM_THREADS=1 python -m tests.methods.data.make_engine_reference
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from methods import MethodContext, create_method
from tests.methods.conftest import _make_smoke_context

REFERENCE = Path(__file__).with_name("engine_reference.npz")

CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    # name: (registry name, config overrides, context overrides)
    "trak": ("trak", {"proj_dim": 64, "projector": "basic"}, {}),
    "trak-hflip-elbo": (
        "trak",
        {"proj_dim": 48, "projector": "basic"},
        {"hflip": True, "measurement": "elbo", "seed": 3},
    ),
    "dtrak": ("dtrak", {"proj_dim": 64, "projector": "basic"}, {"hflip": True}),
    "kfac": ("kfac", {}, {}),
    "kfac-float-hflip": ("kfac", {"quantize": None}, {"hflip": True, "measurement": "elbo"}),
    "ekfac": ("ekfac", {"quantize": None}, {}),
}
"""The pinned cases; every TRAK case uses equal grad and query sample counts (4 and 4)."""


def case_context(overrides: dict[str, Any]) -> MethodContext:
    """The smoke context with ``overrides``."""
    return replace(_make_smoke_context(), **overrides)


def case_scores(name: str) -> np.ndarray:
    """``# [n_queries, n_train]`` scores of case ``name`` with the code as it is now."""
    method, config, context = CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_method(method, **config).score(case_context(context))


def main() -> None:
    """Write every case's scores to :data:`REFERENCE`."""
    np.savez(REFERENCE, **{name: case_scores(name) for name in CASES})
    print(f"wrote {REFERENCE}")


if __name__ == "__main__":
    main()
