"""Measurements m(theta, x) of a diffusion model on an image, estimated by Monte Carlo.

Every measurement is an expectation over a timestep ``t ~ U{0, ..., T-1}`` (0-indexed; paper
``t + 1``) and noise ``eps ~ N(0, I)``, estimated as the mean over S Monte Carlo draws of
``(t, eps)`` (:class:`MCDraws`). With ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` and
``D = C * H * W`` pixels, the per-draw values are:

``loss``
    The diffusion training loss (Ho et al.'s code): ``mean over pixels of (eps - eps_theta)^2``.
``elbo``
    The *negative* ELBO, up to constants in theta: ``T * w_t * sum over pixels of
    (eps - eps_theta)^2`` with ``w_t = schedule.elbo_weights[t]`` (Ho et al. Eq. 12), so that the
    uniform-t average is an unbiased estimate of ``sum_t w_t E||eps - eps_theta(x_t, t)||^2``.
    Sign: like ``loss``, larger = less likely. Ignored (as in the paper): the reconstruction
    term (``w_0 = 0``), the prior term ``L_T`` and theta-independent constants.
``square-norm``
    D-TRAK's output function: ``mean over pixels of eps_theta(x_t, t)^2``. The mean (not the
    sum ``||.||^2``) keeps it on the scale of ``loss``; the two differ by the constant factor D,
    which scales scores uniformly (rankings unchanged; damping values scale with it).
``mean-output``
    DAS's output function (Lin et al. 2025, their ``"mean"``): ``mean over pixels of
    eps_theta(x_t, t)``.
``timestep-loss:<k>``
    ``loss`` at the one fixed 0-indexed timestep ``k`` (the drawn t are ignored).
``trajectory-logprob``
    Log-probability of the sampling trajectory ``x_T, ..., x_0`` under the reverse process,
    ``sum over steps of log N(x_{t-1}; mu_theta(x_t, t), sigma_t^2 I)`` (the same
    :func:`diffusion.sampling.posterior_mean` the sampler uses). Estimated per draw as
    ``T * log N(...)`` at the drawn t (only ``t`` is used, never ``eps``), so the uniform-t
    average is unbiased for the sum. The last step (code ``t = 0``, ``sigma_0^2 = 0``) is
    deterministic and has no density: it contributes 0 (excluded). The prior ``log N(x_T; 0, I)``
    does not depend on theta and is not included. Kept as a log-probability: larger = *more*
    likely, the opposite direction of ``loss``/``elbo``; sign conventions are the methods'
    concern, a measurement is reported as is.

All per-draw values are differentiable (w.r.t. the model parameters and ``x0``).
:func:`per_draw` runs one batched forward over all ``B * S`` draws and has no data-dependent
Python control flow, so it runs under ``torch.func.vmap`` (e.g. ``vmap(grad(...))`` over items
with ``B = 1`` inside). :func:`measure` chunks that over S to bound memory.
Common random numbers across *models*: pass the same draws (same generator seed) to both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffusion.sampling import EpsModel, posterior_mean
from diffusion.schedule import NoiseSchedule

MEASUREMENTS: tuple[str, ...] = (
    "loss",
    "elbo",
    "square-norm",
    "mean-output",
    "trajectory-logprob",
    "timestep-loss",
)
"""Base names; ``timestep-loss`` takes a parameter: ``"timestep-loss:<t>"``, 0 <= t < T."""

_PARAMETRISED = ("timestep-loss",)
_VALID_NAMES = (
    "loss, elbo, square-norm, trajectory-logprob, timestep-loss:<t> (0 <= t < T), mean-output"
)


def parse_measurement(name: str, num_timesteps: int | None = None) -> tuple[str, int | None]:
    """Split a measurement name into ``(base, param)``.

    Args:
        name: e.g. ``"loss"`` or ``"timestep-loss:250"``.
        num_timesteps: T; when given, the timestep of ``timestep-loss`` must lie in [0, T).

    Returns:
        ``(base, None)`` or ``("timestep-loss", t)``.

    Raises:
        ValueError: unknown name (the message lists the valid ones), missing, extra or
            malformed parameter, timestep out of range.
    """
    if not isinstance(name, str):
        raise ValueError(f"measurement name must be a str, got {type(name).__name__}")
    base, sep, param = name.partition(":")
    if base not in MEASUREMENTS:
        raise ValueError(f"unknown measurement {name!r}; valid measurements: {_VALID_NAMES}")
    if base not in _PARAMETRISED:
        if sep:
            raise ValueError(
                f"measurement {base!r} takes no parameter, got {name!r}; "
                f"valid measurements: {_VALID_NAMES}"
            )
        return base, None
    if not sep or not param.strip().lstrip("-").isdigit():
        raise ValueError(
            f"measurement {base!r} needs an integer timestep, e.g. '{base}:100', got {name!r}"
        )
    t = int(param)
    if t < 0 or (num_timesteps is not None and t >= num_timesteps):
        bound = "T" if num_timesteps is None else str(num_timesteps)
        raise ValueError(f"{name!r}: timestep {t} out of range, need 0 <= t < {bound} (0-indexed)")
    return base, t


@dataclass(frozen=True)
class MCDraws:
    """Monte Carlo draws of (t, eps) for B items and S samples each.

    Attributes:
        t: 0-indexed timesteps, ``[B, S]`` int64.
        eps: standard normal noise, ``[B, S, C, H, W]`` floating.
    """

    t: torch.Tensor
    eps: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.t, torch.Tensor) or self.t.dim() != 2 or self.t.dtype != torch.long:
            raise ValueError(
                f"t must be an int64 tensor [B, S], got {getattr(self.t, 'dtype', type(self.t))} "
                f"{tuple(getattr(self.t, 'shape', ()))}"
            )
        if (
            not isinstance(self.eps, torch.Tensor)
            or self.eps.dim() != 5
            or self.eps.shape[:2] != self.t.shape
            or not self.eps.is_floating_point()
        ):
            raise ValueError(
                f"eps must be a floating tensor [B, S, C, H, W] with [B, S] = {tuple(self.t.shape)}"
                f", got {getattr(self.eps, 'dtype', type(self.eps))} "
                f"{tuple(getattr(self.eps, 'shape', ()))}"
            )

    @property
    def n_items(self) -> int:
        """B."""
        return self.t.shape[0]

    @property
    def n_samples(self) -> int:
        """S."""
        return self.t.shape[1]

    def chunk(self, start: int, stop: int) -> MCDraws:
        """Draws ``start:stop`` along the sample axis S (views, no copy)."""
        return MCDraws(t=self.t[:, start:stop], eps=self.eps[:, start:stop])

    def items(self, start: int, stop: int) -> MCDraws:
        """Items ``start:stop`` along the item axis B (views, no copy)."""
        return MCDraws(t=self.t[start:stop], eps=self.eps[start:stop])


def draw_mc(
    n_items: int,
    n_samples: int,
    image_shape: Sequence[int],
    num_timesteps: int,
    *,
    generator: torch.Generator,
    common: bool = False,
    dtype: torch.dtype = torch.float32,
) -> MCDraws:
    """Draw ``t ~ U{0..T-1}`` and ``eps ~ N(0, I)`` for every item and sample.

    Deterministic given the generator state: ``t`` is drawn first, then ``eps``, on the
    generator's device. Same seed and same arguments give the same draws, which is how to use
    common random numbers across two models.

    Args:
        n_items: B >= 1.
        n_samples: S >= 1.
        image_shape: ``(C, H, W)``.
        num_timesteps: T >= 1.
        generator: the source of randomness.
        common: draw one set of S draws and share it by all items (expanded views, rows equal).
        dtype: floating dtype of ``eps``.

    Returns:
        MCDraws with ``t`` ``[B, S]`` and ``eps`` ``[B, S, C, H, W]``.
    """
    for label, value in (("n_items", n_items), ("n_samples", n_samples), ("T", num_timesteps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{label} must be an int >= 1, got {value!r}")
    shape = tuple(image_shape)
    if len(shape) != 3 or any(not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"image_shape must be three positive ints (C, H, W), got {image_shape!r}")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    rows = 1 if common else n_items
    kw = {"generator": generator, "device": generator.device}
    t = torch.randint(0, num_timesteps, (rows, n_samples), dtype=torch.long, **kw)
    eps = torch.randn((rows, n_samples, *shape), dtype=dtype, **kw)
    if common:
        t = t.expand(n_items, n_samples)
        eps = eps.expand(n_items, n_samples, *shape)
    return MCDraws(t=t, eps=eps)


def _coef(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Float64 schedule tensor [T] indexed by ``t`` [N], cast to ``like``: ``[N]``."""
    return values.to(device=like.device)[t].to(like.dtype)


