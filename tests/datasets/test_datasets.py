"""Tests of the datasets package. Never downloads: CIFAR-10 is faked in its real pickle format."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits as sk_load_digits

import datasets
from datasets import (
    DATASET_NAMES,
    DatasetUnavailableError,
    ImageDataset,
    load_dataset,
    paste_on_canvas,
    random_hflip,
)
from datasets import cifar as cifar_mod
from datasets.digits import digits2_translation_offsets

REPO_ROOT = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------------------- fake CIFAR-10

PER_BATCH = 8
# Labels of the 5 x 8 = 40 fake train images: 7 automobiles (1), 6 horses (7), the rest others.
FAKE_TRAIN_LABELS = np.array(
    [1, 7, 0, 2, 1, 3, 7, 4]
    + [5, 1, 6, 7, 8, 9, 0, 1]
    + [2, 3, 7, 4, 1, 5, 6, 8]
    + [9, 7, 0, 1, 2, 3, 4, 5]
    + [1, 6, 7, 8, 9, 0, 2, 3],
    dtype=np.int64,
)


def _write_pickle(path: Path, obj: object) -> None:
    # The real files are protocol-2 pickles written by Python 2 with numpy 1.x, which name
    # numpy.core.multiarray._reconstruct; numpy 2 writes numpy._core: write the old name.
    data = pickle.dumps(obj, protocol=2)
    path.write_bytes(data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))


def write_fake_cifar10(root: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write root/cifar-10-batches-py like cifar-10-python.tar.gz; return (rows [40, 3072], labels)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows = rng.integers(0, 256, size=(FAKE_TRAIN_LABELS.size, 3072), dtype=np.uint8)
    rows[0, :] = 0  # an all-black image -> -1 everywhere
    rows[1, :] = 255  # an all-white image -> +1 everywhere
    rows[2, :1024], rows[2, 1024:2048], rows[2, 2048:] = 10, 128, 250  # R, G, B planes
    for b in range(5):
        sl = slice(b * PER_BATCH, (b + 1) * PER_BATCH)
        _write_pickle(
            folder / f"data_batch_{b + 1}",
            {
                b"batch_label": f"training batch {b + 1} of 5".encode(),
                b"labels": [int(x) for x in FAKE_TRAIN_LABELS[sl]],
                b"data": rows[sl].copy(),
                b"filenames": [f"img_{i}.png".encode() for i in range(sl.start, sl.stop)],
            },
        )
    _write_pickle(
        folder / "test_batch",
        {
            b"batch_label": b"testing batch 1 of 1",
            b"labels": [0, 1, 2, 3],
            b"data": rng.integers(0, 256, size=(4, 3072), dtype=np.uint8),
            b"filenames": [b"t0.png", b"t1.png", b"t2.png", b"t3.png"],
        },
    )
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    names += ["dog", "frog", "horse", "ship", "truck"]
    _write_pickle(
        folder / "batches.meta",
        {
            b"num_cases_per_batch": PER_BATCH,
            b"label_names": [n.encode() for n in names],
            b"num_vis": 3072,
        },
    )
    return rows, FAKE_TRAIN_LABELS.copy()


@pytest.fixture()
def fake_cifar(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rows, labels = write_fake_cifar10(tmp_path)
    return tmp_path, rows, labels


@pytest.fixture()
def no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the default cache at an empty temp dir and make any real download fail loudly."""
    cache = tmp_path / "cache" / "cifar10"
    monkeypatch.setattr(cifar_mod, "default_cache_dir", lambda: cache)

    def offline(root: Path) -> None:
        raise OSError("simulated: network is unreachable")

    monkeypatch.setattr(cifar_mod, "_download", offline)
    return cache


# ----------------------------------------------------------------------------- digits


def test_digits_matches_sklearn() -> None:
    sk = sk_load_digits()
    ds = load_dataset("digits")
    assert ds.name == "digits"
    assert tuple(ds.images.shape) == (1797, 1, 8, 8)
    assert ds.images.dtype == torch.float32
    assert ds.images.min().item() == -1.0 and ds.images.max().item() == 1.0
    expected = sk.images.astype(np.float64) / 8.0 - 1.0  # [1797, 8, 8], independent of .data
    np.testing.assert_array_equal(ds.images[:, 0].numpy().astype(np.float64), expected)
    np.testing.assert_array_equal(ds.labels.numpy(), sk.target)
    assert ds.labels.dtype == torch.int64 and ds.indices.dtype == torch.int64
    np.testing.assert_array_equal(ds.indices.numpy(), np.arange(1797))


