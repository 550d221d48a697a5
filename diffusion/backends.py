"""Model backends: the harness U-Net and Hugging Face diffusers' ``UNet2DModel``.

Every method, measurement, the trainer and the sampler see a model through one small interface,
:class:`Denoiser`: ``forward(x_t [B, C, H, W], t [B] long) -> eps_hat [B, C, H, W]``, a
``state_dict``, and ``config.image_channels`` / ``config.image_size``. The layers attributed
are chosen by module type (every ``nn.Linear`` and ``nn.Conv2d`` holding a weight:
``methods.gradients.ParameterLayout``), so both backends are attributed without any branch on
the backend: for diffusers' attention these are the ``to_q``, ``to_k``, ``to_v`` and
``to_out.0`` projections.

Backends (:data:`BACKENDS`):

- ``"unet"`` (default): :class:`diffusion.unet.UNet` built from a
  :class:`diffusion.unet.UNetConfig` (the vmapped ensembles of ``diffusion.ensemble`` need it).
  Its config's JSON form (``benchmarks.io.to_jsonable``) has no ``backend`` entry: the default
  backend's artifact keys predate the backends and stay valid.
- ``"diffusers"``: :class:`DiffusersDenoiser` built from a :class:`DiffusersUNetConfig` (the
  keyword arguments of ``diffusers.UNet2DModel``) or loaded with :func:`load_pretrained` from a
  ``save_pretrained`` folder. Needs the optional extra ``[diffusers]``; it is imported only when
  a diffusers model is built. Its config's JSON form is ``{"backend": "diffusers", "unet":
  {...}}``, so a harness and a diffusers model never share an artifact key.

Every model of a benchmark (base, subset, retrained, TracIn checkpoints, a model to load weights
into) is built by :func:`build_denoiser`, whose ``generator`` makes the initial weights a pure
function of its state for both backends without touching the global RNG.

The noise schedule of a diffusers checkpoint comes from its ``DDPMScheduler`` config
(:func:`schedule_from_scheduler_config`), checked against :class:`NoiseSchedule` where they
overlap (the betas and cumulative alphas of the linear schedule).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from diffusion.schedule import NoiseSchedule
from diffusion.unet import UNet, UNetConfig

__all__ = [
    "BACKENDS",
    "DIFFUSERS_INSTALL_HINT",
    "Backend",
    "Denoiser",
    "DiffusersDenoiser",
    "DiffusersUNetConfig",
    "backend_of",
    "build_denoiser",
    "load_pretrained",
    "schedule_from_scheduler_config",
    "unet2d_arguments",
]

DIFFUSERS_INSTALL_HINT = (
    "the diffusers backend needs Hugging Face diffusers: pip install -e '.[diffusers]'"
)
_SCHEDULE_TOLERANCE = 1e-5
"""Largest relative difference allowed between diffusers' float32 ``alphas_cumprod`` and
:attr:`NoiseSchedule.alpha_bars` (float64)."""


@runtime_checkable
class Denoiser(Protocol):
    """What the harness needs of a model: an eps-prediction ``nn.Module``.

    Attributes:
        config: has ``image_channels`` and ``image_size`` (square images).
    """

    config: Any

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t # [B, C, H, W]``, ``t # [B]`` long (0-indexed) -> ``eps_hat # [B, C, H, W]``."""
        ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The parameters and buffers (``nn.Module.state_dict``)."""
        ...


def _import_diffusers():
    try:
        import diffusers  # deferred: optional extra, imported only for the diffusers backend
    except ImportError as error:
        raise ImportError(DIFFUSERS_INSTALL_HINT) from error
    return diffusers


@cache
def unet2d_arguments() -> tuple[str, ...]:
    """The keyword arguments of ``diffusers.UNet2DModel.__init__`` (imports diffusers)."""
    parameters = inspect.signature(_import_diffusers().UNet2DModel.__init__).parameters
    return tuple(name for name in parameters if name != "self")


def _frozen(value: Any) -> Any:
    """``value`` with every list turned into a tuple (recursively), for stable equality."""
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


@dataclass(frozen=True)
class DiffusersUNetConfig:
    """A diffusers ``UNet2DModel`` by its constructor's keyword arguments.

    Attributes:
        unet: keyword arguments of ``diffusers.UNet2DModel`` (its ``config`` as saved by
            ``save_pretrained``; keys starting with ``_`` are ignored). ``sample_size`` (an int:
            square images), ``in_channels`` and ``out_channels`` must be set, with
            ``in_channels == out_channels`` (an eps-prediction model). Stored with sorted keys
            and lists as tuples, so a config read back from JSON equals the original.
        backend: always ``"diffusers"`` (not an argument): it puts the backend's name into the
            config's JSON form, hence into every artifact key holding the architecture.
    """

    unet: Mapping[str, Any] = field(default_factory=dict)
    backend: str = field(default="diffusers", init=False)

    def __post_init__(self) -> None:
        kwargs = {
            k: _frozen(v) for k, v in sorted(dict(self.unet).items()) if not k.startswith("_")
        }
        object.__setattr__(self, "unet", kwargs)
        size = kwargs.get("sample_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(
                f"the UNet2DModel config needs an int sample_size (square images), got {size!r}"
            )
        channels = (kwargs.get("in_channels"), kwargs.get("out_channels"))
        if channels[0] is None or channels[0] != channels[1]:
            raise ValueError(
                "an eps-prediction UNet2DModel needs in_channels == out_channels, got "
                f"in_channels={channels[0]!r}, out_channels={channels[1]!r}"
            )

    @property
    def image_channels(self) -> int:
        """C, channels of the images the model denoises."""
        return int(self.unet["in_channels"])

    @property
    def image_size(self) -> int:
        """H = W, the side of the square images."""
        return int(self.unet["sample_size"])

    @property
    def dropout(self) -> float:
        """The ``dropout`` argument of ``UNet2DModel`` (its default: 0)."""
        return float(self.unet.get("dropout", 0.0))

    def with_arguments(self, overrides: Mapping[str, Any]) -> DiffusersUNetConfig:
        """A copy with some ``UNet2DModel`` arguments replaced (imports diffusers).

        Args:
            overrides: argument name -> value, e.g. ``{"block_out_channels": [16, 32]}``.

        Returns:
            The new config.

        Raises:
            ValueError: a name that is not an argument of ``UNet2DModel.__init__`` (naming it),
                an invalid config, or arguments that do not fit together (diffusers' own message:
                the model is built on the meta device, which takes no memory, so that a
                mismatch is refused here rather than when the first model trains).
        """
        known = unet2d_arguments()
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ValueError(
                f"{unknown} {'is not an argument' if len(unknown) == 1 else 'are not arguments'}"
                f" of diffusers.UNet2DModel; its arguments: {', '.join(known)}"
            )
        config = replace(self, unet={**self.unet, **overrides})
        try:
            with torch.device("meta"):
                _import_diffusers().UNet2DModel(**config.unet)
        except (ValueError, TypeError) as error:
            raise ValueError(f"diffusers.UNet2DModel refuses these arguments: {error}") from error
        return config


class DiffusersDenoiser(nn.Module):
    """A diffusers ``UNet2DModel`` behind the harness's ``forward(x_t, t) -> eps`` interface.

    Args:
        config: the model's :class:`DiffusersUNetConfig`.
        unet: an already built ``UNet2DModel`` of that config (:func:`load_pretrained`); None
            builds a fresh one (diffusers' own initialisation, seeded by the global RNG).

    Attributes:
        config: the :class:`DiffusersUNetConfig`.
        unet: the wrapped ``diffusers.UNet2DModel`` (its parameters are ``unet.*``).
    """

    def __init__(self, config: DiffusersUNetConfig, unet: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.unet = _import_diffusers().UNet2DModel(**config.unet) if unet is None else unet

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t # [B, C, H, W]``, ``t # [B]`` long (0-indexed) -> ``eps_hat # [B, C, H, W]``."""
        return self.unet(x_t, t, return_dict=False)[0]

    def save_pretrained(self, path: str | Path) -> None:
        """Write the wrapped model with diffusers' ``save_pretrained`` (readable by diffusers)."""
        self.unet.save_pretrained(str(path))


def _build_diffusers(
    config: DiffusersUNetConfig, generator: torch.Generator | None
) -> DiffusersDenoiser:
    """A fresh ``UNet2DModel``; with ``generator``, seeded from it and off the global RNG.

    diffusers initialises from the global RNG, so the model is built inside ``fork_rng`` with
    the CPU's global generator seeded from one draw of ``generator``: the weights are a pure
    function of ``generator``'s state and the caller's global RNG state is restored.
    """
    if generator is None:
        return DiffusersDenoiser(config)
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return DiffusersDenoiser(config)


def _build_unet(config: UNetConfig, generator: torch.Generator | None) -> UNet:
    return UNet(config, generator=generator)


@dataclass(frozen=True)
class Backend:
    """One model backend.

    Attributes:
        name: the backend's name in :data:`BACKENDS`.
        config_type: the config dataclass it is built from.
        build: ``(config, generator or None) -> model`` (a fresh, untrained :class:`Denoiser`;
            with a generator, its initial weights are a pure function of the generator's state
            and the global RNG is left untouched).
    """

    name: str
    config_type: type
    build: Callable[[Any, torch.Generator | None], nn.Module]


BACKENDS: dict[str, Backend] = {
    "unet": Backend("unet", UNetConfig, _build_unet),
    "diffusers": Backend("diffusers", DiffusersUNetConfig, _build_diffusers),
}
"""Backend name -> :class:`Backend`; ``"unet"`` is the default everywhere."""


def backend_of(config: Any) -> Backend:
    """The backend whose config type ``config`` is.

    Raises:
        TypeError: no backend is built from a config of that type (listing the known types).
    """
    for backend in BACKENDS.values():
        if isinstance(config, backend.config_type):
            return backend
    raise TypeError(
        f"no backend builds a {type(config).__name__}; known config types: "
        f"{[b.config_type.__name__ for b in BACKENDS.values()]}"
    )


def build_denoiser(
    config: UNetConfig | DiffusersUNetConfig, *, generator: torch.Generator | None = None
) -> nn.Module:
    """A fresh model of the backend whose config type ``config`` is.

    The one place a model of either backend is built (training, loading stored weights).

    Args:
        config: a :class:`~diffusion.unet.UNetConfig` or a :class:`DiffusersUNetConfig`.
        generator: CPU generator of the initial weights: with one, they are a pure function of
            its state and the global RNG is untouched; None draws them from the global RNG.

    Returns:
        The untrained model (train mode, float32, on the CPU).
    """
    return backend_of(config).build(config, generator)


def schedule_from_scheduler_config(config: Mapping[str, Any]) -> NoiseSchedule:
    """The :class:`NoiseSchedule` of a diffusers ``DDPMScheduler`` config.

    Both index timesteps from 0 with ``beta_t`` at index ``t``, so the linear schedule maps one
    to one. Anything :class:`NoiseSchedule` cannot express is refused rather than approximated.

    Args:
        config: the scheduler's config (``DDPMScheduler.config`` or its ``scheduler_config.json``).

    Returns:
        The schedule with the same ``num_train_timesteps``, ``beta_start`` and ``beta_end``.

    Raises:
        ValueError: not an eps-prediction model, or a beta schedule other than ``"linear"``
            (``scaled_linear``, ``squaredcos_cap_v2``, ``sigmoid``, explicit ``trained_betas``,
            ``rescale_betas_zero_snr``), naming the setting.
    """
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(
            f"the scheduler's prediction_type is {prediction!r}; the harness attributes "
            "eps-prediction models only (prediction_type='epsilon')"
        )
    kind = config.get("beta_schedule", "linear")
    if kind != "linear" or config.get("trained_betas") is not None:
        shown = "trained_betas" if kind == "linear" else f"beta_schedule={kind!r}"
        raise ValueError(
            f"the scheduler uses {shown}; the harness's NoiseSchedule supports the linear beta "
            "schedule only (beta_schedule='linear', no trained_betas)"
        )
    if config.get("rescale_betas_zero_snr", False):
        raise ValueError(
            "the scheduler sets rescale_betas_zero_snr=True, which NoiseSchedule does not support"
        )
    return NoiseSchedule(
        num_timesteps=int(config.get("num_train_timesteps", 1000)),
        beta_start=float(config.get("beta_start", 1e-4)),
        beta_end=float(config.get("beta_end", 0.02)),
    )


def _check_schedule(schedule: NoiseSchedule, alphas_cumprod: torch.Tensor) -> None:
    """Raise unless the scheduler's ``alphas_cumprod # [T]`` is the schedule's ``alpha_bars``."""
    theirs = alphas_cumprod.to(torch.float64)
    if theirs.shape != schedule.alpha_bars.shape:
        raise ValueError(
            f"the scheduler has {theirs.numel()} timesteps, the schedule {schedule.num_timesteps}"
        )
    error = float(((theirs - schedule.alpha_bars).abs() / schedule.alpha_bars).max())
    if error > _SCHEDULE_TOLERANCE:
        raise ValueError(
            f"the scheduler's alphas_cumprod differ from the NoiseSchedule's by up to {error:.2e} "
            f"(relative; allowed {_SCHEDULE_TOLERANCE:.0e})"
        )


def _pretrained_folders(path: Path) -> tuple[Path, Path]:
    """``(unet dir, scheduler dir)`` of a ``save_pretrained`` or pipeline folder."""
    unet_dir, scheduler_dir = path / "unet", path / "scheduler"
    if not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no unet/config.json: pass a folder with a 'unet' subfolder (written by "
            "UNet2DModel.save_pretrained) and a 'scheduler' subfolder (DDPMScheduler."
            "save_pretrained), or a diffusers pipeline folder (DDPMPipeline.save_pretrained)"
        )
    if not (scheduler_dir / "scheduler_config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no scheduler/scheduler_config.json: save the DDPMScheduler the model "
            "was trained with into the 'scheduler' subfolder (DDPMScheduler.save_pretrained)"
        )
    return unet_dir, scheduler_dir


def load_pretrained(
    path: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[DiffusersDenoiser, NoiseSchedule]:
    """A diffusers checkpoint as a :class:`DiffusersDenoiser` and its :class:`NoiseSchedule`.

    Reads local files only (never downloads).

    Args:
        path: a folder with ``unet/`` (``UNet2DModel.save_pretrained``) and ``scheduler/``
            (``DDPMScheduler.save_pretrained``) subfolders; a ``DDPMPipeline.save_pretrained``
            folder has exactly these.
        device: where to put the model.

    Returns:
        ``(model in eval mode, schedule)``; the schedule is checked against the scheduler's own
        ``alphas_cumprod``.
    """
    diffusers = _import_diffusers()
    unet_dir, scheduler_dir = _pretrained_folders(Path(path))
    scheduler = diffusers.DDPMScheduler.from_pretrained(str(scheduler_dir), local_files_only=True)
    schedule = schedule_from_scheduler_config(scheduler.config)
    _check_schedule(schedule, scheduler.alphas_cumprod)
    unet = diffusers.UNet2DModel.from_pretrained(
        str(unet_dir), local_files_only=True, low_cpu_mem_usage=False
    )
    model = DiffusersDenoiser(DiffusersUNetConfig(dict(unet.config)), unet)
    return model.to(device).eval(), schedule
