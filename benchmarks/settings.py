"""Benchmark settings: the one source of truth for sizes, and the presets.

A :class:`Setting` fixes the data set, the model, both training recipes, the number of queries,
subsets and seeds of the LDS benchmark and every Monte Carlo sample count. Runners take a preset
(``--preset quick``) and optional overrides (:meth:`Setting.replace`); artifacts are keyed by
:meth:`Setting.fingerprint` of the part they depend on, so e.g. changing the number of subsets M
keeps the cached base model, queries and already retrained subset models.

Presets (:data:`PRESETS`):

- ``smoke``: seconds on a 2-core CPU (tests and CI): 64 digits, an 18k-parameter U-Net,
  150 training steps, 4 queries, 6 subsets x 1 seed, 16-32 MC samples.
- ``quick``: the default of every CLI: the 357 images of ``digits2``, ``UNetConfig.tiny()``
  (72k parameters), 1500 steps at batch 64, 32 queries, 32 subsets x 2 seeds, 256 MC samples for
  the ground truth and 64 for gradients; the first LDS run takes minutes on a laptop CPU.
- ``translate``: quick on ``digits2-translated`` (each of the 357 digits at a random place on a
  16x16 canvas, the places fixed by the data set) with a U-Net of quick's size at 16x16 (71k
  parameters), M x K = 32 x 4 and quick's sample counts. Pixel distance is blind to a translated
  copy of a digit while a convolutional model is not, so attribution and pixel similarity part
  here as on natural images (they nearly coincide on the centred 8x8 digits). Its ground truth
  trains subset models with the full recipe (1500 steps) and common random numbers across
  subsets (``subset_seeds="shared"``): with quick's protocol (750 steps, a seed per subset and
  seed) the noise ceiling was about zero (README, "The translate preset"). It ships as a bundle;
  recomputing it takes hours of CPU.
- ``quick-diffusers``: quick with a diffusers ``UNet2DModel``: the paper's CIFAR-2 model's
  conventions at quick's size (80k parameters, about quick's time per step); trained one model
  at a time (the vmapped ensembles are the harness U-Net's).
- ``cifar2-paper``: ``cifar2`` with the paper's own model (:data:`PAPER_CIFAR2_UNET2D`, copied
  from its code, 38.3M parameters) and its code's recipe (lr 1e-4, warmup over 10% of the steps).
- ``cifar2`` / ``cifar10``: the paper's protocol (App. G.5-G.7): Ho et al.'s CIFAR U-Net, batch
  128, lr 2e-4, 5000 warmup steps, gradient clipping at 1, horizontal flips; CIFAR-2 32k steps
  (full) / 16k (subsets) with a cosine schedule, CIFAR-10 160k / 80k with a constant one;
  100 subsets x 5 seeds, 200 queries, 5000 MC samples for the ground truth, 250 for every
  gradient and GGN.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from benchmarks.errors import UsageError
from benchmarks.io import to_jsonable
from datasets import DATASET_NAMES
from diffusion.backends import BACKENDS, DiffusersUNetConfig
from diffusion.schedule import NoiseSchedule
from diffusion.train import TrainConfig
from diffusion.unet import UNetConfig

__all__ = [
    "FINGERPRINT_PARTS",
    "FINGERPRINT_VERSION",
    "PAPER_CIFAR2_UNET2D",
    "PRESETS",
    "SUBSET_SEED_SCHEMES",
    "Setting",
    "get_preset",
]

FINGERPRINT_VERSION = 2
"""Bump to invalidate every cached artifact when code changes what a fingerprint produces.

