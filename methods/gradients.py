"""The one per-example gradient engine: Monte Carlo gradients of an output function.

The gradient of example ``j`` is ``grad_theta (1/S) sum_s m_s(theta, x_j)``, the mean over its S
Monte Carlo draws ``(t_s, eps_s[, flip_s])`` of the per-draw output function ``m``: any
measurement of :mod:`diffusion.measurements` (the training loss, the ELBO, the square norm of
D-TRAK, the loss at one timestep, the trajectory log-probability, ...). Every method that needs
per-example gradients (K-FAC, TRAK, D-TRAK, ...) gets them here; TRAK through a thin traker
adapter (``methods.trak``). There is no Python loop over draws; three backends:

- ``"hooks"`` (default where it applies): one forward pass over all ``B * S`` rows of a chunk
  records each layer's inputs and outputs, one ``autograd.grad`` gives the outputs' gradients,
  and each example's weight gradient is formed from them (a ``bmm`` for linear layers, one
  grouped weight-gradient convolution for ``nn.Conv2d``). Its cost against ``vmap`` and a
  plain batched backward pass: perf/README.md ("Per-example gradients"). Needs a
  :class:`ParameterLayout` (Linear/Conv2d layers only).
- ``"vmap"``: ``torch.func.vmap(grad(f))`` over the examples with ``functional_call``, the S
  draws of one example batched inside one forward; works for any parameter.
- ``"loop"``: the same per-example function, one ``autograd.grad`` per example (any
  parameter; on CPU about 2x faster than ``vmap`` for the U-Net, and less memory).

``"auto"`` picks hooks where they apply, else loop on CPU and vmap elsewhere.

Parameters (the *layout* of the flat gradient):

- :class:`ParameterLayout` (K-FAC): the weights and biases of the ``nn.Linear`` and
  ``nn.Conv2d`` modules (attention projections included); normalisation layers are left out, as
  in the paper (App. G.3). For each such module the matrix ``[weight.flatten(1) | bias]``
  (``[d_out, d_in (+ 1)]``, row-major), one after the other: the joint weight-and-bias layout of
  a Kronecker-factored curvature block.
- :class:`ParameterList` (TRAK): every parameter, each flattened, in ``named_parameters``
  order (the order in which traker vectorises gradients).

Randomness: the draws of example ``j`` come from its own ``torch.Generator`` seeded with
:func:`example_seed` ``(seed, stream, j)``, so gradients do not depend on the chunk size or on
which other examples share a chunk. With ``hflip`` every draw also flips the image left-right
with probability 1/2 (expectation over augmentations, paper App. G.8).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from diffusion.measurements import draw_mc, parse_measurement, per_draw
from diffusion.schedule import NoiseSchedule

__all__ = [
    "CURVATURE_MODULE_TYPES",
    "GRADIENT_BACKENDS",
    "ExampleDraws",
    "GradientLayout",
    "LayerBlock",
    "ParameterLayout",
    "ParameterList",
    "draw_examples",
    "example_generator",
    "example_seed",
    "iter_gradient_chunks",
    "per_example_gradients",
    "resolve_backend",
]

GRADIENT_BACKENDS: tuple[str, ...] = ("auto", "hooks", "vmap", "loop")
"""Backends of :func:`per_example_gradients` (module docstring)."""

CURVATURE_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
"""Modules whose parameters are attributed (and Kronecker-factored)."""


@dataclass(frozen=True)
class LayerBlock:
    """One ``nn.Linear``/``nn.Conv2d`` module in the flat parameter layout.

    Attributes:
        module: qualified module name in the model (``""`` for a bare layer).
        weight: qualified name of its weight parameter.
        bias: qualified name of its bias parameter, or None.
        d_out: output features (rows of the block matrix).
        d_in: weight elements per output feature (``in * kh * kw`` for convolutions).
        offset: first column of the block in the flat layout.
    """

    module: str
    weight: str
    bias: str | None
    d_out: int
    d_in: int
    offset: int

    @property
    def cols(self) -> int:
        """Columns of the block matrix: ``d_in + 1`` with a bias, else ``d_in``."""
        return self.d_in + (self.bias is not None)

    @property
    def size(self) -> int:
        """Number of parameters in the block, ``d_out * cols``."""
        return self.d_out * self.cols


@dataclass(frozen=True)
class ParameterLayout:
    """The attributed parameters and their flat layout ``# [n_params]``.

    Attributes:
        blocks: one entry per ``nn.Linear``/``nn.Conv2d`` module holding a parameter, in
            ``model.named_modules()`` order.
        n_params: total number of attributed parameters.
    """

    blocks: tuple[LayerBlock, ...]
    n_params: int

    @classmethod
    def from_model(cls, model: nn.Module) -> ParameterLayout:
        """The layout of every ``nn.Linear``/``nn.Conv2d`` weight (and bias) of ``model``."""
        blocks: list[LayerBlock] = []
        offset = 0
        seen: set[int] = set()
        for name, module in model.named_modules():
            if not isinstance(module, CURVATURE_MODULE_TYPES) or module.weight is None:
                continue
            if id(module) in seen:
                raise ValueError(
                    f"module {name!r} appears twice in the model (shared module): per-layer "
                    "gradients and Kronecker factors need each layer to be used once"
                )
            seen.add(id(module))
            prefix = f"{name}." if name else ""
            d_out = module.weight.shape[0]
            block = LayerBlock(
                module=name,
                weight=prefix + "weight",
                bias=prefix + "bias" if module.bias is not None else None,
                d_out=d_out,
                d_in=module.weight.numel() // d_out,
                offset=offset,
            )
            blocks.append(block)
            offset += block.size
        if not blocks:
            raise ValueError(
                "the model has no nn.Linear or nn.Conv2d layer: there is nothing to attribute"
            )
        return cls(blocks=tuple(blocks), n_params=offset)

    def param_names(self) -> list[str]:
        """Qualified parameter names, weight then bias per block."""
        names: list[str] = []
        for block in self.blocks:
            names.append(block.weight)
            if block.bias is not None:
                names.append(block.bias)
        return names

    def block_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-block matrices of a flat batch, as views.

        Args:
            flat: ``# [B, n_params]`` in this layout.

        Returns:
            one ``# [B, d_out, cols]`` view per block.
        """
        if flat.dim() != 2 or flat.shape[1] != self.n_params:
            raise ValueError(f"expected [B, {self.n_params}], got {tuple(flat.shape)}")
        return [
            flat[:, b.offset : b.offset + b.size].view(-1, b.d_out, b.cols) for b in self.blocks
        ]

    def flatten(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate per-parameter gradients into the flat layout.

        Args:
            grads: qualified name -> ``# [B, *param.shape]``.

        Returns:
            ``# [B, n_params]``.
        """
        parts = []
        for block in self.blocks:
            weight = grads[block.weight]
            rows = weight.reshape(weight.shape[0], block.d_out, block.d_in)
            if block.bias is not None:
                rows = torch.cat([rows, grads[block.bias].unsqueeze(-1)], dim=-1)
            parts.append(rows.flatten(1))
        return torch.cat(parts, dim=1)


@dataclass(frozen=True)
class ParameterList:
    """Every parameter of a model, each flattened, in ``named_parameters`` order ``# [n_params]``.

    The layout in which traker vectorises a gradient dict (TRAK, D-TRAK): normalisation layers
    included, ``weight`` before ``bias`` as the model registers them.

    Attributes:
        names: qualified parameter names, in ``model.named_parameters()`` order.
        shapes: their shapes.
        n_params: total number of parameters.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    n_params: int

    @classmethod
    def from_model(cls, model: nn.Module) -> ParameterList:
        """Every parameter of ``model``."""
        named = list(model.named_parameters())
        if not named:
            raise ValueError("the model has no parameters: there is nothing to attribute")
        return cls(
            names=tuple(name for name, _ in named),
            shapes=tuple(tuple(p.shape) for _, p in named),
            n_params=sum(p.numel() for _, p in named),
        )

    def param_names(self) -> list[str]:
        """Qualified parameter names, in layout order."""
        return list(self.names)

    def flatten(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate per-parameter gradients: ``{name: # [B, *shape]}`` -> ``# [B, n_params]``."""
        return torch.cat([grads[name].flatten(1) for name in self.names], dim=1)


GradientLayout = ParameterLayout | ParameterList
"""The parameters a gradient is taken with respect to, and their flat order."""


@dataclass(frozen=True)
class ExampleDraws:
    """Monte Carlo draws for B examples, S per example.

    Attributes:
        t: 0-indexed timesteps, ``# [B, S]`` int64.
        eps: noise, ``# [B, S, C, H, W]``.
        flip: horizontal flip of each draw, ``# [B, S]`` bool, or None (no augmentation).
        extra_noise: further standard normal noise per draw (e.g. the MC-Fisher's sampled
            targets), ``# [B, S, C, H, W]``, or None when not requested.
    """

    t: torch.Tensor
    eps: torch.Tensor
    flip: torch.Tensor | None = None
    extra_noise: torch.Tensor | None = None

    @property
    def n_samples(self) -> int:
        """Draws per example (S)."""
        return int(self.t.shape[1])

    def samples(self, start: int, stop: int) -> ExampleDraws:
        """Draws ``start:stop`` of every example (views)."""
        return ExampleDraws(
            t=self.t[:, start:stop],
            eps=self.eps[:, start:stop],
            flip=None if self.flip is None else self.flip[:, start:stop],
            extra_noise=None if self.extra_noise is None else self.extra_noise[:, start:stop],
        )


_SEED_SEQUENCE_STREAMS: dict[str, int] = {
    "trak-train": 0x54524E,
    "trak-query": 0x515259,
    "trak-projection": 0x50524A,
}
"""Streams seeded with numpy's ``SeedSequence([seed, code, index])`` instead of the hash.

TRAK's draws and projection have always been seeded this way; keeping their derivation keeps
TRAK's and D-TRAK's scores (and cached features) unchanged. Every other stream is hashed."""


def example_seed(seed: int, stream: str, index: int) -> int:
    """The one seed scheme of per-example randomness: a 63-bit seed of ``(seed, stream, index)``.

    A stable hash (blake2b) of the three values, except for the streams of
    :data:`_SEED_SEQUENCE_STREAMS` (TRAK's), which use numpy's ``SeedSequence`` of
    ``(seed, stream code, index)`` as TRAK always did (so its scores are unchanged).

    Args:
        seed: the run's seed (>= 0 for TRAK's streams).
        stream: separates independent uses: ``"train"``, ``"query"``, ``"fit"`` (K-FAC),
            ``"trak-train"``, ``"trak-query"``, ``"trak-projection"`` (TRAK), ...
        index: the example's index in its set (>= 0 for TRAK's streams).

    Returns:
        A seed in ``[0, 2**63)`` that depends on these three values alone.
    """
    code = _SEED_SEQUENCE_STREAMS.get(stream)
    if code is not None:
        if seed < 0 or index < 0:
            raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
        state = np.random.SeedSequence([seed, code, index]).generate_state(2, dtype=np.uint32)
        return (int(state[0]) << 31) ^ int(state[1])
    digest = hashlib.blake2b(f"{int(seed)}|{stream}|{int(index)}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


def example_generator(seed: int, stream: str, index: int) -> torch.Generator:
    """A fresh CPU generator seeded with :func:`example_seed` ``(seed, stream, index)``.

    Args:
        seed: the run's seed.
        stream: separates independent uses (:func:`example_seed`).
        index: the example's index in its set.

    Returns:
        A fresh ``torch.Generator`` whose draws depend on these three values alone.
    """
    return torch.Generator().manual_seed(example_seed(seed, stream, index))


def draw_examples(
    indices: Sequence[int] | torch.Tensor,
    n_samples: int,
    image_shape: Sequence[int],
    num_timesteps: int,
    *,
    seed: int,
    stream: str,
    hflip: bool = False,
    extra_noise: bool = False,
    dtype: torch.dtype = torch.float32,
) -> ExampleDraws:
    """Draws for the examples ``indices``: each from :func:`example_generator` alone.

    Per example, in this order: ``t`` and ``eps`` (:func:`diffusion.measurements.draw_mc`),
    then the flips (if ``hflip``), then the extra noise (if ``extra_noise``). The loop over
    examples only seeds generators; all compute is batched.

    Args:
        indices: ``# [B]`` the examples' indices in their set (their draws' identity).
        n_samples: draws per example (S).
        image_shape: ``[C, H, W]``.
        num_timesteps: T of the noise schedule.
        seed: the run's seed.
        stream: the use these draws serve (:func:`example_generator`).
        hflip: also draw a horizontal flip per draw.
        extra_noise: also draw a second noise tensor per draw (the MC-Fisher's sampled target).
        dtype: dtype of the noise.

    Returns:
        :class:`ExampleDraws` with ``t`` ``# [B, S]``, ``eps`` ``# [B, S, C, H, W]`` (CPU).
    """
    ts, epss, flips, extras = [], [], [], []
    shape = tuple(int(s) for s in image_shape)
    for index in torch.as_tensor(indices).tolist():
        gen = example_generator(seed, stream, index)
        draws = draw_mc(1, n_samples, shape, num_timesteps, generator=gen, dtype=dtype)
        ts.append(draws.t)
        epss.append(draws.eps)
        if hflip:
            flips.append(torch.rand(1, n_samples, generator=gen) < 0.5)
        if extra_noise:
            extras.append(torch.randn((1, n_samples, *shape), generator=gen, dtype=dtype))
    return ExampleDraws(
        t=torch.cat(ts),
        eps=torch.cat(epss),
        flip=torch.cat(flips) if hflip else None,
        extra_noise=torch.cat(extras) if extra_noise else None,
    )


def per_example_gradients(
    model: nn.Module,
    schedule: NoiseSchedule,
    images: torch.Tensor,
    draws: ExampleDraws,
    *,
    measurement: str = "loss",
    layout: GradientLayout | None = None,
    trajectories: torch.Tensor | None = None,
    sample_chunk: int | None = None,
    backend: str = "auto",
    normalize_draws: bool = False,
) -> torch.Tensor:
    """Per-example gradients of the Monte Carlo output function.

    ``out[j] = grad_theta (1/S) sum_s per_draw(measurement, x_j (flipped if flip[j, s]),
    t[j, s], eps[j, s])`` over the layout's parameters, in the model's dtype and device. With
    ``normalize_draws`` each draw's gradient ``g_s`` is replaced by ``g_s / (||g_s|| + 1e-8)``
    before the mean (DAS, Lin et al. 2025: unit-norm per-timestep gradients, their
    ``03_grad.py``); the draws are then differentiated one at a time.

    Args:
        model: eps-prediction network ``model(x_t [N, C, H, W], t [N]) -> [N, C, H, W]``, in
            eval mode (no dropout).
        schedule: noise schedule.
        images: ``# [B, C, H, W]`` clean images.
        draws: their draws, ``t`` ``# [B, S]``, ``eps`` ``# [B, S, C, H, W]``.
        measurement: the output function, a measurement name of :mod:`diffusion.measurements`.
        layout: the parameters and their flat order (default: ``ParameterLayout`` of
            ``model``; :class:`ParameterList` for every parameter).
        trajectories: ``# [B, T + 1, C, H, W]`` for ``trajectory-logprob``.
        sample_chunk: draws per forward pass (bounds memory); None = all S at once.
        backend: ``"hooks"``, ``"vmap"``, ``"loop"`` or ``"auto"`` (module docstring). Same
            values up to floating-point rounding (speed: perf/README.md).
        normalize_draws: normalise each draw's gradient to unit L2 norm before the mean.

    Returns:
        ``# [B, n_params]`` per-example gradients in ``layout``.
    """
    base, _ = parse_measurement(measurement, schedule.num_timesteps)
    layout = ParameterLayout.from_model(model) if layout is None else layout
    n_items, n_samples = draws.t.shape
    if images.dim() != 4 or images.shape[0] != n_items:
        raise ValueError(
            f"images must be [B, C, H, W] with B = {n_items} (the draws' B), got "
            f"{tuple(images.shape)}"
        )
    if base == "trajectory-logprob" and trajectories is None:
        raise ValueError("measurement 'trajectory-logprob' needs the query trajectories")
    if draws.flip is not None and trajectories is not None:
        raise ValueError(
            "flip augmentation does not apply to trajectory measurements (queries are never "
            "augmented, App. G.8): pass draws without flips"
        )
    if sample_chunk is not None and sample_chunk < 1:
        raise ValueError(f"sample_chunk must be >= 1 or None, got {sample_chunk}")
    compute = _BACKEND_FUNCTIONS[resolve_backend(backend, model, layout)]
    step = n_samples if sample_chunk is None else min(sample_chunk, n_samples)
    step = 1 if normalize_draws else step
    total: torch.Tensor | None = None
    for s0 in range(0, n_samples, step):
        part = draws.samples(s0, min(s0 + step, n_samples))
        flat = compute(model, schedule, images, part, measurement, layout, trajectories)
        if normalize_draws:
            flat = flat / (flat.norm(dim=1, keepdim=True) + 1e-8)
        flat = flat * (part.n_samples / n_samples)  # [B, n_params]
        total = flat if total is None else total + flat
    if total is None:  # pragma: no cover - n_samples >= 1
        raise RuntimeError("no draws")
    return total


def resolve_backend(backend: str, model: nn.Module, layout: GradientLayout) -> str:
    """The backend ``"auto"`` stands for, after checking that ``backend`` applies.

    Args:
        backend: one of :data:`GRADIENT_BACKENDS`.
        model: the model (its device and layer types).
        layout: the parameters differentiated.

    Returns:
        ``"hooks"``, ``"vmap"`` or ``"loop"``: for ``"auto"``, hooks where every parameter is
        a supported Linear/Conv2d layer of a :class:`ParameterLayout`, else loop on CPU and vmap
        elsewhere.
    """
    if backend not in GRADIENT_BACKENDS:
        raise ValueError(f"backend must be one of {GRADIENT_BACKENDS}, got {backend!r}")
    hooks_apply = isinstance(layout, ParameterLayout) and _hooks_supported(model, layout)
    if backend == "hooks" and not isinstance(layout, ParameterLayout):
        raise ValueError(
            "backend 'hooks' needs a ParameterLayout (Linear/Conv2d layers only); use 'vmap' "
            "or 'loop' for every parameter"
        )
    if backend != "auto":
        return backend
    if hooks_apply:
        return "hooks"
    device = next(iter(model.parameters())).device
    return "loop" if device.type == "cpu" else "vmap"


def _item_output_function(
    model: nn.Module,
    schedule: NoiseSchedule,
    measurement: str,
    frozen: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
):
    """``f(params, x0, t, eps, flip, traj) -> scalar``: one example's mean over its draws.

    ``x0`` ``# [C, H, W]``, ``t`` ``# [s]``, ``eps`` ``# [s, C, H, W]``, ``flip`` ``# [s]`` or
    None, ``traj`` ``# [T + 1, C, H, W]`` or None; ``params`` the differentiated parameters
    (``frozen`` and ``buffers`` complete the model). Shared by the vmap and loop backends.
    """

    def item_output(p, x0, t, eps, flip, traj):
        def eps_model(x_t, tt):
            return functional_call(model, (p, frozen, buffers), (x_t, tt))

        if flip is None:
            values = per_draw(
                measurement,
                eps_model,
                schedule,
                x0[None],
                t[None],
                eps[None],
                trajectory=None if traj is None else traj[None],
            )  # [1, s]
        else:
            x0s = torch.where(flip[:, None, None, None], x0.flip(-1), x0)  # [s, C, H, W]
            values = per_draw(measurement, eps_model, schedule, x0s, t[:, None], eps[:, None])
        return values.mean()

    return item_output


def _split_parameters(
    model: nn.Module, layout: GradientLayout
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(differentiated, frozen, buffers): detached parameter dicts for ``functional_call``."""
    params = dict(model.named_parameters())
    names = layout.param_names()
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"layout parameters {missing[:3]} are not parameters of the model")
    attributed = {n: params[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in params.items() if n not in attributed}
    return attributed, frozen, dict(model.named_buffers())


def _functional_inputs(
    attributed: dict[str, torch.Tensor],
    images: torch.Tensor,
    draws: ExampleDraws,
    trajectories: torch.Tensor | None,
) -> tuple[torch.Tensor | None, ...]:
    """(images, t, eps, flip, trajectories) on the parameters' device and dtype."""
    first = next(iter(attributed.values()))
    dtype, device = first.dtype, first.device
    return (
        images.to(device=device, dtype=dtype),
        draws.t.to(device),
        draws.eps.to(device=device, dtype=dtype),
        None if draws.flip is None else draws.flip.to(device),
        None if trajectories is None else trajectories.to(device=device, dtype=dtype),
    )


def _vmapped_gradients(
    model: nn.Module,
    schedule: NoiseSchedule,
    images: torch.Tensor,
    draws: ExampleDraws,
    measurement: str,
    layout: GradientLayout,
    trajectories: torch.Tensor | None,
) -> torch.Tensor:
    """``vmap(grad(...))`` over the examples: ``# [B, n_params]``, mean over the draws."""
    attributed, frozen, buffers = _split_parameters(model, layout)
    item_output = _item_output_function(model, schedule, measurement, frozen, buffers)
    inputs = _functional_inputs(attributed, images, draws, trajectories)
    in_dims = (None, *(None if x is None else 0 for x in inputs))
    grads = vmap(grad(item_output), in_dims=in_dims)(attributed, *inputs)
    return layout.flatten(grads)  # [B, n_params]


def _looped_gradients(
    model: nn.Module,
    schedule: NoiseSchedule,
    images: torch.Tensor,
    draws: ExampleDraws,
    measurement: str,
    layout: GradientLayout,
    trajectories: torch.Tensor | None,
) -> torch.Tensor:
    """One ``autograd.grad`` per example: ``# [B, n_params]``, mean over the draws."""
    attributed, frozen, buffers = _split_parameters(model, layout)
    item_output = _item_output_function(model, schedule, measurement, frozen, buffers)
    inputs = _functional_inputs(attributed, images, draws, trajectories)
    leaves = {n: p.requires_grad_(True) for n, p in attributed.items()}
    rows: list[torch.Tensor] = []
    for b in range(int(draws.t.shape[0])):
        with torch.enable_grad():
            value = item_output(leaves, *(None if x is None else x[b] for x in inputs))
            grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
        named = {
            n: (torch.zeros_like(p) if g is None else g)[None]
            for (n, p), g in zip(leaves.items(), grads, strict=True)
        }
        rows.append(layout.flatten(named))  # [1, n_params]
    return torch.cat(rows)


def _hooks_supported(model: nn.Module, layout: ParameterLayout) -> bool:
    """Whether every attributed layer is one the hooks backend handles."""
    for block in layout.blocks:
        module = model.get_submodule(block.module)
        if isinstance(module, nn.Conv2d) and (
            module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)
        ):
            return False
    return True


def _batched_values(
    model: nn.Module,
    schedule: NoiseSchedule,
    images: torch.Tensor,
    draws: ExampleDraws,
    measurement: str,
    trajectories: torch.Tensor | None,
) -> torch.Tensor:
    """Per-draw measurement of every example in one forward pass: ``# [B, S]``.

    Rows of the forward pass are example-major (row ``b * S + s``).
    """
    n_items, n_samples = draws.t.shape
    if draws.flip is None:
        return per_draw(
            measurement, model, schedule, images, draws.t, draws.eps, trajectory=trajectories
        )
    x0 = images.unsqueeze(1).expand(n_items, n_samples, *images.shape[1:])
    x0 = torch.where(draws.flip[..., None, None, None], x0.flip(-1), x0)  # [B, S, C, H, W]
    rows = n_items * n_samples
    values = per_draw(
        measurement,
        model,
        schedule,
        x0.reshape(rows, *images.shape[1:]),
        draws.t.reshape(rows, 1),
        draws.eps.reshape(rows, 1, *images.shape[1:]),
    )  # [B*S, 1]
    return values.reshape(n_items, n_samples)


def _hooked_gradients(
    model: nn.Module,
    schedule: NoiseSchedule,
    images: torch.Tensor,
    draws: ExampleDraws,
    measurement: str,
    layout: ParameterLayout,
    trajectories: torch.Tensor | None,
) -> torch.Tensor:
    """Per-example gradients from layer inputs and output gradients: ``# [B, n_params]``.

    One forward pass over all ``B * S`` rows records each layer's input ``a`` and output; one
    ``autograd.grad`` of ``sum_b m_b`` gives the output gradients ``g`` (no parameter gradients
    are formed). Example ``b``'s weight gradient is ``sum over its rows and positions of
    g a^T`` (a ``bmm``), its bias gradient ``sum g``. Requires every layer to be called with
    example-major rows (a multiple of B), as :func:`diffusion.measurements.per_draw` does.
    """
    n_items = int(draws.t.shape[0])
    params = dict(model.named_parameters())
    first = params[layout.blocks[0].weight]
    dtype, device = first.dtype, first.device
    modules = [model.get_submodule(block.module) for block in layout.blocks]
    records: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in modules]

    def recorder(index: int):
        def hook(module, args, output):
            records[index].append((args[0].detach(), output))

        return hook

    handles = [m.register_forward_hook(recorder(i)) for i, m in enumerate(modules)]
    flags = {name: params[name].requires_grad for name in layout.param_names()}
    try:
        for name in flags:
            params[name].requires_grad_(True)
        with torch.enable_grad():
            values = _batched_values(
                model,
                schedule,
                images.to(device=device, dtype=dtype),
                ExampleDraws(
                    t=draws.t.to(device),
                    eps=draws.eps.to(device=device, dtype=dtype),
                    flip=None if draws.flip is None else draws.flip.to(device),
                ),
                measurement,
                None if trajectories is None else trajectories.to(device=device, dtype=dtype),
            )  # [B, S]
            outputs = [out for calls in records for _, out in calls]
            output_grads = torch.autograd.grad(values.mean(dim=1).sum(), outputs, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
        for name, flag in flags.items():
            params[name].requires_grad_(flag)

    parts = []
    grads_iter = iter(output_grads)
    for block, module, calls in zip(layout.blocks, modules, records, strict=True):
        total = torch.zeros(n_items, block.d_out, block.cols, dtype=dtype, device=device)
        for inputs, _ in calls:
            grad_out = next(grads_iter)
            if grad_out is None:
                continue
            total += _layer_example_grads(module, inputs, grad_out, n_items, block.bias is not None)
        parts.append(total.flatten(1))
    return torch.cat(parts, dim=1)


def _layer_example_grads(
    module: nn.Module, inputs: torch.Tensor, grad_out: torch.Tensor, n_items: int, bias: bool
) -> torch.Tensor:
    """``# [B, d_out, cols]`` per-example ``[dW | db]`` of one call of a Linear/Conv2d layer."""
    rows = inputs.shape[0]
    if rows % n_items != 0:
        raise RuntimeError(
            f"layer called with {rows} rows, not a multiple of the {n_items} examples: the "
            "hooks backend needs example-major rows; use backend='vmap'"
        )
    if isinstance(module, nn.Conv2d):
        # Per-example weight gradients as one grouped weight-gradient convolution: the rows of
        # an example are the convolution's batch, the examples its groups.
        per_item = rows // n_items
        c_in, c_out = inputs.shape[1], grad_out.shape[1]
        x = inputs.reshape(n_items, per_item, c_in, *inputs.shape[2:])
        x = x.transpose(0, 1).reshape(per_item, n_items * c_in, *inputs.shape[2:])
        g = grad_out.reshape(n_items, per_item, c_out, *grad_out.shape[2:])
        g = g.transpose(0, 1).reshape(per_item, n_items * c_out, *grad_out.shape[2:])
        weight = torch.nn.grad.conv2d_weight(
            x,
            (n_items * c_out, c_in, *module.kernel_size),
            g,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=n_items,
        ).reshape(n_items, c_out, -1)  # [B, d_out, d_in]
        if not bias:
            return weight
        bias_grad = grad_out.reshape(n_items, per_item, c_out, -1).sum(dim=(1, 3))  # [B, d_out]
        return torch.cat([weight, bias_grad.unsqueeze(-1)], dim=-1)
    else:
        a = inputs.reshape(n_items, -1, inputs.shape[-1])  # [B, R, d_in]
        g = grad_out.reshape(n_items, -1, grad_out.shape[-1])  # [B, R, d_out]
    weight = torch.bmm(g.transpose(1, 2), a)  # [B, d_out, d_in]
    if not bias:
        return weight
    return torch.cat([weight, g.sum(dim=1).unsqueeze(-1)], dim=-1)


_BACKEND_FUNCTIONS = {
    "hooks": _hooked_gradients,
    "vmap": _vmapped_gradients,
    "loop": _looped_gradients,
}


def iter_gradient_chunks(
    model: nn.Module,
    schedule: NoiseSchedule,
    images: torch.Tensor,
    *,
    n_samples: int,
    seed: int,
    stream: str,
    batch_size: int,
    measurement: str = "loss",
    hflip: bool = False,
    layout: GradientLayout | None = None,
    trajectories: torch.Tensor | None = None,
    sample_chunk: int | None = None,
    backend: str = "auto",
    progress: bool = False,
    desc: str = "gradients",
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Per-example gradients of all ``images``, ``batch_size`` examples at a time.

    Example ``j``'s draws come from ``(seed, stream, j)`` only, so the gradients do not depend
    on ``batch_size`` or ``sample_chunk``.

    Args:
        model: the eps-model; its attributed layers define the gradient layout.
        schedule: its noise schedule.
        images: ``# [N, C, H, W]`` the examples.
        n_samples: Monte Carlo draws per example.
        seed: the run's seed.
        stream: the draws' stream (:func:`example_generator`).
        batch_size: examples per yielded chunk.
        measurement: the output function differentiated (a ``diffusion.measurements`` name).
        hflip: average over random horizontal flips as training did.
        layout: the parameter layout (default: every attributed layer of ``model``).
        trajectories: ``# [N, T + 1, C, H, W]`` for ``trajectory-logprob``.
        sample_chunk: draws per backward pass (memory only; default: all).
        backend: the gradient backend (:func:`per_example_gradients`).
        progress: show a progress bar.
        desc: the progress bar's label.

    Yields:
        ``(start, stop, grads)`` with ``grads`` ``# [stop - start, n_params]`` for
        ``images[start:stop]``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    layout = ParameterLayout.from_model(model) if layout is None else layout
    n = int(images.shape[0])
    starts = range(0, n, batch_size)
    bar = tqdm(starts, desc=desc, total=math.ceil(n / batch_size), disable=not progress)
    for start in bar:
        stop = min(start + batch_size, n)
        draws = draw_examples(
            range(start, stop),
            n_samples,
            images.shape[1:],
            schedule.num_timesteps,
            seed=seed,
            stream=stream,
            hflip=hflip,
        )
        grads = per_example_gradients(
            model,
            schedule,
            images[start:stop],
            draws,
            measurement=measurement,
            layout=layout,
            trajectories=None if trajectories is None else trajectories[start:stop],
            sample_chunk=sample_chunk,
            backend=backend,
        )
        yield start, stop, grads
