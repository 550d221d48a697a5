"""Training loop of the DDPM epsilon-prediction model (Ho et al. 2020's simple loss).

Each step: draw a minibatch of training images (reshuffled epochs, see ``TrainConfig``),
optionally flip each image horizontally with probability 1/2, draw ``t ~ U{0, ..., T-1}`` and
``eps ~ N(0, I)`` per image, and take an Adam step on the batch mean of ``diffusion_loss``.

Randomness: every draw comes from ``torch.Generator`` objects seeded from ``seed`` (model init,
minibatch order, flips, t, eps). Dropout draws from the global RNG by necessity (``nn.Dropout``
takes no generator), so training runs inside ``torch.random.fork_rng`` with the global RNG
re-seeded from ``seed``: the caller's global RNG state is restored afterwards and untouched.
On the CPU the result is bitwise reproducible for a fixed seed (same torch build and thread
count). No EMA of the weights is kept (Ho et al. sample from an EMA; the paper does not say).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from diffusion.backends import DiffusersUNetConfig, backend_of, build_denoiser
from diffusion.schedule import NoiseSchedule
from diffusion.unet import UNetConfig

__all__ = [
    "LR_SCHEDULES",
    "TrainConfig",
    "TrainingCheckpoint",
    "diffusion_loss",
    "evenly_spaced_steps",
    "learning_rate",
    "train_model",
]

LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation hyper-parameters (Adam).

    Attributes:
        steps: number of optimiser steps (>= 1).
        batch_size: images per step (>= 1). Batches are cut from a stream of reshuffled epochs:
            concatenated independent random permutations of the training set, so every example
            is used equally often (up to one epoch) and a batch may straddle two epochs.
        lr: peak learning rate (> 0). Default 2e-4, Ho et al.'s CIFAR-10 value.
        lr_schedule: "constant" or "cosine" (after warmup, decay as
            ``lr * (1 + cos(pi * (step - warmup_steps) / (steps - warmup_steps))) / 2``; the
            paper trains its CIFAR models with a cosine schedule). See ``learning_rate``.
        warmup_steps: linear warmup steps, in [0, steps]: step s < warmup_steps uses
            ``lr * (s + 1) / warmup_steps``. Default 0 (Ho et al. use 5000 on CIFAR-10).
        grad_clip: maximum global L2 norm of the gradient (Ho et al.: 1.0), or None for no
            clipping.
        hflip: random horizontal flips (probability 1/2 per image and step) as augmentation
            (Ho et al. use them on CIFAR-10; pointless for digits).
        weight_decay: L2 penalty coefficient of ``torch.optim.Adam`` (coupled: adds
            ``weight_decay * theta`` to the gradient after clipping), >= 0. Default 0.
    """

    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    hflip: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a finite positive float, got {self.lr!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if (
            not isinstance(self.warmup_steps, int)
            or isinstance(self.warmup_steps, bool)
            or not 0 <= self.warmup_steps <= self.steps
        ):
            raise ValueError(
                f"warmup_steps must be an int in [0, steps={self.steps}], got {self.warmup_steps!r}"
            )
        if self.grad_clip is not None and (
            not isinstance(self.grad_clip, (int, float))
            or not math.isfinite(self.grad_clip)
            or self.grad_clip <= 0
        ):
            raise ValueError(
                f"grad_clip must be a finite positive float or None (no clipping), got {self.grad_clip!r}"
            )
        if not isinstance(self.hflip, bool):
            raise ValueError(f"hflip must be a bool, got {self.hflip!r}")
        if (
            not isinstance(self.weight_decay, (int, float))
            or not math.isfinite(self.weight_decay)
            or self.weight_decay < 0
        ):
            raise ValueError(f"weight_decay must be a finite float >= 0, got {self.weight_decay!r}")


def learning_rate(config: TrainConfig, step: int) -> float:
    """Learning rate of 0-indexed ``step`` in ``[0, config.steps)``.

    ``w = warmup_steps``, ``S = steps``:
    - ``step < w``: ``lr * (step + 1) / w`` (linear warmup reaching ``lr`` at step ``w - 1``);
    - "constant": ``lr``;
    - "cosine": ``lr * (1 + cos(pi * (step - w) / (S - w))) / 2`` (``lr`` at step ``w``,
      ``lr / 2`` half-way, just above 0 at the last step ``S - 1``).
    """
    if not 0 <= step < config.steps:
        raise ValueError(f"step must be in [0, steps={config.steps}), got {step}")
    w = config.warmup_steps
    if step < w:
        return config.lr * (step + 1) / w
    if config.lr_schedule == "constant":
        return config.lr
    progress = (step - w) / (config.steps - w)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class TrainingCheckpoint:
    """The weights after some optimiser steps, as :func:`train_model` hands them out.

    Attributes:
        step: number of optimiser steps completed, in ``[1, steps]`` (``steps``: the final
            model).
        learning_rate: the learning rate of the last of those steps, ``learning_rate(config,
            step - 1)``: the step size of the stretch of training that ends at this checkpoint.
        state_dict: the model's weights at that point (detached float32 copies on the CPU).
    """

    step: int
    learning_rate: float
    state_dict: dict[str, torch.Tensor]


def evenly_spaced_steps(steps: int, n_checkpoints: int) -> tuple[int, ...]:
    """``n_checkpoints`` evenly spaced checkpoint steps ending at the final model.

    Checkpoint ``k`` (0-indexed) is taken after ``(k + 1) * steps // n_checkpoints`` completed
    steps, so the last one is the trained model (TracIn's checkpoints at the end of each
    stretch of training, Pruthi et al. 2020).

    Args:
        steps: the training's optimiser steps (``TrainConfig.steps``).
        n_checkpoints: how many checkpoints, in ``[1, steps]``.

    Returns:
        strictly increasing completed-step counts in ``[1, steps]``, the last one ``steps``.
    """
    if isinstance(n_checkpoints, bool) or not isinstance(n_checkpoints, int):
        raise ValueError(f"n_checkpoints must be an int, got {n_checkpoints!r}")
    if not 1 <= n_checkpoints <= steps:
        raise ValueError(
            f"n_checkpoints must be in [1, steps={steps}], got {n_checkpoints}: a checkpoint "
            "needs at least one optimiser step of its own"
        )
    return tuple((k + 1) * steps // n_checkpoints for k in range(n_checkpoints))


def diffusion_loss(
    model: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
) -> torch.Tensor:
    """Per-example simple DDPM loss: mean over pixels of ``(eps - eps_theta(x_t, t))^2``.

    ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``. One (t, eps) draw per example; the training
    loss is the mean over the batch. (Monte Carlo measurements live in ``diffusion.measurements``.)

    Args:
        model: eps-prediction network, ``model(x_t [B, C, H, W], t [B]) -> [B, C, H, W]``.
        schedule: the noise schedule.
        x0: clean images, [B, C, H, W].
        t: 0-indexed timesteps, [B] long.
        eps: noise, [B, C, H, W].

    Returns:
        [B] per-example losses (differentiable).
    """
    x_t = schedule.q_sample(x0, t, eps)  # [B, C, H, W]
    return (eps - model(x_t, t)).square().flatten(1).mean(dim=1)


def _epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless [batch_size] index batches cut from concatenated random permutations of range(n)."""
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while pending.numel() < batch_size:
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


@contextmanager
def _private_global_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the global RNG of the CPU (and of a CUDA ``device``) with ``seed`` inside the block.

    The caller's state is restored afterwards. Used for dropout, which has no generator argument.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        fork = torch.random.fork_rng(devices=[index], device_type="cuda")
    else:
        index = None
        fork = torch.random.fork_rng(devices=[])
    with fork:
        torch.default_generator.manual_seed(seed)
        if index is not None:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def _check_images(images: torch.Tensor, config: UNetConfig | DiffusersUNetConfig) -> None:
    expected = (config.image_channels, config.image_size, config.image_size)
    if (
        not isinstance(images, torch.Tensor)
        or images.dim() != 4
        or tuple(images.shape[1:]) != expected
    ):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(
            f"images must be a tensor [N, {', '.join(map(str, expected))}], got {shape}"
        )
    if images.shape[0] == 0:
        raise ValueError("images is empty: need at least one training image")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1], got dtype {images.dtype}")
    lo, hi = images.min().item(), images.max().item()
    if lo < -1.001 or hi > 1.001:
        raise ValueError(
            f"images must lie in [-1, 1] (got range [{lo:.3g}, {hi:.3g}]): rescale, e.g. x / 127.5 - 1"
        )


def _check_checkpoint_steps(
    checkpoint_steps: Sequence[int],
    on_checkpoint: Callable[[TrainingCheckpoint], None] | None,
    steps: int,
) -> frozenset[int]:
    """The requested checkpoint steps as a set, validated against ``steps``."""
    wanted = list(checkpoint_steps)
    for value in wanted:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= steps:
            raise ValueError(
                f"checkpoint_steps must hold ints in [1, steps={steps}] (completed steps), "
                f"got {value!r}"
            )
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"checkpoint_steps has repeated steps: {wanted}")
    if wanted and on_checkpoint is None:
        raise ValueError("checkpoint_steps needs on_checkpoint, which receives the checkpoints")
    if not wanted and on_checkpoint is not None:
        raise ValueError("on_checkpoint is given but checkpoint_steps is empty: no checkpoint")
    return frozenset(wanted)


def _checkpoint(model: nn.Module, step: int, lr: float) -> TrainingCheckpoint:
    """Detached float32 CPU copies of ``model``'s weights after ``step`` completed steps."""
    weights = {
        name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()
    }
    return TrainingCheckpoint(step=step, learning_rate=float(lr), state_dict=weights)


def train_model(
    images: torch.Tensor,
    unet_config: UNetConfig | DiffusersUNetConfig,
    train_config: TrainConfig,
    *,
    seed: int,
    schedule: NoiseSchedule | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    init_model: nn.Module | None = None,
    checkpoint_steps: Sequence[int] = (),
    on_checkpoint: Callable[[TrainingCheckpoint], None] | None = None,
) -> nn.Module:
    """Train a model of either backend from scratch (or from a copy of ``init_model``).

    Checkpoints (for TracIn-CP) are copies of the weights handed to ``on_checkpoint`` after the
    steps listed in ``checkpoint_steps``; taking them draws no random number and changes no
    weight, so the trained model is bitwise the same with and without them.

    Args:
        images: training set, [N, C, H, W], float in [-1, 1].
        unet_config: architecture: a harness ``UNetConfig`` or a ``DiffusersUNetConfig``
            (``diffusion.backends``; the model is built by ``build_denoiser``); must match
            ``init_model.config`` when that is given.
        train_config: optimisation hyper-parameters.
        seed: determines everything random: the initial weights, minibatch order, flips, t, eps
            and dropout. Same seed -> bitwise identical weights on the CPU.
        schedule: noise schedule; default ``NoiseSchedule()`` (T = 1000, linear 1e-4..0.02).
        device: where to train; generators for t/eps/flips live there (so CUDA runs are
            reproducible on the same GPU, not bitwise equal to CPU runs).
        progress: show a tqdm bar with the running loss.
        init_model: start from a deep copy of these weights instead of a fresh initialisation
            (``init_model`` itself is not modified).
        checkpoint_steps: completed-step counts in ``[1, train_config.steps]`` after which to
            hand a :class:`TrainingCheckpoint` to ``on_checkpoint`` (e.g.
            :func:`evenly_spaced_steps`); empty: none.
        on_checkpoint: receives each checkpoint, in step order; required iff
            ``checkpoint_steps`` is not empty.

    Returns:
        the trained model, float32, in eval mode, on the CPU.
    """
    if not isinstance(train_config, TrainConfig):
        raise ValueError(f"train_config must be a TrainConfig, got {type(train_config).__name__}")
    try:
        backend_of(unet_config)
    except TypeError as error:
        raise ValueError(f"unet_config: {error}") from None
    if init_model is not None and init_model.config != unet_config:
        raise ValueError(
            f"init_model.config {init_model.config} differs from unet_config {unet_config}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    _check_images(images, unet_config)
    wanted = _check_checkpoint_steps(checkpoint_steps, on_checkpoint, train_config.steps)
    schedule = NoiseSchedule() if schedule is None else schedule
    device = torch.device(device)

    master = torch.Generator().manual_seed(seed)
    init_seed, index_seed, data_seed, dropout_seed = torch.randint(
        0, 2**62, (4,), generator=master
    ).tolist()
    init_gen = torch.Generator().manual_seed(init_seed)  # weights (CPU)
    index_gen = torch.Generator().manual_seed(index_seed)  # minibatch order (CPU)
    data_gen = torch.Generator(device=device).manual_seed(data_seed)  # flips, t, eps

    with _private_global_rng(device, dropout_seed):
        if init_model is None:
            model = build_denoiser(unet_config, generator=init_gen)
        else:
            model = copy.deepcopy(init_model).float()
        model = model.to(device).train()
        optimizer = torch.optim.Adam(
            model.parameters(),
            lr=learning_rate(train_config, 0),
            weight_decay=train_config.weight_decay,
        )
        data = images.detach().to(device=device, dtype=torch.float32)  # [N, C, H, W]
        batches = _epoch_batches(data.shape[0], train_config.batch_size, index_gen)
        bar = tqdm(total=train_config.steps, desc="train", disable=not progress, leave=False)
        with bar:
            for step in range(train_config.steps):
                idx = next(batches).to(device)  # [B]
                x0 = data[idx]  # [B, C, H, W]
                if train_config.hflip:
                    flip = torch.rand(x0.shape[0], generator=data_gen, device=device) < 0.5  # [B]
                    x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
                t = torch.randint(
                    0, schedule.num_timesteps, (x0.shape[0],), generator=data_gen, device=device
                )  # [B]
                eps = torch.randn(x0.shape, generator=data_gen, device=device, dtype=x0.dtype)
                loss = diffusion_loss(model, schedule, x0, t, eps).mean()

                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if train_config.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
                lr = learning_rate(train_config, step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                if step + 1 in wanted:
                    on_checkpoint(_checkpoint(model, step + 1, lr))
                if progress:
                    bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", refresh=False)
                bar.update(1)
    return model.cpu().eval()
