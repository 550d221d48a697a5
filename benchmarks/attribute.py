"""Attribute your own model and data: which training images made these samples?

``python -m benchmarks.attribute --model-dir DIR --train-dir DIR [--query-dir DIR | --n-samples K]
--method kfac --top-k 8 --out OUT`` scores every query image against every training image with
any registered attribution method (``python -m methods --list``) and writes, into ``OUT``:

- ``scores.npy``: ``# [n_queries, n_train]`` float32, positive = removing the training image
  increases the query's loss (the harness's score convention);
- ``top_influences.csv``: ``query, rank, train_file, score``, the ``--top-k`` highest scores of
  each query (rank 1 = the most influential);
- ``top_influences.png``: the Figure-1 grid (each query with its top, most negative and most
  neutral training images, file names under the images);
- ``provenance.json``: the command, its resolved settings, the query names (and the sampling
  seed), the method's config, the noise schedule, code and package versions, and the seconds
  and peak memory of loading and of scoring (``stages``).

The model is a diffusers checkpoint (``diffusion.backends.load_pretrained``: a folder with
``unet/`` and ``scheduler/`` subfolders, or a ``DDPMPipeline`` folder); nothing is downloaded.
Image folders hold PNG or JPEG files (8-bit), read in file-name order (hidden files skipped):

- every image must be square; it is resized (bicubic) to the model's ``sample_size`` and
  scaled to [-1, 1];
- a 3-channel model reads every image as RGB (a grayscale image is repeated over the channels);
  a 1-channel model reads grayscale images, and colour images only when their three channels
  are equal (a colour image for a grayscale model is an error, not a silent conversion);
- an alpha channel is dropped;
- an empty folder, a file that is not a PNG/JPEG image, or a non-square image is an error that
  names the file.

Without ``--query-dir``, ``--n-samples K`` images are sampled from the model (full DDPM ancestral
sampling, ``diffusion.sampling.sample``) with ``--seed``; they are named ``sample_000``, ...
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from benchmarks.cli import parse_key_values, usage_errors
from benchmarks.errors import UsageError
from benchmarks.io import atomic_write_bytes, atomic_write_text, to_jsonable
from benchmarks.pipeline import resolve_device
from benchmarks.plots import plot_influence_grid
from benchmarks.provenance import StageLog, collect_provenance
from benchmarks.runner import build_method, check_options
from diffusion.backends import DiffusersDenoiser, load_pretrained
from diffusion.measurements import parse_measurement
from diffusion.sampling import sample
from diffusion.schedule import NoiseSchedule
from methods import MethodContext, get_method
from methods.base import AttributionMethod
from methods.fingerprint import tensor_fingerprint

__all__ = [
    "IMAGE_SUFFIXES",
    "AttributeConfig",
    "Attribution",
    "ImageSet",
    "attribute",
    "build_parser",
    "config_from_args",
    "load_image",
    "load_image_folder",
    "main",
    "top_influence_rows",
    "write_outputs",
]

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")
"""File name endings read as images (case-insensitive)."""
_GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")


@dataclass(frozen=True)
class ImageSet:
    """Images with their names.

    Attributes:
        names: one name per image (the file name, or ``sample_000`` for a generated sample).
        images: ``# [N, C, H, W]`` float32 in [-1, 1].
    """

    names: tuple[str, ...]
    images: torch.Tensor


@dataclass(frozen=True)
class AttributeConfig:
    """One ``python -m benchmarks.attribute`` run.

    Attributes:
        model_dir: diffusers checkpoint folder (``unet/`` + ``scheduler/``, or a pipeline).
        train_dir: folder of training images.
        out: output folder (created).
        query_dir: folder of query images; None samples ``n_samples`` from the model.
        n_samples: queries to sample when ``query_dir`` is None.
        method: registered attribution method name.
        top_k: influences per query in the CSV and per group in the grid.
        options: method config overrides (``--option FIELD=VALUE``).
        measurement: what is attributed: ``loss`` (default), ``elbo``, ``square-norm``, ...
        seed: seed of the method's random draws and of the sampled queries.
        grad_samples: Monte Carlo (t, eps) draws per training image for its gradient.
        fit_samples: draws per training image for fitting curvature (K-FAC factors).
        query_samples: draws per query for its measurement gradient.
        device: ``auto``, ``cpu`` or ``cuda[:i]``.
        progress: show progress bars.
    """

    model_dir: str
    train_dir: str
    out: str
    query_dir: str | None = None
    n_samples: int | None = None
    method: str = "kfac"
    top_k: int = 8
    options: dict[str, Any] = field(default_factory=dict)
    measurement: str = "loss"
    seed: int = 0
    grad_samples: int = 250
    fit_samples: int = 250
    query_samples: int = 250
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.query_dir is None) == (self.n_samples is None):
            raise UsageError("give exactly one of --query-dir DIR and --n-samples K")
        for name in ("n_samples", "top_k", "grad_samples", "fit_samples", "query_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _channels_of(image: Image.Image, channels: int, path: Path) -> np.ndarray:
    """``# [H, W, channels]`` uint8 pixels of ``image`` for a ``channels``-channel model."""
    if channels == 3:
        return np.asarray(image.convert("RGB"))
    if image.mode in _GRAYSCALE_MODES:
        return np.asarray(image.convert("L"))[..., None]
    rgb = np.asarray(image.convert("RGB"))
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
        raise UsageError(
            f"{path}: a colour image ({image.mode}), but the model takes 1 channel (grayscale); "
            "convert the images to grayscale first or use a 3-channel model"
        )
    return rgb[..., :1]


