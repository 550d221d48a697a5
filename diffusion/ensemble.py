"""Train several U-Nets at once: one vmapped forward/backward and one Adam step per step.

For the LDS ground truth many small models are retrained (quick preset: 64 models of 72k
parameters, 1500 steps each). ``train_ensemble`` stacks the K members' parameters into one
``[K, P]`` tensor, runs the forward pass of all members as one ``torch.func.vmap`` over
``torch.func.functional_call``, backpropagates the sum of the members' losses (member k's loss
depends only on its own row, so row k of the gradient is member k's gradient) and steps the
stacked tensor with one ``torch.optim.Adam``. This removes the per-model Python, dispatch and
optimizer overhead (Adam over ~140 parameter tensors), not the convolutions' arithmetic.
GroupNorm and two kinds of convolution run through batching rules of our own
(:mod:`diffusion.member_layers`) instead of torch.func's generic rules for them. Where the time
goes and the throughput gained: perf/README.md ("Ensemble training").

Same random streams as ``train_model``: member k draws its initial weights, minibatch order and
(flip, t, eps) from generators seeded exactly as ``train_model(images[subsets[k]], ...,
seed=seeds[k])`` seeds them, in the same order, so member k follows that run's recipe step by
step. Why the result is still not bitwise equal:

- the vmapped kernels differ from the single-model ones (a convolution of K members becomes a
  grouped convolution or a batched matrix product, group norms of K members one group norm of
  K times the groups), so sums are accumulated in another order: float32 rounding differences
  of ~1e-7 relative per step, which the training dynamics then amplify over many steps (like
  any perturbation of the weights);
- gradient clipping uses each member's global norm computed over its whole gradient row at once
  (``train_model``'s ``clip_grad_norm_`` takes the norm of the per-tensor norms: same value up
  to rounding).

Everything else is exact: Adam is elementwise (``torch.optim.Adam``'s default single-tensor
path on the CPU, as in ``train_model``; its only cross-parameter quantity is the step count,
equal for every member), the learning rate of every step is ``learning_rate(config, step)``,
weight decay is elementwise.

Independent of the other members: member k's weights depend only on its own (subset, seed), not
on how many or which other members share its ensemble, bitwise (CPU, fixed thread count; the
vmapped kernels compute each member's slice on its own: grouped convolutions per group, batched
matrix products per matrix, group norm per group, and convolutions whose grouped kernel would
depend on K, such as the input convolution's, one per member: :mod:`diffusion.member_layers`).
A lone member (K = 1) would run the ungrouped kernels instead, so it is trained next to a twin
of itself. Hence missing members of an interrupted ground truth can be retrained in a smaller
ensemble and match an uninterrupted run.
Checked by tests/diffusion/test_ensemble.py; on CUDA, cuDNN's algorithm choice may depend on K.

Measured agreement with ``train_model`` (tests/diffusion/test_ensemble.py and the numbers in
``benchmarks/groundtruth.py``):

- float64 (``dtype=torch.float64`` against ``train_model``'s loop run in float64): max abs
  weight difference ~3e-14 after 5 steps with clipping active at every step, cosine schedule,
  flips and weight decay: the two compute the same function;
- float32, one step: ~5e-10 max abs weight difference; 5 steps: ~1e-6;
- float32, full quick recipe (1500 steps, 8 models): max abs weight difference ~1e-4 (relative
  L2 ~8e-6, against ~1.2 between two seeds); the ground-truth loss measurement (32 images x
  256 common MC draws) differs by 1e-8 on average (1.2e-7 relative), ~4e-6 times the
  difference between two seeds of the same subset (2.5e-3).

Dropout: ``nn.Dropout`` draws from the global RNG; under ``vmap`` it would need
``randomness="different"``, which draws one batched mask from one stream and cannot reproduce
``train_model``'s per-seed masks. ``train_ensemble`` therefore refuses ``dropout > 0`` with a
``ValueError`` (train such models with ``train_model``) rather than silently using other masks.

Backends: the members are harness U-Nets (``diffusion.unet``), whose layers have the batched
rules of :mod:`diffusion.member_layers`; a diffusers model trains one at a time with
``train_model``. :func:`ensemble_trainable` says which configs this module trains.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.utils import parameters_to_vector
from tqdm.auto import tqdm

from diffusion.backends import build_denoiser
from diffusion.member_layers import use_member_layers
from diffusion.schedule import NoiseSchedule
from diffusion.train import (
    TrainConfig,
    _check_images,
    _epoch_batches,
    diffusion_loss,
    learning_rate,
)
from diffusion.unet import UNetConfig

__all__ = ["ENSEMBLE_KERNELS", "ensemble_trainable", "train_ensemble"]

ENSEMBLE_KERNELS = 3
"""Version of the ensemble's kernels, recorded in ground-truth model specs: bumped whenever a
change alters the rounding of ensemble training (2: the batching rules of
:mod:`diffusion.member_layers`; 3: the input convolution, 1 or 3 channels per member, runs one
convolution per member instead of a grouped one whose kernel depended on K), so that models of
two versions never share one ground truth."""

_DTYPES = (torch.float32, torch.float64)


def ensemble_trainable(unet_config: object) -> bool:
    """Whether :func:`train_ensemble` trains models of ``unet_config``.

    A harness ``UNetConfig`` without dropout; not a diffusers config (its layers have no
    batched member rules) nor dropout (see the module docstring): those train one at a time
    with ``train_model``.
    """
    return isinstance(unet_config, UNetConfig) and unet_config.dropout == 0


def _check_subsets(subsets: Sequence[torch.Tensor], n_images: int) -> list[torch.Tensor]:
    """Validate the members' index tensors; returns them as CPU long tensors."""
    if isinstance(subsets, torch.Tensor) or not isinstance(subsets, Sequence) or not subsets:
        raise ValueError(
            "subsets must be a non-empty list of 1-D index tensors (one per member), got "
            f"{type(subsets).__name__}"
        )
    out = []
    for k, subset in enumerate(subsets):
        subset = torch.as_tensor(subset)
        if subset.dim() != 1 or subset.numel() == 0 or subset.is_floating_point():
            raise ValueError(
                f"subsets[{k}] must be a non-empty 1-D integer index tensor, got dtype "
                f"{subset.dtype} and shape {tuple(subset.shape)}"
            )
        if subset.min().item() < 0 or subset.max().item() >= n_images:
            raise ValueError(
                f"subsets[{k}] holds indices outside [0, {n_images}) (the number of images)"
            )
        out.append(subset.to(device="cpu", dtype=torch.long))
    lengths = sorted({s.numel() for s in out})
    if len(lengths) > 1:
        raise ValueError(
            f"all subsets must have the same length to share one ensemble, got lengths {lengths}: "
            "group members by subset size (or train them with train_model)"
        )
    return out