def test_digits2_is_threes_and_eights_with_stable_indices() -> None:
    sk = sk_load_digits()
    ds = load_dataset("digits2")
    assert ds.name == "digits2"
    assert set(ds.labels.tolist()) == {3, 8}
    expected_idx = np.flatnonzero((sk.target == 3) | (sk.target == 8))
    assert len(ds) == expected_idx.size == 357
    np.testing.assert_array_equal(ds.indices.numpy(), expected_idx)
    np.testing.assert_array_equal(
        ds.images[:, 0].numpy().astype(np.float64), sk.images[expected_idx] / 8.0 - 1.0
    )
    again = load_dataset("digits2")
    assert torch.equal(again.indices, ds.indices) and torch.equal(again.images, ds.images)


def test_digits2_translated_pastes_each_digits2_image_at_its_offset() -> None:
    sk = sk_load_digits()
    ds = load_dataset("digits2-translated")
    offsets = digits2_translation_offsets().numpy()  # [357, 2]
    assert ds.name == "digits2-translated"
    assert tuple(ds.images.shape) == (357, 1, 16, 16) and ds.images.dtype == torch.float32
    expected_idx = np.flatnonzero((sk.target == 3) | (sk.target == 8))
    np.testing.assert_array_equal(ds.indices.numpy(), expected_idx)  # image i is digits2's i
    np.testing.assert_array_equal(ds.labels.numpy(), sk.target[expected_idx])
    # Independent recomputation from scikit-learn's raw pixels: blank (0 -> -1) canvas, the
    # digit at (row, col).
    expected = np.full((357, 16, 16), -1.0)
    for i, (row, col) in enumerate(offsets):
        expected[i, row : row + 8, col : col + 8] = sk.images[expected_idx[i]] / 8.0 - 1.0
    np.testing.assert_array_equal(ds.images[:, 0].numpy().astype(np.float64), expected)


def test_digits2_translated_offsets_are_fixed_data_not_run_randomness() -> None:
    torch.manual_seed(1)
    np.random.seed(1)
    first = digits2_translation_offsets()
    images = load_dataset("digits2-translated").images
    torch.manual_seed(2)
    np.random.seed(2)
    assert torch.equal(digits2_translation_offsets(), first)  # global RNGs play no part
    assert torch.equal(load_dataset("digits2-translated").images, images)
    assert first.dtype == torch.int64 and tuple(first.shape) == (357, 2)
    # Pinned: a numpy stream change would silently change the data set (and its benchmarks).
    assert first[:4].tolist() == [[8, 0], [4, 2], [0, 2], [0, 0]]
    assert first.sum(0).tolist() == [1483, 1430]
    # Every one of the 9 placements per axis, each about 357 / 9 = 39.7 times (s.d. 5.9).
    for axis in range(2):
        counts = torch.bincount(first[:, axis], minlength=9)
        assert counts.numel() == 9 and int(counts.min()) >= 20 and int(counts.max()) <= 60


# ----------------------------------------------------------------------------- ImageDataset


def _tiny(n: int = 5) -> ImageDataset:
    images = torch.linspace(-1, 1, n * 4).reshape(n, 1, 2, 2)
    return ImageDataset(
        name="tiny",
        images=images,
        labels=torch.arange(n) % 2,
        indices=torch.arange(100, 100 + n),
    )


def test_subset_keeps_indices_labels_and_images() -> None:
    ds = _tiny()
    sub = ds.subset([4, 1, 1])
    assert sub.name == "tiny" and len(sub) == 3
    assert sub.indices.tolist() == [104, 101, 101]
    assert sub.labels.tolist() == [0, 1, 1]
    assert torch.equal(sub.images[0], ds.images[4]) and torch.equal(sub.images[2], ds.images[1])
    by_mask = ds.subset(np.array([True, False, True, False, False]))
    assert by_mask.indices.tolist() == [100, 102]
    assert ds.subset(torch.tensor([3])).indices.tolist() == [103]
    assert len(ds.subset([])) == 0
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        ds.subset([5])
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        ds.subset([-1])
    with pytest.raises(ValueError, match="mask"):
        ds.subset([True, False])