def per_draw(
    name: str,
    model: EpsModel,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    *,
    trajectory: torch.Tensor | None = None,
) -> torch.Tensor:
    """The measurement's value for every draw, in one batched forward of ``B * S`` rows.

    Differentiable; no in-place ops on inputs, no ``.item()``, no data-dependent control flow:
    safe under ``torch.func.vmap``/``grad``. ``t`` is not range-checked here (that would need
    data-dependent control flow); :func:`measure` and :func:`draw_mc` check it.

    Args:
        name: a measurement name (see :data:`MEASUREMENTS` and :func:`parse_measurement`).
        model: eps-prediction network, ``model(x_t [N, C, H, W], t [N] long) -> [N, C, H, W]``.
        schedule: the noise schedule.
        x0: the images measured, ``[B, C, H, W]``.
        t: 0-indexed timesteps, ``[B, S]`` long.
        eps: noise, ``[B, S, C, H, W]`` (unused by ``trajectory-logprob``).
        trajectory: for ``trajectory-logprob`` only (ignored otherwise): the sampling chains of
            the B items, ``[B, T + 1, C, H, W]`` with ``trajectory[:, 0] = x_T`` (as returned by
            :func:`diffusion.sampling.sample`).

    Returns:
        ``[B, S]`` per-draw values in the dtype of ``x0``; their mean over S is the estimate.
    """
    return per_draw_many((name,), model, schedule, x0, t, eps, trajectory=trajectory)[name]