def load_image(path: str | Path, channels: int, size: int) -> np.ndarray:
    """One image file as the model sees it (rules in the module docstring).

    Args:
        path: a PNG or JPEG file.
        channels: the model's channels, 1 or 3.
        size: the model's (square) image side.

    Returns:
        ``# [channels, size, size]`` float32 in [-1, 1].
    """
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(
            f"{path}: not an image file (expected {', '.join(IMAGE_SUFFIXES)}); move it out of "
            "the folder"
        )
    try:
        with Image.open(path) as image:
            image.load()
    except (UnidentifiedImageError, OSError) as error:
        raise UsageError(f"{path}: cannot be read as an image ({error})") from None
    if image.width != image.height:
        raise UsageError(
            f"{path}: the image is {image.width}x{image.height}; the model takes square "
            f"{size}x{size} images: crop it to a square first"
        )
    if image.width != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    pixels = _channels_of(image, channels, path)  # [size, size, channels] uint8
    return (pixels.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0).astype(np.float32)


def load_image_folder(
    folder: str | Path, channels: int, size: int, *, progress: bool = False
) -> ImageSet:
    """Every image of ``folder`` (file-name order, hidden files skipped) as the model sees it.

    Args:
        folder: a folder of PNG/JPEG files.
        channels: the model's channels, 1 or 3.
        size: the model's (square) image side.
        progress: show a progress bar.

    Returns:
        :class:`ImageSet` named by file name, images ``# [N, channels, size, size]``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: not a folder of images")
    files = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and not p.is_dir())
    if not files:
        raise UsageError(f"{folder}: the folder holds no images (PNG or JPEG files)")
    images = [
        load_image(path, channels, size)
        for path in tqdm(files, desc=f"reading {folder.name}", disable=not progress)
    ]
    return ImageSet(tuple(p.name for p in files), torch.from_numpy(np.stack(images)))


def _sample_queries(model, schedule, config: AttributeConfig, device) -> ImageSet:
    """``config.n_samples`` images sampled from the model with ``config.seed``."""
    result = sample(
        model,
        schedule,
        config.n_samples,
        generator=torch.Generator().manual_seed(config.seed),
        device=device,
        progress=config.progress,
    )
    names = tuple(f"sample_{i:03d}" for i in range(config.n_samples))
    return ImageSet(names, result.images.clamp(-1.0, 1.0).float())


def _method(config: AttributeConfig) -> AttributionMethod:
    """The configured method; refuses one that cannot run here or gives no per-image scores."""
    get_method(config.method)  # an unknown name raises UnknownMethodError (a usage error)
    check_options(config.options, (config.method,))
    try:
        method = build_method(config.method, dict(config.options))
    except ValueError as error:
        raise UsageError(f"--option: {error}") from None
    available, reason = method.availability()
    if not available:
        raise UsageError(f"method {config.method!r} cannot run here: {reason}")
    if method.kind != "scores":
        raise UsageError(
            f"method {config.method!r} predicts retrained models' outputs instead of scoring "
            "training images (it needs the harness's retraining): choose a scoring method"
        )
    return method


@dataclass(frozen=True)
class Attribution:
    """What :func:`attribute` found.

    Attributes:
        scores: ``# [n_queries, n_train]`` float64.
        queries: the query images and names.
        train: the training images and names.
        provenance: JSON-able record of the run.
    """

    scores: np.ndarray
    queries: ImageSet
    train: ImageSet
    provenance: dict[str, Any]


def _load_inputs(
    config: AttributeConfig, device: torch.device
) -> tuple[DiffusersDenoiser, NoiseSchedule, ImageSet, ImageSet]:
    """The checkpoint, its schedule, the training images and the queries (read or sampled)."""
    try:
        model, schedule = load_pretrained(config.model_dir, device=device)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(f"--model-dir {config.model_dir}: {error}") from None
    try:
        parse_measurement(config.measurement, schedule.num_timesteps)
    except ValueError as error:
        raise UsageError(f"--measurement: {error}") from None
    channels, size = model.config.image_channels, model.config.image_size
    if channels not in (1, 3):
        raise UsageError(f"the model takes {channels}-channel images; only 1 or 3 are supported")
    train = load_image_folder(config.train_dir, channels, size, progress=config.progress)
    if config.query_dir is not None:
        queries = load_image_folder(config.query_dir, channels, size, progress=config.progress)
    else:
        queries = _sample_queries(model, schedule, config, device)
    return model, schedule, train, queries


def attribute(config: AttributeConfig) -> Attribution:
    """Score the queries against the training images of ``config`` (writes nothing).

    Args:
        config: the run.

    Returns:
        The scores, both image sets and the provenance.
    """
    method = _method(config)
    device = resolve_device(config.device)
    stages = StageLog()
    with stages.stage("load", device=device):
        model, schedule, train, queries = _load_inputs(config, device)
    ctx = MethodContext(
        model=model,
        schedule=schedule,
        train_images=train.images,
        query_images=queries.images,
        measurement=config.measurement,
        seed=config.seed,
        device=device,
        train_spec={
            "model_dir": str(Path(config.model_dir).resolve()),
            "train": tensor_fingerprint(train.images, named=False),
        },
        grad_samples=config.grad_samples,
        fit_samples=config.fit_samples,
        query_samples=config.query_samples,
        progress=config.progress,
    )
    with stages.stage("score", device=device):
        scores = method.score(ctx)  # [n_queries, n_train]
    provenance = collect_provenance() | {
        "run": asdict(config),
        "method_config": asdict(method.config),
        "schedule": asdict(schedule),
        "model_config": dict(model.config.unet),
        "queries": list(queries.names),
        "query_source": "sampled" if config.query_dir is None else "folder",
        "sampling_seed": config.seed if config.query_dir is None else None,
        "stages": stages.to_dict(),  # seconds and peak memory of loading and scoring
    }
    return Attribution(np.asarray(scores, dtype=np.float64), queries, train, provenance)


def top_influence_rows(
    scores: np.ndarray, query_names: tuple[str, ...], train_names: tuple[str, ...], k: int
) -> list[dict[str, Any]]:
    """The ``k`` highest-scoring training images of each query, rank 1 first.

    Args:
        scores: ``# [n_queries, n_train]``.
        query_names: ``n_queries`` names.
        train_names: ``n_train`` names.
        k: rows per query (at most ``n_train``).

    Returns:
        Rows ``{"query", "rank", "train_file", "score"}``, query by query; ties keep the lower
        training index first.
    """
    rows = []
    for query, row in zip(query_names, scores, strict=True):
        for rank, j in enumerate(np.argsort(-row, kind="stable")[:k], start=1):
            rows.append(
                {"query": query, "rank": rank, "train_file": train_names[j], "score": row[j]}
            )
    return rows


def write_outputs(result: Attribution, out: str | Path, top_k: int) -> Path:
    """Write the four outputs of the module docstring into ``out`` (created), atomically each.

    Args:
        result: what :func:`attribute` found.
        out: the output folder.
        top_k: influences per query.

    Returns:
        ``out`` as a Path.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    k = min(top_k, len(result.train.names))
    buffer = io.BytesIO()
    np.save(buffer, result.scores.astype(np.float32), allow_pickle=False)
    atomic_write_bytes(out / "scores.npy", buffer.getvalue())
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["query", "rank", "train_file", "score"])
    writer.writeheader()
    writer.writerows(top_influence_rows(result.scores, result.queries.names, result.train.names, k))
    atomic_write_text(out / "top_influences.csv", table.getvalue())
    plot_influence_grid(
        result.queries.images.numpy(),
        result.train.images.numpy(),
        result.scores,
        out / "top_influences.png",
        k=k,
        train_labels=result.train.names,
    )
    atomic_write_text(
        out / "provenance.json", json.dumps(to_jsonable(result.provenance), indent=2) + "\n"
    )
    return out


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m benchmarks.attribute``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.attribute",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model-dir", required=True, help="diffusers checkpoint folder")
    parser.add_argument("--train-dir", required=True, help="folder of training images")
    queries = parser.add_mutually_exclusive_group(required=True)
    queries.add_argument("--query-dir", help="folder of query images")
    queries.add_argument("--n-samples", type=int, help="sample this many queries from the model")
    parser.add_argument("--method", default="kfac", help="attribution method")
    parser.add_argument("--top-k", type=int, default=8, help="influences per query")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--option", action="append", default=[], metavar="FIELD=VALUE", help="method option"
    )
    parser.add_argument("--measurement", default="loss", help="what is attributed")
    parser.add_argument("--seed", type=int, default=0, help="seed of draws and samples")
    for name, text in (("grad", "training gradient"), ("fit", "curvature"), ("query", "query")):
        parser.add_argument(
            f"--{name}-samples", type=int, default=250, help=f"MC draws per {text} image"
        )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def config_from_args(args: argparse.Namespace) -> AttributeConfig:
    """The :class:`AttributeConfig` of parsed command-line arguments."""
    return AttributeConfig(
        model_dir=args.model_dir,
        train_dir=args.train_dir,
        out=args.out,
        query_dir=args.query_dir,
        n_samples=args.n_samples,
        method=args.method,
        top_k=args.top_k,
        options=parse_key_values(args.option, "--option"),
        measurement=args.measurement,
        seed=args.seed,
        grad_samples=args.grad_samples,
        fit_samples=args.fit_samples,
        query_samples=args.query_samples,
        device=args.device,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit status 2 for usage errors, with the fix in the message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with usage_errors(parser):
        config = config_from_args(args)
        result = attribute(config)
        out = write_outputs(result, config.out, config.top_k)
    print(f"wrote {out}/scores.npy, top_influences.csv, top_influences.png, provenance.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
