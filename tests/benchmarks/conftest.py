"""Shared fixtures of the benchmark tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.pipeline import get_base_model, get_queries, load_train_set
from benchmarks.store import ArtifactStore
from tests.benchmarks.tiny import tiny_setting


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """An artifact store holding the tiny setting's base model and queries (trained and
    sampled once per session). Tests that write to a store copy it (``shutil.copytree``)."""
    root = tmp_path_factory.mktemp("tiny-cache") / "cache"
    setting, store, cpu = tiny_setting(), ArtifactStore(root), torch.device("cpu")
    model = get_base_model(setting, store, load_train_set(setting), device=cpu, progress=False)
    get_queries(setting, store, model, device=cpu, progress=False)
    return root