def test_image_dataset_validation() -> None:
    ds = _tiny()
    with pytest.raises(ValueError, match="disagree"):
        ImageDataset("x", ds.images, ds.labels[:4], ds.indices)
    with pytest.raises(ValueError, match="disagree"):
        ImageDataset("x", ds.images, ds.labels, ds.indices[:3])
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        ImageDataset("x", ds.images[:, 0], ds.labels, ds.indices)
    with pytest.raises(ValueError, match="float32"):
        ImageDataset("x", ds.images.double(), ds.labels, ds.indices)
    with pytest.raises(ValueError, match="int64"):
        ImageDataset("x", ds.images, ds.labels.int(), ds.indices)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        ImageDataset("x", ds.images * 2, ds.labels, ds.indices)
    with pytest.raises(ValueError, match="name"):
        ImageDataset("", ds.images, ds.labels, ds.indices)
    with pytest.raises(AttributeError):
        ds.name = "other"  # type: ignore[misc]  # frozen


# ----------------------------------------------------------------------------- CIFAR


def test_cifar10_exact_pixels_channel_order_and_scaling(fake_cifar, no_cache) -> None:
    root, rows, labels = fake_cifar
    ds = load_dataset("cifar10", data_dir=root, download=False)
    n = labels.size
    assert ds.name == "cifar10"
    assert tuple(ds.images.shape) == (n, 3, 32, 32) and ds.images.dtype == torch.float32
    np.testing.assert_array_equal(ds.labels.numpy(), labels)
    np.testing.assert_array_equal(ds.indices.numpy(), np.arange(n))
    # Exact scaling at the ends, and channel planes R, G, B = bytes 0..1023, 1024.., 2048..
    assert torch.all(ds.images[0] == -1.0) and torch.all(ds.images[1] == 1.0)
    for c, value in enumerate((10, 128, 250)):
        assert torch.allclose(ds.images[2, c], torch.full((32, 32), value / 127.5 - 1), atol=1e-6)
    # Every pixel against the documented layout: byte c * 1024 + h * 32 + w.
    c, h, w = np.indices((3, 32, 32))
    expected = rows[:, c * 1024 + h * 32 + w].astype(np.float64) / 127.5 - 1.0  # [n, 3, 32, 32]
    np.testing.assert_allclose(ds.images.numpy().astype(np.float64), expected, rtol=0, atol=1e-6)
    assert ds.images.min().item() == -1.0 and ds.images.max().item() == 1.0


def test_cifar10_accepts_the_batches_folder_itself(fake_cifar, no_cache) -> None:
    root, _, _ = fake_cifar
    a = load_dataset("cifar10", data_dir=root, download=False)
    b = load_dataset("cifar10", data_dir=str(root / "cifar-10-batches-py"), download=False)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_cifar2_takes_only_cars_and_horses_deterministically(fake_cifar, no_cache) -> None:
    root, _, labels = fake_cifar
    full = load_dataset("cifar10", data_dir=root, download=False)
    ds = load_dataset("cifar2", data_dir=root, download=False)
    assert ds.name == "cifar2"
    # Fewer than 2500 per class in the fake data: every car and horse is taken.
    np.testing.assert_array_equal(ds.indices.numpy(), np.flatnonzero(np.isin(labels, [1, 7])))
    assert set(ds.labels.tolist()) == {1, 7}
    assert torch.equal(ds.images, full.images[ds.indices])
    assert torch.equal(ds.labels, full.labels[ds.indices])


def test_cifar2_samples_without_replacement_with_a_fixed_seed(fake_cifar, no_cache) -> None:
    root, _, labels = fake_cifar
    a = cifar_mod.load_cifar2(root, download=False, per_class=3)
    b = cifar_mod.load_cifar2(root, download=False, per_class=3)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)
    idx = a.indices.numpy()
    assert np.all(np.diff(idx) > 0)  # sorted, distinct
    assert np.sum(labels[idx] == 1) == 3 and np.sum(labels[idx] == 7) == 3
    assert set(labels[idx]) == {1, 7}
    # The draw is a real sample, not the first k of each class, for some small per_class.
    firsts = {
        k: np.sort(np.concatenate([np.flatnonzero(labels == c)[:k] for c in (1, 7)]))
        for k in (1, 2, 3, 4, 5)
    }
    draws = {k: cifar_mod.cifar2_indices(labels, k) for k in firsts}
    assert any(not np.array_equal(draws[k], firsts[k]) for k in firsts)
    with pytest.raises(ValueError, match="per_class"):
        cifar_mod.cifar2_indices(labels, 0)


