"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) that can keep its trajectory.

The reverse step from code timestep ``t`` (paper ``t + 1``) is

    x_{t-1} = mu_theta(x_t, t) + sigma_t z,   z ~ N(0, I),
    mu_theta(x_t, t) = 1 / sqrt(alpha_t) * (x_t - beta_t / sqrt(1 - abar_t) * eps_theta(x_t, t)),

with the "small" variance ``sigma_t^2 = schedule.posterior_variance[t]`` (0 at the last step,
code ``t = 0``, which therefore adds no noise). All ``T`` steps are taken.

Not clipped: neither the implied prediction of ``x_0`` nor the samples are clamped to
``[-1, 1]`` (Ho et al.'s released code clips ``x_0``; Algorithm 2 does not). This keeps
:func:`posterior_mean` the exact mean the sampler used, so the trajectory log-probability
measurement (``diffusion.measurements``) scores the very density that generated the trajectory.

Noise order (so that a seeded generator gives one fixed result, independent of ``batch_size``):
first ``x_T`` for all ``n`` samples (``[n, C, H, W]``), then one ``[n, C, H, W]`` draw for each
step ``t = T - 1, ..., 1`` in that order; no draw at ``t = 0``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from diffusion.schedule import NoiseSchedule

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""eps_theta: ``model(x_t [B, C, H, W], t [B] long) -> eps_hat [B, C, H, W]``."""


@dataclass(frozen=True)
class SampleResult:
    """Samples of :func:`sample`, on the CPU.

    Attributes:
        images: the samples x_0, ``[n, C, H, W]``.
        trajectory: the whole chain, ``[n, T + 1, C, H, W]``, or ``None`` when not kept.
            ``trajectory[:, 0]`` is the noise x_T, ``trajectory[:, k]`` the state after ``k``
            reverse steps (paper ``x_{T-k}``), ``trajectory[:, T]`` equals ``images``.
    """

    images: torch.Tensor
    trajectory: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dim() != 4:
            raise ValueError(
                "images must be a tensor [n, C, H, W], got "
                f"{getattr(self.images, 'shape', type(self.images))}"
            )
        if self.trajectory is not None:
            traj = self.trajectory
            if (
                not isinstance(traj, torch.Tensor)
                or traj.dim() != 5
                or traj.shape[0] != self.images.shape[0]
                or traj.shape[2:] != self.images.shape[1:]
                or traj.shape[1] < 2
            ):
                raise ValueError(
                    "trajectory must be a tensor [n, T + 1, C, H, W] matching images "
                    f"{tuple(self.images.shape)}, got {getattr(traj, 'shape', type(traj))}"
                )


def _index(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values[t]`` (float64 schedule tensor [T]) cast to ``like``'s dtype and device.

    Shaped ``[B, 1, 1, 1]`` for ``t`` of shape [B]. Plain indexing: works under
    ``torch.func.vmap``.
    """
    out = values.to(device=like.device)[t].to(like.dtype)  # [B]
    return out.view(-1, *([1] * (like.dim() - 1)))


def posterior_mean(
    model: EpsModel, schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """mu_theta(x_t, t) = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps_theta(x_t, t)).

    The single implementation shared by :func:`sample` and the ``trajectory-logprob``
    measurement. Differentiable and free of data-dependent Python control flow (vmap-safe).

    Args:
        model: the eps-prediction network, ``model(x_t, t) -> eps_hat``.
        schedule: the noise schedule.
        x_t: noisy images, ``[B, C, H, W]``.
        t: 0-indexed timesteps, ``[B]`` long.

    Returns:
        the mean of p_theta(x_{t-1} | x_t), ``[B, C, H, W]``, in the dtype of ``x_t``.
    """
    eps_hat = model(x_t, t)  # [B, C, H, W]
    inv_sqrt_alpha = _index(schedule.alphas.rsqrt(), t, x_t)  # [B, 1, 1, 1]
    eps_coef = _index(
        schedule.betas / ((1.0 - schedule.alpha_bars).sqrt() * schedule.alphas.sqrt()), t, x_t
    )  # [B, 1, 1, 1]
    return inv_sqrt_alpha * x_t - eps_coef * eps_hat


def _infer_image_shape(model: object) -> tuple[int, int, int]:
    config = getattr(model, "config", None)
    channels = getattr(config, "image_channels", None)
    size = getattr(config, "image_size", None)
    if channels is None or size is None:
        raise ValueError(
            "image_shape was not given and the model has no config.image_channels / "
            "config.image_size to infer it from; pass image_shape=(C, H, W)"
        )
    return (int(channels), int(size), int(size))


def _model_dtype(model: object) -> torch.dtype:
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def sample(
    model: EpsModel,
    schedule: NoiseSchedule,
    n: int,
    *,
    image_shape: Sequence[int] | None = None,
    generator: torch.Generator,
    return_trajectory: bool = False,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
    dtype: torch.dtype | None = None,
) -> SampleResult:
    """Draw ``n`` samples by full T-step DDPM ancestral sampling (Ho et al. Algorithm 2).

    Runs under ``torch.no_grad``. The model is called as is: it must already be on ``device``
    and in eval mode (dropout in train mode would make the result depend on the global RNG).
    All randomness comes from ``generator`` in the order given in the module docstring, drawn
    on the generator's device and moved to ``device``; the result does not depend on
    ``batch_size`` beyond the model's own batch-size numerics.

    Args:
        model: eps-prediction network, ``model(x_t [B, C, H, W], t [B] long) -> [B, C, H, W]``.
        schedule: the noise schedule (T steps).
        n: number of samples, >= 1.
        image_shape: ``(C, H, W)``; when None, read from ``model.config.image_channels`` and
            ``model.config.image_size`` (square images).
        generator: source of all noise (seed it for reproducible samples).
        return_trajectory: also keep every state, ``[n, T + 1, C, H, W]`` (on the CPU).
        batch_size: samples per model forward, >= 1.
        device: where the model runs and the chain is kept.
        progress: show a tqdm bar over the T timesteps.
        dtype: floating dtype of the chain; default: the model parameters' dtype (float32 when
            the model has none).

    Returns:
        SampleResult with ``images`` ``[n, C, H, W]`` and optionally ``trajectory``, on the CPU.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    shape = _infer_image_shape(model) if image_shape is None else tuple(image_shape)
    if len(shape) != 3 or any(not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"image_shape must be three positive ints (C, H, W), got {image_shape!r}")
    dtype = _model_dtype(model) if dtype is None else dtype
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    device = torch.device(device)
    num_t = schedule.num_timesteps
    sigmas = schedule.posterior_variance.sqrt()  # [T] float64

    def noise() -> torch.Tensor:  # [n, C, H, W]
        z = torch.randn((n, *shape), generator=generator, device=generator.device, dtype=dtype)
        return z.to(device)

    trajectory = None
    with torch.no_grad():
        x = noise()  # x_T, [n, C, H, W]
        if return_trajectory:
            trajectory = torch.empty((n, num_t + 1, *shape), dtype=dtype)
            trajectory[:, 0] = x.cpu()
        steps = tqdm(range(num_t - 1, -1, -1), desc="sampling", disable=not progress)
        for step, t in enumerate(steps, start=1):
            mean = torch.empty_like(x)  # [n, C, H, W]
            for start in range(0, n, batch_size):
                x_b = x[start : start + batch_size]
                t_b = torch.full((x_b.shape[0],), t, dtype=torch.long, device=device)
                mean[start : start + batch_size] = posterior_mean(model, schedule, x_b, t_b)
            # sigma_0 = 0: the last step (t = 0) is deterministic and draws no noise.
            x = mean + sigmas[t].item() * noise() if t > 0 else mean
            if trajectory is not None:
                trajectory[:, step] = x.cpu()
    return SampleResult(images=x.cpu(), trajectory=trajectory)
