"""``python -m benchmarks.attribute`` on a real (tiny) diffusers checkpoint and PNG folders.

The checkpoint is written with diffusers' ``save_pretrained`` and read back by the command's own
loading path; the images are scikit-learn digits written as 8-bit PNG files with PIL.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.attribute import load_image, load_image_folder, main, top_influence_rows
from tests.tiny_diffusers import DIFFUSERS_REASON, save_tiny_checkpoint

pytest.importorskip("diffusers", reason=DIFFUSERS_REASON)

N_TRAIN = 8
SELF = (2, 5)
"""Training images that are also given as queries."""
FAST = ["--grad-samples", "32", "--fit-samples", "4", "--query-samples", "32"]
FAST += ["--device", "cpu", "--no-progress"]


def _digit_pixels(n: int) -> np.ndarray:
    """The first ``n`` scikit-learn digits as ``# [n, 8, 8]`` uint8."""
    from sklearn.datasets import load_digits

    return np.round(load_digits().data[:n].reshape(n, 8, 8) / 16.0 * 255.0).astype(np.uint8)


def _write_png(path: Path, pixels: np.ndarray, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode=mode).save(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("attribute")
    save_tiny_checkpoint(root / "model", seed=0)
    pixels = _digit_pixels(N_TRAIN + 1)
    for i in range(N_TRAIN):
        _write_png(root / "train" / f"digit_{i:02d}.png", pixels[i])
    for i in SELF:
        _write_png(root / "queries" / f"query_{i:02d}.png", pixels[i])
    _write_png(root / "queries" / "query_other.png", pixels[N_TRAIN])
    return {
        "root": root,
        "model": root / "model",
        "train": root / "train",
        "queries": root / "queries",
    }


def _run(folders, out: Path, *extra: str) -> int:
    argv = ["--model-dir", str(folders["model"]), "--train-dir", str(folders["train"])]
    return main([*argv, "--out", str(out), *FAST, *extra])


def test_kfac_writes_the_four_outputs_and_finds_the_training_image(folders, tmp_path):
    out = tmp_path / "out"
    assert (
        _run(
            folders, out, "--query-dir", str(folders["queries"]), "--method", "kfac", "--top-k", "3"
        )
        == 0
    )
    scores = np.load(out / "scores.npy")
    assert scores.shape == (3, N_TRAIN) and scores.dtype == np.float32
    assert np.isfinite(scores).all()
    query_names = sorted(p.name for p in folders["queries"].iterdir())
    train_names = [f"digit_{i:02d}.png" for i in range(N_TRAIN)]
    # the known answer: a training image given as a query is its own top influence
    for q, j in enumerate(SELF):
        assert int(np.argmax(scores[q])) == j, scores[q]
    with open(out / "top_influences.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["query"] for r in rows] == [name for name in query_names for _ in range(3)]
    assert [int(r["rank"]) for r in rows] == [1, 2, 3] * 3
    for r in rows:  # every row is the score of its (query, training file) pair
        q, j = query_names.index(r["query"]), train_names.index(r["train_file"])
        assert float(r["score"]) == pytest.approx(float(scores[q, j]), rel=1e-6)
    assert [r["train_file"] for r in rows if r["rank"] == "1"][:2] == [train_names[j] for j in SELF]
    with Image.open(out / "top_influences.png") as grid:
        assert grid.width > 100 and grid.height > 50
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["queries"] == query_names
    assert provenance["query_source"] == "folder" and provenance["sampling_seed"] is None
    assert provenance["schedule"] == {"num_timesteps": 50, "beta_start": 1e-3, "beta_end": 0.05}
    assert provenance["run"]["method"] == "kfac" and "git_commit" in provenance
    assert list(provenance["stages"]) == ["load", "score"]
    for stage in provenance["stages"].values():
        assert stage["seconds"] > 0 and stage["peak_memory_mb"] >= 0


def test_sampled_queries_record_their_seed(folders, tmp_path):
    out = tmp_path / "out"
    assert _run(folders, out, "--n-samples", "2", "--method", "grad-dot", "--seed", "7") == 0
    scores = np.load(out / "scores.npy")
    assert scores.shape == (2, N_TRAIN) and np.isfinite(scores).all()
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["queries"] == ["sample_000", "sample_001"]
    assert provenance["query_source"] == "sampled" and provenance["sampling_seed"] == 7
    assert {p.name for p in out.iterdir()} == {
        "scores.npy",
        "top_influences.csv",
        "top_influences.png",
        "provenance.json",
    }


def test_top_influence_rows_rank_by_score():
    scores = np.array([[0.1, 0.5, -1.0, 0.5]])
    rows = top_influence_rows(scores, ("q",), ("a", "b", "c", "d"), 3)
    assert [(r["rank"], r["train_file"], r["score"]) for r in rows] == [
        (1, "b", 0.5),
        (2, "d", 0.5),
        (3, "a", 0.1),
    ]


def test_images_are_scaled_resized_and_converted(tmp_path):
    pixels = _digit_pixels(1)[0]
    gray = load_image(_write_png(tmp_path / "a.png", pixels), 1, 8)
    np.testing.assert_array_equal(gray, pixels[None].astype(np.float32) / 127.5 - 1.0)
    rgb = np.repeat(pixels[..., None], 3, axis=2)
    as_rgb = load_image(_write_png(tmp_path / "gray_as_rgb.png", rgb, "RGB"), 1, 8)
    np.testing.assert_array_equal(as_rgb, gray)  # a gray image stored as RGB is accepted
    np.testing.assert_array_equal(load_image(tmp_path / "a.png", 3, 8), np.repeat(gray, 3, 0))
    flat = np.full((16, 16), 51, dtype=np.uint8)
    resized = load_image(_write_png(tmp_path / "big.png", flat), 1, 8)
    assert resized.shape == (1, 8, 8)
    np.testing.assert_allclose(resized, 51 / 127.5 - 1.0, atol=1e-6)
    Image.fromarray(pixels).save(tmp_path / "c.jpg", quality=100)
    assert load_image(tmp_path / "c.jpg", 1, 8).shape == (1, 8, 8)
    images = load_image_folder(tmp_path, 1, 8)
    assert images.names == ("a.png", "big.png", "c.jpg", "gray_as_rgb.png")
    assert images.images.shape == (4, 1, 8, 8) and images.images.dtype == torch.float32


def _bad(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    _write_png(folder / "good.png", _digit_pixels(1)[0])
    return folder


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: (d / "notes.txt").write_text("hi"), "notes.txt: not an image file"),
        (lambda d: (d / "broken.png").write_bytes(b"not a png"), "broken.png: cannot be read"),
        (
            lambda d: _write_png(d / "wide.png", np.zeros((8, 12), np.uint8)),
            "wide.png: the image is 12x8",
        ),
        (
            lambda d: _write_png(
                d / "red.png", np.tile([[[200, 0, 0]]], (8, 8, 1)).astype(np.uint8), "RGB"
            ),
            "red.png: a colour image",
        ),
    ],
)
def test_bad_training_images_name_the_file(folders, tmp_path, capsys, make, message):
    bad = _bad(tmp_path, "train")
    make(bad)
    argv = ["--model-dir", str(folders["model"]), "--train-dir", str(bad), "--n-samples", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path / "out"), *FAST])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_empty_folder_and_missing_scheduler_are_usage_errors(folders, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = ["--model-dir", str(folders["model"]), "--train-dir", str(tmp_path / "empty")]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--n-samples", "1", "--out", str(tmp_path / "out"), *FAST])
    assert exit_info.value.code == 2
    assert "holds no images" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--model-dir",
                str(folders["model"] / "unet"),
                "--train-dir",
                str(folders["train"]),
                "--n-samples",
                "1",
                "--out",
                str(tmp_path / "out"),
                *FAST,
            ]
        )
    assert exit_info.value.code == 2
    assert "unet/config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        _run(folders, tmp_path / "out", "--n-samples", "1", "--method", "retrain")
    assert "choose a scoring method" in capsys.readouterr().err


def test_grid_names_the_training_files():
    from benchmarks.plots import influence_grid_figure

    train = np.zeros((3, 1, 8, 8), dtype=np.float32)
    scores = np.array([[0.5, -0.25, 0.125]])
    names = ("cat.png", "dog.png", "a_very_long_file_name.png")
    fig = influence_grid_figure(train[:1], train, scores, k=1, train_labels=names)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "cat.png\n0.5" in texts and "dog.png\n-0.25" in texts
    assert any(t.startswith("a_very_long_f") and "…" in t for t in texts)
    with pytest.raises(ValueError, match="train_labels"):
        influence_grid_figure(train[:1], train, scores, k=1, train_labels=names[:2])