2: every artifact key is ``{"setting": fingerprint(part), ...}`` with one part per artifact; the
models of the ground truth and of the retraining benchmark depend on the noise schedule; the
methods' training-side artifacts (K-FAC curvature, TRAK features) no longer on the queries.
"""

#: Image shape [C, H, W] of each data set, to check the U-Net against without loading data.
_IMAGE_SHAPES: dict[str, tuple[int, int, int]] = {
    "digits": (1, 8, 8),
    "digits2": (1, 8, 8),
    "digits2-translated": (1, 16, 16),
    "cifar10": (3, 32, 32),
    "cifar2": (3, 32, 32),
}

_DATA = ("dataset", "n_train")
_BASE_MODEL = (*_DATA, "unet", "train", "schedule", "seed")
_QUERIES = (*_BASE_MODEL, "n_queries")
_SUBSET_MODEL = (*_DATA, "unet", "subset_train", "schedule", "subset_fraction", "seed")
_SUBSET_PREDICTIONS = tuple(
    dict.fromkeys(
        (
            *_QUERIES,
            *_SUBSET_MODEL,
            "gt_mc_samples",
            "grad_mc_samples",
            "kfac_mc_samples",
            "query_grad_mc_samples",
        )
    )
)

FINGERPRINT_PARTS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        # The model trained on the full training set (``pipeline.base_model_spec``); it also
        # identifies the training set, so methods key their training-side artifacts (K-FAC
        # curvature, TRAK features) with it (``MethodContext.train_spec``), adding their own
        # config and sample counts.
        "base_model": _BASE_MODEL,
        # The generated queries (samples of the base model), with or without their trajectories
        # (``pipeline.queries_spec``).
        "queries": _QUERIES,
        # A model of the ground truth or of the exact-retraining oracle, trained on a subset
        # with the subset recipe (``groundtruth.model_spec``); the caller adds the positions and
        # the training seed. Not M or K: subset m and seed k are the same whatever M and K are.
        "subset_model": _SUBSET_MODEL,
        # A model retrained without some examples like the base model (retraining benchmark,
        # ``groundtruth.model_spec``); the caller adds the kept positions and the seed.
        "retrain_model": _BASE_MODEL,
        # A measurement of a model on the queries (``groundtruth.measurement_spec``): the
        # queries and the protocol's sample count; the caller adds the model's key and target.
        "measurement": (*_QUERIES, "gt_mc_samples"),
        # The per-subset predictions of a subset-prediction method in an LDS run (the
        # exact-retraining oracle: ``runner.subset_predictions_spec``): its models are subset
        # models, it measures the queries, and it may use every sample count of its
        # ``MethodContext``; the caller adds the method, its config, the target and the masks.
        "subset_predictions": _SUBSET_PREDICTIONS,
        # A whole ground truth, as a bundle holds it (``bundle.bundle_fingerprint``): the base
        # model, the queries, M x K measured subset models and the oracle's predictions.
        # ``subset_seeds`` is not in ``subset_model``: a model's key holds its training seed.
        "ground_truth": (*_SUBSET_PREDICTIONS, "n_subsets", "n_seeds", "subset_seeds"),
    }
)
"""Artifact part -> the Setting fields its artifacts depend on (see :meth:`Setting.fingerprint`).

