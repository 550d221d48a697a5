"""Session-wide test set-up.

The example plugin in ``examples/attribution-plugin-example`` is made visible to
``importlib.metadata`` exactly as ``pip install`` would leave it (a ``*.dist-info`` folder with
an ``entry_points.txt`` on ``sys.path``), without running pip, so that the shared method
contract suite (tests/methods/test_contract.py) picks it up through the entry-point group.
``tests/methods/test_plugin_install.py`` does the real ``pip install`` once.

Threads: the one place that sets torch's intra-op thread count for the tests
(:data:`TEST_THREADS`): at start-up, so that session fixtures build their models with it, and
again before every test, in case a test (e.g. a runner given ``threads``) changed it.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_PLUGIN = REPO / "examples" / "attribution-plugin-example"
TEST_THREADS = 1
"""torch intra-op threads of every test. Test models are tiny: one thread is faster than two,
and an oversubscribed OpenMP pool (tests beside other work on 2 cores) spin-waits, 10-100x
slower."""


def write_fake_distribution(site: Path, project: Path) -> None:
    """Write ``<name>-<version>.dist-info`` for ``project``'s pyproject into ``site``."""
    import tomllib

    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    dist_info = site / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n"
    )
    lines = []
    for group, entries in meta.get("entry-points", {}).items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {value}" for name, value in entries.items()]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(TEST_THREADS)
    site = Path(tempfile.mkdtemp(prefix="fake-site-"))
    write_fake_distribution(site, EXAMPLE_PLUGIN)
    sys.path[:0] = [str(site), str(EXAMPLE_PLUGIN / "src")]
    from methods.registry import REGISTRY

    REGISTRY.reload_entry_points()


@pytest.fixture(autouse=True)
def _test_threads() -> Iterator[None]:
    """Every test starts with :data:`TEST_THREADS` torch threads."""
    torch.set_num_threads(TEST_THREADS)
    yield
