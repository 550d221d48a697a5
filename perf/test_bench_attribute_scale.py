"""``python -m benchmarks.attribute`` as the training folder grows from 2,000 to 20,000 images.

Attributing one's own data (issue 14, item 5) must stay flat in memory as the training folder
grows: the training gradients are streamed in chunks, and only ``# [n_queries, n_train]``
scores and the ``# [n_train, C, H, W]`` images (20,000 8x8 images: 5 MB) grow with N. The
command runs end to end (reading PNG files, K-FAC fit, query and training gradients, scores,
outputs) on a tiny diffusers checkpoint (``tests.tiny_diffusers``, ~11k parameters) in a fresh
process per N, so that the allocator state of other cases neither hides nor inflates a growth;
each run's ``provenance.json`` gives the seconds and peak RSS growth of its ``load`` and
``score`` stages (:class:`benchmarks.provenance.StageTimer`). MC samples are few
(``--bench-attribute-samples``, default 2): that shrinks the per-chunk activations and makes any
N-dependent allocation stand out more, not less.

Ratios: ``attribute score peak memory 20k / 2k`` (target <= 1.25: flat), the same for loading
(grows with the images themselves, 4.6 MB more at 20k), and the time ratios (linear = 10).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_DIR = Path(__file__).resolve().parents[1]
SIZES = (2_000, 20_000)
N_QUERIES = 4


def _digit_pixels(n: int, seed: int = 0) -> np.ndarray:
    """``# [n, 8, 8]`` uint8: scikit-learn's 1797 digits cycled, each copy with fresh noise."""
    from sklearn.datasets import load_digits

    digits = load_digits().data.reshape(-1, 8, 8) / 16.0 * 255.0
    rng = np.random.default_rng(seed)
    pixels = digits[np.arange(n) % len(digits)] + rng.normal(0.0, 8.0, size=(n, 8, 8))
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def _write_folder(folder: Path, pixels: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    for i, image in enumerate(pixels):
        Image.fromarray(image, mode="L").save(folder / f"image_{i:05d}.png")
    return folder


def _run_attribute(root: Path, train_dir: Path, samples: int) -> dict:
    """One ``python -m benchmarks.attribute`` run in a fresh process; its provenance stages."""
    out = root / f"out-{train_dir.name}"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_DIR), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    counts = [str(samples)] * 3
    command = [sys.executable, "-m", "benchmarks.attribute", "--model-dir", str(root / "model")]
    command += ["--train-dir", str(train_dir), "--query-dir", str(root / "queries")]
    command += ["--out", str(out), "--method", "kfac", "--device", "cpu", "--no-progress"]
    command += ["--grad-samples", counts[0], "--fit-samples", counts[1]]
    command += ["--query-samples", counts[2]]
    proc = subprocess.run(
        command, cwd=REPO_DIR, env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"attribute on {train_dir.name} failed:\n{proc.stderr[-4000:]}")
    scores = np.load(out / "scores.npy")
    stages = json.loads((out / "provenance.json").read_text())["stages"]
    return {"shape": list(scores.shape), "finite": bool(np.isfinite(scores).all()), **stages}


def test_attribute_memory_2k_vs_20k(benchmark, ratios, tmp_path, request):
    """Peak RSS growth of loading and of scoring, 2,000 vs 20,000 training images."""
    pytest.importorskip("diffusers")
    from conftest import run_timed

    from tests.tiny_diffusers import save_tiny_checkpoint

    samples = int(request.config.getoption("--bench-attribute-samples"))
    save_tiny_checkpoint(tmp_path / "model", seed=0)
    pixels = _digit_pixels(max(SIZES) + N_QUERIES)
    _write_folder(tmp_path / "queries", pixels[-N_QUERIES:])
    folders = [_write_folder(tmp_path / f"train-{n}", pixels[:n]) for n in SIZES]

    def both() -> list[dict]:
        return [_run_attribute(tmp_path, folder, samples) for folder in folders]

    runs, _ = run_timed(benchmark, both, rounds=1)
    for n, run in zip(SIZES, runs, strict=True):
        assert run["finite"] and run["shape"] == [N_QUERIES, n]
    small, large = runs
    benchmark.extra_info["runs"] = dict(zip(map(str, SIZES), runs, strict=True))
    for n, run in zip(SIZES, runs, strict=True):
        ratios.record(
            benchmark,
            f"attribute score peak RSS growth, N={n}",
            run["score"]["peak_memory_mb"],
            unit="MiB",
            detail=f"kfac, {samples} MC samples; score {run['score']['seconds']:.1f} s, "
            f"load {run['load']['seconds']:.1f} s ({run['load']['peak_memory_mb']:.1f} MiB)",
        )
    for stage, target in (("score", 1.25), ("load", None)):
        ratios.record(
            benchmark,
            f"attribute {stage} peak memory 20k / 2k",
            large[stage]["peak_memory_mb"] / max(small[stage]["peak_memory_mb"], 1e-9),
            at_most=target,
            detail=f"{large[stage]['peak_memory_mb']:.1f} vs "
            f"{small[stage]['peak_memory_mb']:.1f} MiB",
        )
        ratios.record(
            benchmark,
            f"attribute {stage} time 20k / 2k",
            large[stage]["seconds"] / small[stage]["seconds"],
            detail="linear scaling = 10",
        )