def _member_generators(
    seed: int, device: torch.device
) -> tuple[torch.Generator, torch.Generator, torch.Generator]:
    """(init, index, data) generators seeded exactly as ``train_model`` seeds them."""
    master = torch.Generator().manual_seed(seed)
    init_seed, index_seed, data_seed, _dropout_seed = torch.randint(
        0, 2**62, (4,), generator=master
    ).tolist()
    return (
        torch.Generator().manual_seed(init_seed),
        torch.Generator().manual_seed(index_seed),
        torch.Generator(device=device).manual_seed(data_seed),
    )


def train_ensemble(
    images: torch.Tensor,
    subsets: Sequence[torch.Tensor],
    unet_config: UNetConfig,
    train_config: TrainConfig,
    *,
    seeds: Sequence[int],
    schedule: NoiseSchedule | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    dtype: torch.dtype = torch.float32,
) -> list[nn.Module]:
    """Train K = ``len(seeds)`` U-Nets from scratch at once, member k on ``images[subsets[k]]``.

    Member k follows the random streams of ``train_model(images[subsets[k]], unet_config,
    train_config, seed=seeds[k], schedule=schedule, device=device)``: same initial weights,
    minibatch order, flips, t and eps, same learning rates, Adam and per-member gradient
    clipping. Its weights equal that run's up to floating-point rounding (see the module
    docstring), not bitwise.

    Args:
        images: the pool the subsets index into, [N, C, H, W], float in [-1, 1].
        subsets: K index tensors into ``images``, each [n] (the same n for every member); the
            order of a subset is the order of that member's training set (as in
            ``images[subsets[k]]``).
        unet_config: architecture of every member; ``dropout`` must be 0.
        train_config: optimisation recipe of every member.
        seeds: K ints, member k's ``train_model`` seed.
        schedule: noise schedule; default ``NoiseSchedule()``.
        device: where to train (generators for flips/t/eps live there, as in ``train_model``).
        progress: show a tqdm bar with the members' mean loss.
        dtype: float32 (default, as ``train_model``) or float64 (exactness checks: parameters,
            images and the eps draws in float64).

    Returns:
        K trained models, in ``dtype``, eval mode, on the CPU; entry k belongs to ``seeds[k]``.

    Raises:
        ValueError: invalid configs, images, subsets or seeds, or ``unet_config.dropout > 0``.
    """
    if not isinstance(train_config, TrainConfig):
        raise ValueError(f"train_config must be a TrainConfig, got {type(train_config).__name__}")
    if not isinstance(unet_config, UNetConfig):
        raise ValueError(f"unet_config must be a UNetConfig, got {type(unet_config).__name__}")
    if unet_config.dropout > 0:
        raise ValueError(
            f"train_ensemble needs unet_config.dropout == 0 (got {unet_config.dropout}): dropout "
            "masks under vmap cannot follow train_model's per-seed random stream; train models "
            "with dropout one at a time with train_model"
        )
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    _check_images(images, unet_config)
    members = _check_subsets(subsets, images.shape[0])
    if (
        isinstance(seeds, (str, bytes, torch.Tensor))
        or not isinstance(seeds, Sequence)
        or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds)
    ):
        raise ValueError(f"seeds must be a list of ints (one per member), got {seeds!r}")
    if len(seeds) != len(members):
        raise ValueError(
            f"got {len(seeds)} seeds for {len(members)} subsets: pass one seed per member"
        )
    schedule = NoiseSchedule() if schedule is None else schedule
    device = torch.device(device)
    seeds = list(seeds)
    n_requested = len(members)
    if n_requested == 1:
        # vmap over a single member runs ungrouped kernels whose rounding differs from the
        # grouped ones; a twin keeps a lone member bitwise equal to its ensemble-trained self.
        members, seeds = members * 2, seeds * 2
    n_members, batch = len(members), train_config.batch_size

    generators = [_member_generators(seed, device) for seed in seeds]
    models = [
        build_denoiser(unet_config, generator=init_gen).to(dtype) for init_gen, _, _ in generators
    ]
    batches = [
        _epoch_batches(s.numel(), batch, index_gen)
        for s, (_, index_gen, _) in zip(members, generators, strict=True)
    ]
    data_gens = [data_gen for _, _, data_gen in generators]

    # Parameter-free copy of the architecture for functional_call; its parameters are replaced
    # by views of the stacked [K, P] tensor (member k's row = parameters_to_vector(model k)).
    skeleton = use_member_layers(copy.deepcopy(models[0]).to("meta").train())
    names = [name for name, _ in skeleton.named_parameters()]
    shapes = [tuple(p.shape) for _, p in skeleton.named_parameters()]
    numels = [p.numel() for _, p in skeleton.named_parameters()]
    stacked = torch.stack([parameters_to_vector(m.parameters()) for m in models])  # [K, P]
    stacked = stacked.detach().to(device).requires_grad_(True)
    optimizer = torch.optim.Adam(
        [stacked], lr=learning_rate(train_config, 0), weight_decay=train_config.weight_decay
    )

    def member_loss(
        params: dict[str, torch.Tensor], x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
    ) -> torch.Tensor:
        """One member's batch-mean loss: x0, eps [B, C, H, W], t [B] -> scalar."""

        def eps_model(x_t: torch.Tensor, t_: torch.Tensor) -> torch.Tensor:
            return functional_call(skeleton, params, (x_t, t_))

        return diffusion_loss(eps_model, schedule, x0, t, eps).mean()

    batched_loss = vmap(member_loss)  # -> [K]
    pool = images.detach().to(device=device, dtype=dtype)  # [N, C, H, W]
    member_index = torch.stack(members).to(device)  # [K, n]
    image_shape = tuple(images.shape[1:])
    bar = tqdm(total=train_config.steps, desc="train ensemble", disable=not progress, leave=False)
    with bar:
        for step in range(train_config.steps):
            positions = torch.stack([next(b) for b in batches]).to(device)  # [K, B]
            x0 = pool[torch.gather(member_index, 1, positions)]  # [K, B, C, H, W]
            flips, ts, epss = [], [], []
            for gen in data_gens:  # each member's data stream, in train_model's call order
                if train_config.hflip:
                    flips.append(torch.rand(batch, generator=gen, device=device) < 0.5)
                ts.append(
                    torch.randint(0, schedule.num_timesteps, (batch,), generator=gen, device=device)
                )
                epss.append(
                    torch.randn((batch, *image_shape), generator=gen, device=device, dtype=dtype)
                )
            if train_config.hflip:
                flip = torch.stack(flips)  # [K, B]
                x0 = torch.where(flip[:, :, None, None, None], x0.flip(-1), x0)
            t, eps = torch.stack(ts), torch.stack(epss)  # [K, B], [K, B, C, H, W]

            pieces = stacked.split(numels, dim=1)  # views [K, numel_i]
            params = {
                name: piece.view(n_members, *shape)
                for name, piece, shape in zip(names, pieces, shapes, strict=True)
            }
            losses = batched_loss(params, x0, t, eps)  # [K]
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()  # member k's row of the gradient = d loss_k / d theta_k
            if train_config.grad_clip is not None:
                with torch.no_grad():
                    grad = stacked.grad  # [K, P]
                    norms = torch.linalg.vector_norm(grad, dim=1)  # [K]
                    coef = torch.clamp(train_config.grad_clip / (norms + 1e-6), max=1.0)
                    grad.mul_(coef[:, None])
            lr = learning_rate(train_config, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            if progress:
                bar.set_postfix(loss=f"{losses.mean().item():.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)

    final = stacked.detach().cpu()  # [K, P]
    with torch.no_grad():
        for model, row in zip(models, final, strict=True):
            for param, piece in zip(model.parameters(), row.split(numels), strict=True):
                param.copy_(piece.view_as(param))  # own storage per tensor (safetensors-safe)
    return [model.eval() for model in models[:n_requested]]