``n_subsets`` and ``n_seeds`` enter only the whole ground truth's fingerprint (a bundle); outside
the parts: ``n_retrain_queries`` and ``retrain_fractions`` choose which artifacts a run uses;
``method_options`` reach the methods' keys as their resolved configs; ``name`` is a label.
"""

SUBSET_SEED_SCHEMES = ("independent", "shared")
"""The values of ``Setting.subset_seeds``."""

_ADDED_AT_VERSION_2 = {"subset_seeds": "independent"}
"""Fields added after fingerprint version 2 was fixed -> their default: a fingerprint leaves such
a field out while it has its default, so that every artifact and shipped bundle made before the
field existed keeps its key (its value then was the default)."""

_NESTED = {"unet": UNetConfig, "train": TrainConfig, "subset_train": TrainConfig}
"""Nested config fields -> their dataclass; ``unet`` may also be a ``DiffusersUNetConfig``."""

_MODEL_CONFIGS = tuple(backend.config_type for backend in BACKENDS.values())
"""The config types of ``Setting.unet``: one per backend (``diffusion.backends.BACKENDS``)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _closest(name: str, options: Any) -> str:
    close = difflib.get_close_matches(str(name), list(options), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


@dataclasses.dataclass(frozen=True)
class Setting:
    """Everything that sizes a benchmark run.

    Attributes:
        name: a label (the preset's name, or e.g. ``"quick+M64"``); not part of any fingerprint.
        dataset: data set name, one of ``datasets.DATASET_NAMES``.
        n_train: cap on the training set: its first ``n_train`` images (in the data set's stable
            order); None uses all of them. >= 2 when given.
        unet: the architecture of every model (base, subset and retrained models): a harness
            ``UNetConfig`` (the default backend) or a ``diffusion.backends.DiffusersUNetConfig``
            (a diffusers ``UNet2DModel``); its image shape must match the data set's.
        train: training recipe of the base model (trained on the full training set) and of the
            models retrained without top influences (App. G.6: "the same procedure").
        subset_train: training recipe of the LDS subset models (App. G.7: half the steps of the
            full model on CIFAR, i.e. the same number of epochs on 50% subsets).
        n_queries: number of generated samples attributed (App. G.5: 200). >= 1.
        n_subsets: M, the number of random training subsets of the LDS (App. G.5: 100). >= 3,
            as the LDS is a Spearman correlation across subsets.
        n_seeds: K, models trained per subset with different seeds; the ground truth is their
            average measurement (App. G.5: 5). >= 1.
        subset_fraction: fraction of the training set in each LDS subset, in (0, 1) (paper 0.5).
        gt_mc_samples: Monte Carlo (t, eps) samples per query for ground-truth measurements of
            retrained models (App. G.5: 5000). >= 1.
        grad_mc_samples: Monte Carlo samples per training example for the training-loss
            gradients of methods (App. G.3: 250). >= 1.
        kfac_mc_samples: Monte Carlo samples per training example for fitting curvature
            (K-FAC / GGN factors) (App. G.3: 250). >= 1.
        query_grad_mc_samples: Monte Carlo samples per query for measurement gradients
            (App. G.3: 250). >= 1.
        n_retrain_queries: queries used by the retraining-without-top-influences benchmark (the
            first ones), in [1, n_queries] (App. G.6: 5).
        retrain_fractions: fractions of the training set removed in that benchmark, each in
            (0, 1), distinct (App. G.6: 2% and 10%).
        method_options: method option defaults of this preset, as ``(field, value)`` pairs,
            applied to every method whose config has the field (e.g. TRAK's ``proj_dim``: the
            paper's 32768 exceeds the digits models' parameter count); ``--option`` overrides.
        seed: master seed of the run (base model, queries, subsets, MC draws are derived from
            it), in [0, 2**63).
        schedule: the DDPM noise schedule (paper: T = 1000, linear 1e-4..0.02).
        subset_seeds: how the ground truth's training seeds are drawn (``groundtruth.
            ground_truth_seed``): ``"independent"`` (the paper's protocol: model (m, k) has its
            own seed) or ``"shared"`` (the k-th model of every subset has the same seed, hence
            the same initial weights and the same noise and timestep draws: common random
            numbers across subsets, so that differences between subsets come from their data
            more than from training noise). Each subset's models are still K seeds' models, so
            the expectation the LDS ranks is the same; only its estimate is less noisy.
    """

    name: str
    dataset: str
    n_train: int | None
    unet: UNetConfig | DiffusersUNetConfig
    train: TrainConfig
    subset_train: TrainConfig
    n_queries: int
    n_subsets: int
    n_seeds: int
    gt_mc_samples: int
    grad_mc_samples: int
    kfac_mc_samples: int
    query_grad_mc_samples: int
    subset_fraction: float = 0.5
    n_retrain_queries: int = 5
    retrain_fractions: tuple[float, ...] = (0.02, 0.10)
    method_options: tuple[tuple[str, Any], ...] = ()
    seed: int = 0
    schedule: NoiseSchedule = dataclasses.field(default_factory=NoiseSchedule)
    subset_seeds: str = "independent"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise UsageError(f"Setting.name must be a non-empty str, got {self.name!r}")
        if self.dataset not in DATASET_NAMES:
            raise UsageError(
                f"Setting.dataset must be one of {', '.join(DATASET_NAMES)}, got "
                f"{self.dataset!r}.{_closest(self.dataset, DATASET_NAMES)}"
            )
        if self.n_train is not None and (not _is_int(self.n_train) or self.n_train < 2):
            raise UsageError(
                f"Setting.n_train must be None (all images) or an int >= 2, got {self.n_train!r}"
            )
        if not isinstance(self.unet, _MODEL_CONFIGS):
            raise UsageError(
                "Setting.unet must be a UNetConfig or a DiffusersUNetConfig, got "
                f"{type(self.unet).__name__}"
            )
        for field, cls in (*_NESTED.items(), ("schedule", NoiseSchedule)):
            value = getattr(self, field)
            if field != "unet" and not isinstance(value, cls):
                raise UsageError(
                    f"Setting.{field} must be a {cls.__name__}, got {type(value).__name__}"
                )
        shape = _IMAGE_SHAPES.get(self.dataset)
        if shape is not None and (self.unet.image_channels, self.unet.image_size) != shape[:2]:
            raise UsageError(
                f"Setting.unet has image_channels={self.unet.image_channels}, image_size="
                f"{self.unet.image_size}, but {self.dataset!r} images are {shape[0]}x{shape[1]}x"
                f"{shape[2]} (C x H x W): use a model config for that shape"
            )
        minimum = {
            "n_queries": 1,
            "n_subsets": 3,
            "n_seeds": 1,
            "gt_mc_samples": 1,
            "grad_mc_samples": 1,
            "kfac_mc_samples": 1,
            "query_grad_mc_samples": 1,
            "n_retrain_queries": 1,
        }
        for field, low in minimum.items():
            value = getattr(self, field)
            if not _is_int(value) or value < low:
                why = (
                    " (the LDS is a rank correlation across subsets)"
                    if field == "n_subsets"
                    else ""
                )
                raise UsageError(f"Setting.{field} must be an int >= {low}{why}, got {value!r}")
        if self.n_retrain_queries > self.n_queries:
            raise UsageError(
                f"Setting.n_retrain_queries={self.n_retrain_queries} exceeds n_queries="
                f"{self.n_queries}: the retraining benchmark uses the first n_retrain_queries"
            )
        if not isinstance(self.subset_fraction, int | float) or isinstance(
            self.subset_fraction, bool
        ):
            raise UsageError(
                f"Setting.subset_fraction must be a float, got {self.subset_fraction!r}"
            )
        if not 0.0 < self.subset_fraction < 1.0:
            raise UsageError(
                f"Setting.subset_fraction must lie in (0, 1), got {self.subset_fraction!r}"
            )
        if isinstance(self.retrain_fractions, list):
            object.__setattr__(self, "retrain_fractions", tuple(self.retrain_fractions))
        fractions = self.retrain_fractions
        if (
            not isinstance(fractions, tuple)
            or not fractions
            or not all(
                isinstance(f, int | float) and not isinstance(f, bool) and 0.0 < f < 1.0
                for f in fractions
            )
            or len(set(fractions)) != len(fractions)
        ):
            raise UsageError(
                "Setting.retrain_fractions must be a non-empty tuple of distinct floats in "
                f"(0, 1), got {fractions!r}"
            )
        if isinstance(self.method_options, Mapping):
            object.__setattr__(self, "method_options", tuple(self.method_options.items()))
        options = tuple(tuple(pair) for pair in self.method_options)
        if any(len(pair) != 2 or not isinstance(pair[0], str) for pair in options):
            raise UsageError(
                f"Setting.method_options must be (field, value) pairs, got {self.method_options!r}"
            )
        object.__setattr__(self, "method_options", options)
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise UsageError(f"Setting.seed must be an int in [0, 2**63), got {self.seed!r}")
        if self.subset_seeds not in SUBSET_SEED_SCHEMES:
            raise UsageError(
                f"Setting.subset_seeds must be one of {', '.join(SUBSET_SEED_SCHEMES)}, got "
                f"{self.subset_seeds!r}.{_closest(self.subset_seeds, SUBSET_SEED_SCHEMES)}"
            )

    # ---- derived views ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """All fields as JSON types (nested configs as dicts); inverse of :meth:`from_dict`."""
        return to_jsonable(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Setting:
        """Rebuild a Setting from :meth:`to_dict` output (e.g. a result file's config)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UsageError(
                f"unknown Setting fields {unknown}; known: {sorted(names)}."
                f"{_closest(unknown[0], names)}"
            )
        kwargs = dict(data)
        if isinstance(kwargs.get("unet"), Mapping):
            kwargs["unet"] = _model_config(kwargs["unet"])
        for field, sub in (*_NESTED.items(), ("schedule", NoiseSchedule)):
            if field != "unet" and isinstance(kwargs.get(field), Mapping):
                kwargs[field] = _build(sub, kwargs[field], f"Setting.{field}")
        if isinstance(kwargs.get("retrain_fractions"), list):
            kwargs["retrain_fractions"] = tuple(kwargs["retrain_fractions"])
        return cls(**kwargs)

    def fingerprint(self, part: str) -> dict[str, Any]:
        """The JSON-able sub-dict of this setting that ``part``'s artifacts depend on.

        The one source of the Setting in every artifact key: each spec builder's spec is
        ``{"setting": s.fingerprint(part), ...}`` plus what identifies the single artifact
        (positions, model seed, measured model, target), e.g. ``groundtruth.model_spec``.
        ``part`` is one of :data:`FINGERPRINT_PARTS`; each fingerprint holds only the fields
        listed there (less those of ``_ADDED_AT_VERSION_2`` at their default) plus
        ``fingerprint_version``, so that changing M (``n_subsets``) keeps the
        base model, the queries and the subset models, and the preset ``name`` never matters.

        Raises:
            ValueError: unknown ``part`` (the message lists the parts).
        """
        fields = FINGERPRINT_PARTS.get(part)
        if fields is None:
            raise ValueError(
                f"unknown fingerprint part {part!r}; known parts: "
                f"{', '.join(FINGERPRINT_PARTS)}.{_closest(part, FINGERPRINT_PARTS)}"
            )
        out = {
            name: to_jsonable(getattr(self, name))
            for name in fields
            if name not in _ADDED_AT_VERSION_2 or getattr(self, name) != _ADDED_AT_VERSION_2[name]
        }
        out["fingerprint_version"] = FINGERPRINT_VERSION
        return out

    def replace(self, **overrides: Any) -> Setting:
        """A copy with some fields replaced (validated again).

        Nested configs accept a dict of their own fields, which replaces only those:
        ``s.replace(n_subsets=64, train={"steps": 500})``; for a diffusers model the dict's keys
        are ``UNet2DModel`` arguments: ``s.replace(unet={"block_out_channels": [16, 32]})``.

        Raises:
            UsageError: an unknown field (with the closest match; for a diffusers model, a name
                that is no ``UNet2DModel`` argument) or an invalid value.
        """
        names = [f.name for f in dataclasses.fields(self)]
        changes: dict[str, Any] = {}
        for key, value in overrides.items():
            if key not in names:
                raise UsageError(
                    f"unknown Setting field {key!r}; fields: {', '.join(names)}."
                    f"{_closest(key, names)}"
                )
            nested_cls = _NESTED.get(key) or (NoiseSchedule if key == "schedule" else None)
            if key == "unet" and isinstance(self.unet, DiffusersUNetConfig):
                value = _with_unet2d_arguments(self.unet, value)
            elif nested_cls is not None and isinstance(value, Mapping):
                current = to_jsonable(getattr(self, key))
                value = _build(nested_cls, {**current, **value}, f"Setting.{key}")
            changes[key] = value
        return dataclasses.replace(self, **changes)


def _with_unet2d_arguments(config: DiffusersUNetConfig, value: Any) -> Any:
    """``config`` with the ``UNet2DModel`` arguments of a mapping ``value`` replaced.

    Any other ``value`` (a whole model config) is returned as it is.
    """
    if not isinstance(value, Mapping):
        return value
    try:
        return config.with_arguments(value)
    except ValueError as e:
        raise UsageError(f"Setting.unet: {e}") from e


def _model_config(values: Mapping[str, Any]) -> UNetConfig | DiffusersUNetConfig:
    """The model config of a ``Setting.unet`` JSON form (``to_jsonable`` of either backend).

    A mapping with ``"backend": "diffusers"`` is ``{"backend", "unet": UNet2DModel args}``; one
    without a ``backend`` entry holds the fields of the harness's ``UNetConfig``.
    """
    backend = values.get("backend", "unet")
    if backend not in BACKENDS:
        raise UsageError(
            f"Setting.unet.backend must be one of {', '.join(BACKENDS)}, got {backend!r}"
        )
    if backend == "unet":
        return _build(
            UNetConfig, {k: v for k, v in values.items() if k != "backend"}, "Setting.unet"
        )
    unknown = sorted(set(values) - {"backend", "unet"})
    if unknown or not isinstance(values.get("unet"), Mapping):
        raise UsageError(
            f"Setting.unet of the diffusers backend is {{'backend': 'diffusers', 'unet': "
            f"{{UNet2DModel arguments}}}}, got keys {sorted(values)}"
        )
    try:
        return DiffusersUNetConfig(values["unet"])
    except ValueError as e:
        raise UsageError(f"Setting.unet: {e}") from e


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """``cls(**values)`` with unknown keys reported as a ValueError naming ``where``."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        raise UsageError(
            f"unknown {where} fields {unknown}; {cls.__name__} has: {', '.join(names)}."
            f"{_closest(unknown[0], names)}"
        )
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise UsageError(f"{where}: {e}") from e


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


def _smoke() -> Setting:
    unet = dataclasses.replace(UNetConfig.tiny(), base_channels=8)  # 18,521 parameters
    train = TrainConfig(
        steps=150, batch_size=32, lr=2e-3, lr_schedule="cosine", warmup_steps=10, grad_clip=1.0
    )
    return Setting(
        name="smoke",
        dataset="digits2",
        n_train=64,
        unet=unet,
        train=train,
        subset_train=train,
        n_queries=4,
        n_subsets=6,
        n_seeds=1,
        gt_mc_samples=32,
        grad_mc_samples=16,
        kfac_mc_samples=16,
        query_grad_mc_samples=16,
        n_retrain_queries=2,
        method_options=(("proj_dim", 512),),
    )


def _quick() -> Setting:
    train = TrainConfig(
        steps=1500, batch_size=64, lr=1e-3, lr_schedule="cosine", warmup_steps=50, grad_clip=1.0
    )
    return Setting(
        name="quick",
        dataset="digits2",
        n_train=None,
        unet=UNetConfig.tiny(),
        train=train,
        # App. G.7: subset models train for the same number of epochs as the full model, i.e.
        # half the steps on a 50% subset (CIFAR-2: 32k full, 16k subsets).
        subset_train=dataclasses.replace(train, steps=750, warmup_steps=25),
        n_queries=32,
        n_subsets=32,
        n_seeds=2,
        gt_mc_samples=256,
        grad_mc_samples=64,
        kfac_mc_samples=64,
        query_grad_mc_samples=64,
        # TRAK: 4096 projections stay close to unprojected scores on this 72k-param model, and
        # one projector block (1.2 GB) generated once is much faster than one per batch
        # (figures: perf/README.md, "TRAK on the quick preset").
        method_options=(("proj_dim", 4096), ("projector_block_mb", 2048)),
    )


def _translate() -> Setting:
    quick = _quick()
    return quick.replace(
        name="translate",
        dataset="digits2-translated",
        # About quick's parameter count (71,033 against 72,113) at 16x16, for 40% less time per
        # step than quick's U-Net at this side (85 against 146 CPU-s per 750-step subset model,
        # single-threaded; perf/README.md): 8 channels at 16x16, 16 at 8x8 and 4x4, attention
        # at 4x4 and in the middle, as quick's at its lowest level.
        unet=dataclasses.replace(
            quick.unet,
            image_size=16,
            base_channels=8,
            channel_mults=(1, 2, 2),
            attention_resolutions=(4,),
        ),
        # Measured (README, "The translate preset"): 750-step subset models with a seed per
        # (subset, seed) gave a loss noise ceiling of -0.02 +- 0.02 at 32 x 2; 1500-step ones
        # with shared seeds 0.44 +- 0.04 at K = 2 and 0.54 +- 0.03 at K = 4.
        subset_train=quick.train,
        subset_seeds="shared",
        n_seeds=4,
    )


def _cifar(name: str, full_steps: int, lr_schedule: str) -> Setting:
    def recipe(steps: int) -> TrainConfig:
        # Ho et al. (2020): Adam, lr 2e-4, batch 128, 5000 warmup steps, clip 1, random flips.
        return TrainConfig(
            steps=steps,
            batch_size=128,
            lr=2e-4,
            lr_schedule=lr_schedule,
            warmup_steps=5000,
            grad_clip=1.0,
            hflip=True,
        )

    return Setting(
        name=name,
        dataset=name,
        n_train=None,
        unet=UNetConfig.cifar(),
        train=recipe(full_steps),
        subset_train=recipe(full_steps // 2),
        n_queries=200,
        n_subsets=100,
        n_seeds=5,
        gt_mc_samples=5000,
        grad_mc_samples=250,
        kfac_mc_samples=250,
        query_grad_mc_samples=250,
    )


PAPER_CIFAR2_UNET2D: Mapping[str, Any] = MappingProxyType(
    {
        # The paper's CIFAR-2 model, every field of its UNet2DModel config as the paper's code
        # has it: github.com/BrunoKM/diffusion-influence, scripts/model_configs/unet_cifar2.json
        # (commit c3fa7f7b; "_class_name"/"_diffusers_version" are not arguments).
        "act_fn": "silu",
        "attention_head_dim": None,
        "block_out_channels": (128, 256, 256, 256),
        "center_input_sample": False,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "in_channels": 3,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-06,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 32,
        "dropout": 0.1,
        "time_embedding_type": "positional",
        "resnet_time_scale_shift": "scale_shift",
        "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    }
)
"""The ``UNet2DModel`` arguments of the paper's CIFAR-2 model (the ``cifar2-paper`` preset)."""


def _quick_diffusers() -> Setting:
    # The paper's UNet2DModel (PAPER_CIFAR2_UNET2D) scaled to quick's digits: its conventions
    # (timestep embedding, padding, norm eps, scale-shift time conditioning, one attention head)
    # at quick's size: 16 channels at 8x8 and 4x4, one ResNet per level, attention at 4x4 and
    # in the middle; no dropout, like quick.
    sizes = {
        "sample_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": (16, 16),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 4,
        "dropout": 0.0,
    }
    return _quick().replace(
        name="quick-diffusers", unet=DiffusersUNetConfig({**PAPER_CIFAR2_UNET2D, **sizes})
    )


def _cifar2_paper() -> Setting:
    def recipe(steps: int) -> TrainConfig:
        # The paper's code (scripts/configs/cifar2_ddpm.yaml of the repository above): batch
        # 128, lr 1e-4, warmup 10% of the steps, cosine decay, clipping at 1 (32k steps full,
        # 16k subsets, as PAPER_NOTES.md); flips as the cifar2 preset (App. G.8). Not
        # expressible here: AdamW's decoupled weight decay 1e-6 and the EMA of the weights.
        return TrainConfig(
            steps=steps,
            batch_size=128,
            lr=1e-4,
            lr_schedule="cosine",
            warmup_steps=steps // 10,
            grad_clip=1.0,
            hflip=True,
        )

    return _cifar("cifar2", 32_000, "cosine").replace(
        name="cifar2-paper",
        unet=DiffusersUNetConfig(PAPER_CIFAR2_UNET2D),
        train=recipe(32_000),
        subset_train=recipe(16_000),
    )


PRESETS: Mapping[str, Setting] = MappingProxyType(
    {
        "smoke": _smoke(),
        "quick": _quick(),
        "translate": _translate(),
        "quick-diffusers": _quick_diffusers(),
        "cifar2": _cifar("cifar2", 32_000, "cosine"),
        "cifar2-paper": _cifar2_paper(),
        "cifar10": _cifar("cifar10", 160_000, "constant"),
    }
)
"""The presets by name (read-only)."""


def get_preset(name: str) -> Setting:
    """The preset ``name``.

    Raises:
        ValueError: unknown name; the message lists the presets and the closest match.
    """
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise UsageError(
            f"unknown preset {name!r}; presets: {', '.join(PRESETS)}.{_closest(name, PRESETS)}"
        ) from None