def test_missing_data_dir_without_download(tmp_path: Path, no_cache) -> None:
    with pytest.raises(DatasetUnavailableError, match="--data-dir") as info:
        load_dataset("cifar10", data_dir=tmp_path / "nowhere", download=False)
    assert "download" in str(info.value)
    with pytest.raises(DatasetUnavailableError, match="--data-dir"):
        load_dataset("cifar2", download=False)  # empty default cache, no download allowed


def test_failed_download_is_a_clear_error(no_cache) -> None:
    with pytest.raises(DatasetUnavailableError, match="--data-dir") as info:
        load_dataset("cifar10", download=True)
    assert "network is unreachable" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)


def test_download_fills_the_default_cache(no_cache, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def fake_download(root: Path) -> None:
        calls.append(root)
        write_fake_cifar10(root)

    monkeypatch.setattr(cifar_mod, "_download", fake_download)
    ds = load_dataset("cifar10", download=True)
    assert calls == [no_cache] and len(ds) == FAKE_TRAIN_LABELS.size
    load_dataset("cifar10", download=True)  # now cached: no second download
    assert calls == [no_cache]


def test_batch_unpickler_refuses_foreign_globals(fake_cifar, no_cache) -> None:
    root, _, _ = fake_cifar

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    _write_pickle(root / "cifar-10-batches-py" / "data_batch_3", {b"data": Evil(), b"labels": []})
    with pytest.raises(pickle.UnpicklingError, match="getcwd"):
        load_dataset("cifar10", data_dir=root, download=False)


# ----------------------------------------------------------------------------- random_hflip


def test_random_hflip_flips_about_half_deterministically() -> None:
    images = torch.randn(200, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    out = random_hflip(images, torch.Generator().manual_seed(0))
    again = random_hflip(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    flipped = torch.flip(images, dims=[3])
    is_flipped = torch.all((out == flipped).flatten(1), dim=1)  # [200]
    is_same = torch.all((out == images).flatten(1), dim=1)  # [200]
    assert torch.all(is_flipped ^ is_same)  # each image is exactly one of the two
    assert 70 <= int(is_flipped.sum()) <= 130  # Binomial(200, 1/2): 6 sigma
    other = random_hflip(images, torch.Generator().manual_seed(1))
    assert not torch.equal(other, out)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        random_hflip(images[0], torch.Generator())


def test_paste_on_canvas_places_each_image_and_fills_the_rest() -> None:
    images = torch.arange(1, 2 * 2 * 2 * 3 + 1, dtype=torch.float32).reshape(2, 2, 2, 3)
    out = paste_on_canvas(images, torch.tensor([[0, 1], [2, 0]]), 4, -0.5)
    assert tuple(out.shape) == (2, 2, 4, 4)
    expected = torch.full((2, 2, 4, 4), -0.5)
    expected[0, :, 0:2, 1:4] = images[0]
    expected[1, :, 2:4, 0:3] = images[1]
    assert torch.equal(out, expected)
    for bad in ([[0, 2], [0, 0]], [[3, 0], [0, 0]], [[-1, 0], [0, 0]]):
        with pytest.raises(ValueError, match="inside the 4x4 canvas"):
            paste_on_canvas(images, torch.tensor(bad), 4, -1.0)
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        paste_on_canvas(images, torch.zeros(2, 2), 4, -1.0)  # float offsets
    with pytest.raises(ValueError, match="smaller than"):
        paste_on_canvas(images, torch.zeros(2, 2, dtype=torch.int64), 2, -1.0)


# ----------------------------------------------------------------------------- registry


def test_unknown_name_lists_known_names() -> None:
    assert DATASET_NAMES == ("digits", "digits2", "digits2-translated", "cifar10", "cifar2")
    with pytest.raises(ValueError) as info:
        load_dataset("cifar100")
    message = str(info.value)
    assert all(name in message for name in DATASET_NAMES)
    assert "Did you mean 'cifar10'?" in message


def test_import_is_light_and_not_hugging_face() -> None:
    assert Path(datasets.__file__).resolve().parent == REPO_ROOT / "datasets"
    code = (
        "import sys, datasets; "
        "bad = [m for m in ('torchvision', 'sklearn') if m in sys.modules]; "
        "assert not bad, bad"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, check=True)
