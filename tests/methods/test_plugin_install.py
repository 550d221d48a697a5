"""The README's example plugin installs with pip and its method appears in the registry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_pip_install_registers_the_plugin(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--target",
            str(target),
            str(REPO / "examples" / "attribution-plugin-example"),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(REPO)])}
    code = (
        "import methods; "
        "e = methods.get_method('pixel-distance'); "
        "print(e.origin, e.load().__module__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    )
    assert "entry-point (attribution-plugin-example)" in out.stdout
    assert "attribution_plugin_example.method" in out.stdout