SHARED_FORWARD: tuple[str, ...] = ("loss", "elbo", "square-norm", "mean-output")
"""Measurements that evaluate the model at the draws' own ``(t, eps)``: one forward serves all."""


def per_draw_many(
    names: Sequence[str],
    model: EpsModel,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    *,
    trajectory: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`per_draw` of several measurements at the same draws.

    One model forward per distinct model input: the :data:`SHARED_FORWARD` measurements share
    one (the ground truth measures ``loss`` and ``elbo`` of every retrained model: half the
    forwards), each ``timestep-loss:<k>`` and ``trajectory-logprob`` has its own.

    Args:
        names: measurement names (non-empty), each as :func:`per_draw` takes it.
        model: the eps-model.
        schedule: its noise schedule.
        x0: ``[B, C, H, W]`` clean images.
        t: ``[B, S]`` timesteps.
        eps: ``[B, S, C, H, W]`` noise.
        trajectory: ``[B, T + 1, C, H, W]`` sampling trajectories (``trajectory-logprob``).

    Returns:
        name -> ``[B, S]`` per-draw values, each bitwise what :func:`per_draw` returns for it.
    """
    if isinstance(names, str) or not names:
        raise ValueError(f"names must be a non-empty sequence of measurement names, got {names!r}")
    parsed = {name: parse_measurement(name, schedule.num_timesteps) for name in names}
    if x0.dim() != 4:
        raise ValueError(f"x0 must be [B, C, H, W], got shape {tuple(x0.shape)}")
    if t.dim() != 2 or t.shape[0] != x0.shape[0]:
        raise ValueError(f"t must be [B, S] with B = {x0.shape[0]}, got shape {tuple(t.shape)}")
    n_items, n_samples = t.shape
    pixel_shape = tuple(x0.shape[1:])
    if tuple(eps.shape) != (n_items, n_samples, *pixel_shape):
        raise ValueError(
            f"eps must be [B, S, C, H, W] = {(n_items, n_samples, *pixel_shape)}, "
            f"got {tuple(eps.shape)}"
        )
    rows = n_items * n_samples
    pixel_dims = tuple(range(1, 1 + len(pixel_shape)))
    eps_flat = eps.reshape(rows, *pixel_shape)  # [B*S, C, H, W]
    x0_flat = x0.unsqueeze(1).expand(n_items, n_samples, *pixel_shape).reshape(rows, *pixel_shape)

    def forward(t_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_flat [B*S], eps_hat [B*S, C, H, W]) of the model at the draws' noise and ``t_``."""
        t_flat = t_.reshape(rows)
        return t_flat, model(schedule.q_sample(x0_flat, t_flat, eps_flat), t_flat)

    shared = None
    out: dict[str, torch.Tensor] = {}
    for name, (base, param) in parsed.items():
        if base == "trajectory-logprob":
            out[name] = _trajectory_logprob(model, schedule, t, trajectory, x0)
            continue
        if base in SHARED_FORWARD:
            shared = forward(t) if shared is None else shared
            t_flat, eps_hat = shared
        else:  # timestep-loss: the model at its fixed timestep
            t_flat, eps_hat = forward(torch.full_like(t, param))
        if base == "square-norm":
            values = eps_hat.square().mean(dim=pixel_dims)  # [B*S]
        elif base == "mean-output":
            values = eps_hat.mean(dim=pixel_dims)  # [B*S]
        elif base in ("loss", "timestep-loss"):
            values = (eps_flat - eps_hat).square().mean(dim=pixel_dims)  # [B*S]
        elif base == "elbo":
            weights = _coef(schedule.elbo_weights * schedule.num_timesteps, t_flat, eps_hat)
            values = weights * (eps_flat - eps_hat).square().sum(dim=pixel_dims)  # [B*S]
        else:  # pragma: no cover - parse_measurement only returns the names above
            raise AssertionError(base)
        out[name] = values.reshape(n_items, n_samples)
    return out


def _trajectory_logprob(
    model: EpsModel,
    schedule: NoiseSchedule,
    t: torch.Tensor,
    trajectory: torch.Tensor | None,
    x0: torch.Tensor,
) -> torch.Tensor:
    """``T * log N(x_{t-1}; mu_theta(x_t, t), sigma_t^2 I)`` per draw (0 where t = 0): [B, S]."""
    num_t = schedule.num_timesteps
    if trajectory is None:
        raise ValueError(
            "measurement 'trajectory-logprob' needs the sampling trajectory: pass "
            "trajectory=[B, T + 1, C, H, W] (sample(..., return_trajectory=True).trajectory)"
        )
    n_items, n_samples = t.shape
    pixel_shape = tuple(x0.shape[1:])
    if tuple(trajectory.shape) != (n_items, num_t + 1, *pixel_shape):
        raise ValueError(
            f"trajectory must be [B, T + 1, C, H, W] = {(n_items, num_t + 1, *pixel_shape)} for "
            f"this schedule and x0, got {tuple(trajectory.shape)}"
        )
    rows = n_items * n_samples
    pixel_dims = tuple(range(1, 1 + len(pixel_shape)))
    # Code step t maps trajectory[:, T-1-t] (paper x_{t+1}) to trajectory[:, T-t] (paper x_t).
    index = (num_t - 1 - t).reshape(n_items, n_samples, *([1] * len(pixel_shape)))
    index = index.expand(n_items, n_samples, *pixel_shape)  # [B, S, C, H, W]
    x_in = torch.gather(trajectory, 1, index).reshape(rows, *pixel_shape)  # [B*S, C, H, W]
    x_out = torch.gather(trajectory, 1, index + 1).reshape(rows, *pixel_shape)
    t_flat = t.reshape(rows)  # [B*S]
    mean = posterior_mean(model, schedule, x_in, t_flat)  # [B*S, C, H, W]

    # sigma_0^2 = 0 has no density: use a placeholder variance of 1 there and mask the result,
    # so no inf/nan enters the graph (a masked nan would still poison the gradients).
    var64 = torch.cat([torch.ones(1, dtype=torch.float64), schedule.posterior_variance[1:]])
    num_pixels = math.prod(pixel_shape)
    var = _coef(var64, t_flat, mean)  # [B*S]
    log_norm = _coef(0.5 * num_pixels * torch.log(2.0 * math.pi * var64), t_flat, mean)  # [B*S]
    sq = (x_out - mean).square().sum(dim=pixel_dims)  # [B*S]
    logp = -0.5 * sq / var - log_norm  # [B*S]
    values = torch.where(t_flat > 0, num_t * logp, torch.zeros_like(logp))  # [B*S]
    return values.reshape(n_items, n_samples)


def measure(
    name: str,
    model: EpsModel,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    draws: MCDraws,
    *,
    trajectory: torch.Tensor | None = None,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Monte Carlo estimate of the measurement for each item: mean over S of :func:`per_draw`.

    Chunked so that each model forward has at most ``chunk_size`` rows (over S, and over items
    when B > chunk_size). Differentiable: gradients flow to the model and ``x0``; note that
    under autograd the graphs of all chunks are kept until backward (bound the memory of
    gradients by calling this on fewer draws at a time). Draws are moved to ``x0``'s
    device/dtype chunk by chunk.

    Args:
        name: a measurement name (see :data:`MEASUREMENTS`).
        model: eps-prediction network, ``model(x_t, t) -> eps_hat``.
        schedule: the noise schedule.
        x0: images, ``[B, C, H, W]``.
        draws: Monte Carlo draws with B items, ``t`` ``[B, S]``, ``eps`` ``[B, S, C, H, W]``.
        trajectory: ``[B, T + 1, C, H, W]``, required by ``trajectory-logprob``.
        chunk_size: maximum number of forward rows per chunk, >= 1.

    Returns:
        ``[B]`` estimates in the dtype of ``x0``.
    """
    return measure_many(
        (name,), model, schedule, x0, draws, trajectory=trajectory, chunk_size=chunk_size
    )[name]


def measure_many(
    names: Sequence[str],
    model: EpsModel,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    draws: MCDraws,
    *,
    trajectory: torch.Tensor | None = None,
    chunk_size: int = 4096,
) -> dict[str, torch.Tensor]:
    """:func:`measure` of several measurements on the same draws.

    Model forwards are shared as :func:`per_draw_many` shares them.

    Args:
        names: measurement names (non-empty).
        model: the eps-model.
        schedule: its noise schedule.
        x0: ``[B, C, H, W]`` clean images.
        draws: the Monte Carlo draws, ``t`` ``[B, S]`` and ``eps`` ``[B, S, C, H, W]``.
        trajectory: ``[B, T + 1, C, H, W]`` sampling trajectories (``trajectory-logprob``).
        chunk_size: draws evaluated per model call; does not change the values.

    Returns:
        name -> ``[B]``, each bitwise what :func:`measure` returns for it.
    """
    if isinstance(names, str) or not names:
        raise ValueError(f"names must be a non-empty sequence of measurement names, got {names!r}")
    for name in names:
        parse_measurement(name, schedule.num_timesteps)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if not isinstance(draws, MCDraws):
        raise ValueError(f"draws must be MCDraws, got {type(draws).__name__}")
    if x0.dim() != 4 or draws.n_items != x0.shape[0] or draws.eps.shape[2:] != x0.shape[1:]:
        raise ValueError(
            f"draws ({draws.n_items} items of {tuple(draws.eps.shape[2:])}) do not match x0 "
            f"{tuple(x0.shape)}; draw them with draw_mc(len(x0), S, x0.shape[1:], T, ...)"
        )
    if bool((draws.t < 0).any()) or bool((draws.t >= schedule.num_timesteps).any()):
        raise ValueError(
            f"draws.t must lie in [0, T) = [0, {schedule.num_timesteps}), got values in "
            f"[{int(draws.t.min())}, {int(draws.t.max())}]"
        )
    n_items, n_samples = draws.n_items, draws.n_samples
    items_per_chunk = min(n_items, chunk_size)
    samples_per_chunk = max(1, chunk_size // items_per_chunk)
    results: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for i0 in range(0, n_items, items_per_chunk):
        i1 = min(i0 + items_per_chunk, n_items)
        item_draws = draws.items(i0, i1)
        item_traj = None if trajectory is None else trajectory[i0:i1].to(x0)
        totals: dict[str, torch.Tensor] = {}
        for s0 in range(0, n_samples, samples_per_chunk):
            part = item_draws.chunk(s0, min(s0 + samples_per_chunk, n_samples))
            values = per_draw_many(
                names,
                model,
                schedule,
                x0[i0:i1],
                part.t.to(x0.device),
                part.eps.to(x0),
                trajectory=item_traj,
            )  # name -> [b, s]
            for name, v in values.items():
                totals[name] = v.sum(dim=1) if name not in totals else totals[name] + v.sum(dim=1)
        for name in names:
            results[name].append(totals[name] / n_samples)
    return {name: torch.cat(parts) for name, parts in results.items()}  # name -> [B]
