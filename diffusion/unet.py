"""The epsilon-prediction U-Net of Ho et al. (2020), scaled by a config.

Architecture (Ho et al.'s ``diffusion_tf/models/unet.py``, re-expressed in PyTorch):

- sinusoidal timestep embedding of width ``base_channels``, then a 2-layer MLP
  (``nn.Linear`` -> SiLU -> ``nn.Linear``) to ``time_embed_dim = 4 * base_channels``;
- ``conv_in`` (3x3), then per resolution level ``num_res_blocks`` ResBlocks (each followed by
  self-attention where the resolution is in ``attention_resolutions``) and, except at the last
  level, a strided 3x3 convolution that halves the resolution;
- middle: ResBlock, self-attention, ResBlock (attention is always applied here, as in Ho et al.);
- up path mirrors the down path with ``num_res_blocks + 1`` ResBlocks per level, each fed the
  concatenation of the running activation and one skip activation, and nearest-neighbour
  upsampling followed by a 3x3 convolution;
- output: GroupNorm -> SiLU -> 3x3 convolution back to ``image_channels``.

Only ``nn.Conv2d``, ``nn.Linear`` and ``nn.GroupNorm`` hold parameters, so K-FAC (which covers
Linear and Conv2d layers) sees every weight matrix, attention projections included (they are
``nn.Linear`` layers over the flattened tokens ``[B, H*W, C]``). The forward pass uses no in-place
operations, no ``.item()`` and no data-dependent control flow, so it works under
``torch.func.functional_call`` + ``torch.func.vmap`` (per-example gradients).

Initialisation follows Ho et al.: Xavier-uniform (fan-avg) weights, zero biases, and zero weights
for the last convolution of every ResBlock, the attention output projection and ``conv_out``
(Ho et al. use a scale of 1e-10 there), so the freshly built network outputs exactly zero.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet", "UNetConfig", "count_parameters", "timestep_embedding"]

_GROUPNORM_EPS = 1e-6  # Ho et al.'s group_norm epsilon


@dataclass(frozen=True)
class UNetConfig:
    """Size and shape of the U-Net.

    Attributes:
        image_channels: C, channels of the input and output images (1 for digits, 3 for CIFAR).
        image_size: H = W, the (square) image side in pixels. Must be divisible by
            ``2 ** (len(channel_mults) - 1)`` (one halving per level after the first).
        base_channels: channels at the first resolution level; also the width of the sinusoidal
            timestep embedding (Ho et al.'s ``ch``). Must be >= 4.
        channel_mults: channel multiplier per resolution level (level i has
            ``base_channels * channel_mults[i]`` channels and resolution ``image_size / 2**i``).
        num_res_blocks: ResBlocks per level on the down path (the up path has one more).
        attention_resolutions: resolutions (feature-map side in pixels) at which a self-attention
            block follows each ResBlock. Each must be one of the levels' resolutions. The middle
            block always has attention regardless of this field (as in Ho et al.).
        num_groups: groups of every GroupNorm; every level's channel count must be divisible
            by it (Ho et al.: 32).
        dropout: dropout probability inside the ResBlocks, in [0, 1) (Ho et al. CIFAR-10: 0.1).
    """

    image_channels: int
    image_size: int
    base_channels: int
    channel_mults: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    num_groups: int
    dropout: float = 0.0

    def __post_init__(self) -> None:
        # Accept lists (e.g. a config read back from JSON) but store hashable tuples.
        for name in ("channel_mults", "attention_resolutions"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
            elif not isinstance(value, tuple):
                raise ValueError(f"{name} must be a tuple of ints, got {value!r}")
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in getattr(self, name)):
                raise ValueError(f"{name} must contain only ints, got {getattr(self, name)!r}")
        for name in (
            "image_channels",
            "image_size",
            "base_channels",
            "num_res_blocks",
            "num_groups",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.base_channels < 4:
            raise ValueError(
                f"base_channels must be >= 4 (it is also the sinusoidal embedding width), "
                f"got {self.base_channels}"
            )
        if len(self.channel_mults) == 0 or any(m < 1 for m in self.channel_mults):
            raise ValueError(
                f"channel_mults must be a non-empty tuple of positive ints, got {self.channel_mults}"
            )
        factor = 2 ** (len(self.channel_mults) - 1)
        if self.image_size % factor != 0:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by 2**(len(channel_mults) - 1) = "
                f"{factor}: use fewer channel_mults levels or a different image_size"
            )
        for mult in self.channel_mults:
            channels = self.base_channels * mult
            if channels % self.num_groups != 0:
                raise ValueError(
                    f"channels base_channels * mult = {self.base_channels} * {mult} = {channels} "
                    f"are not divisible by num_groups={self.num_groups}: choose num_groups "
                    "dividing every level's channel count"
                )
        reachable = self.resolutions
        unreachable = [r for r in self.attention_resolutions if r not in reachable]
        if unreachable:
            raise ValueError(
                f"attention_resolutions {unreachable} are not reachable: the levels have "
                f"resolutions {reachable} (image_size={self.image_size}, "
                f"{len(self.channel_mults)} levels)"
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}")

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map side of each level: ``image_size / 2**i`` for level i."""
        return tuple(self.image_size // 2**i for i in range(len(self.channel_mults)))

    @property
    def time_embed_dim(self) -> int:
        """Width of the timestep embedding after the MLP: ``4 * base_channels`` (Ho et al.)."""
        return 4 * self.base_channels

    @classmethod
    def tiny(cls) -> UNetConfig:
        """8x8x1 digits model with 72,113 parameters.

        16 channels at both levels (8x8 and 4x4), one ResBlock per level, attention at 4x4,
        4 channels per GroupNorm group (as in the CIFAR model's 128 / 32). Doubling the channels
        at the second level (mults (1, 2)) would give 177k parameters.
        """
        return cls(
            image_channels=1,
            image_size=8,
            base_channels=16,
            channel_mults=(1, 1),
            num_res_blocks=1,
            attention_resolutions=(4,),
            num_groups=4,
            dropout=0.0,
        )

    @classmethod
    def cifar(cls) -> UNetConfig:
        """Ho et al. (2020) CIFAR-10 model, 32x32x3, 35,746,307 parameters."""
        return cls(
            image_channels=3,
            image_size=32,
            base_channels=128,
            channel_mults=(1, 2, 2, 2),
            num_res_blocks=2,
            attention_resolutions=(16,),
            num_groups=32,
            dropout=0.1,
        )


def timestep_embedding(
    t: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Sinusoidal timestep embedding of Ho et al. (Transformer positional encoding).

    With ``half = dim // 2`` and ``f_i = exp(-log(10000) * i / (half - 1))`` for ``i < half``:
    ``emb[b] = [sin(t_b f_0), ..., sin(t_b f_{half-1}), cos(t_b f_0), ..., cos(t_b f_{half-1})]``,
    zero-padded by one column when ``dim`` is odd.

    Args:
        t: timesteps, [B] (any integer or float dtype).
        dim: embedding width, >= 4.
        dtype: floating dtype of the computation and the result.

    Returns:
        [B, dim] embedding.
    """
    if dim < 4:
        raise ValueError(f"timestep embedding dim must be >= 4, got {dim}")
    half = dim // 2
    exponent = torch.arange(half, dtype=dtype, device=t.device) * (-math.log(10000.0) / (half - 1))
    args = t.to(dtype)[:, None] * torch.exp(exponent)[None, :]  # [B, half]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # [B, 2 * half]
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class TimeEmbedding(nn.Module):
    """Sinusoid -> Linear -> SiLU -> Linear: [B] timesteps -> [B, time_embed_dim]."""

    def __init__(self, base_channels: int, time_embed_dim: int) -> None:
        super().__init__()
        self.base_channels = base_channels
        self.dense0 = nn.Linear(base_channels, time_embed_dim)
        self.dense1 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """t: [B] -> [B, time_embed_dim]."""
        emb = timestep_embedding(t, self.base_channels, dtype=dtype)
        return self.dense1(F.silu(self.dense0(emb)))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv, + time projection, GroupNorm-SiLU-Dropout-Conv, + (1x1-conv) skip."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        time_embed_dim: int,
        num_groups: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels, eps=_GROUPNORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.temb_proj = nn.Linear(time_embed_dim, out_channels)
        self.norm2 = nn.GroupNorm(num_groups, out_channels, eps=_GROUPNORM_EPS)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.skip = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        """x: [B, C_in, H, W], temb_act: SiLU(time embedding) [B, D] -> [B, C_out, H, W]."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(temb_act)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W spatial tokens, with a residual connection.

    q, k, v and the output projection are ``nn.Linear`` layers applied to tokens [B, H*W, C].
    """

    def __init__(self, channels: int, num_groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, channels, eps=_GROUPNORM_EPS)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> [B, C, H, W]."""
        channels = x.shape[1]
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, H*W, C]
        q, k, v = self.q(tokens), self.k(tokens), self.v(tokens)  # [B, H*W, C] each
        weights = torch.softmax(q @ k.transpose(1, 2) * channels**-0.5, dim=-1)  # [B, HW, HW]
        h = self.proj_out(weights @ v)  # [B, H*W, C]
        return x + h.transpose(1, 2).reshape(x.shape)


class Downsample(nn.Module):
    """Strided 3x3 convolution: [B, C, H, W] -> [B, C, H/2, W/2]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 convolution: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ResBlocks, each followed by attention or identity, then resampling."""

    def __init__(self, blocks: list[ResBlock], attns: list[nn.Module], resample: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)
        self.resample = resample  # Downsample / Upsample, or Identity at the last level


class UNet(nn.Module):
    """Epsilon-prediction U-Net: ``forward(x_t [B, C, H, W], t [B] long) -> eps_hat [B, C, H, W]``.

    Args:
        config: the architecture.
        generator: CPU ``torch.Generator`` for the initial weights. With ``None`` the global RNG
            is used (ordinary PyTorch module semantics). With a generator, the global RNG is left
            untouched and the weights are a pure function of the generator's state.
    """

    def __init__(self, config: UNetConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise ValueError(f"config must be a UNetConfig, got {type(config).__name__}")
        self.config = config
        # The submodules' default initialisation draws from the global RNG; it is overwritten by
        # reset_parameters, so when a generator is given, discard those draws.
        guard = (
            torch.random.fork_rng(devices=[]) if generator is not None else contextlib.nullcontext()
        )
        with guard:
            self._build(config)
        self.reset_parameters(generator)

    def _build(self, cfg: UNetConfig) -> None:
        ch, temb_dim, groups, drop = (
            cfg.base_channels,
            cfg.time_embed_dim,
            cfg.num_groups,
            cfg.dropout,
        )
        n_levels = len(cfg.channel_mults)
        self.time_embed = TimeEmbedding(ch, temb_dim)
        self.conv_in = nn.Conv2d(cfg.image_channels, ch, kernel_size=3, padding=1)

        skip_channels = [ch]  # channels of every activation pushed onto the skip stack
        down: list[_Level] = []
        current = ch
        for level, mult in enumerate(cfg.channel_mults):
            out = ch * mult
            use_attn = cfg.resolutions[level] in cfg.attention_resolutions
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(current, out, temb_dim, groups, drop))
                attns.append(AttentionBlock(out, groups) if use_attn else nn.Identity())
                current = out
                skip_channels.append(current)
            last = level == n_levels - 1
            down.append(_Level(blocks, attns, nn.Identity() if last else Downsample(current)))
            if not last:
                skip_channels.append(current)
        self.down = nn.ModuleList(down)

        self.mid_block1 = ResBlock(current, current, temb_dim, groups, drop)
        self.mid_attn = AttentionBlock(current, groups)
        self.mid_block2 = ResBlock(current, current, temb_dim, groups, drop)

        up: list[_Level] = []
        for level in reversed(range(n_levels)):
            out = ch * cfg.channel_mults[level]
            use_attn = cfg.resolutions[level] in cfg.attention_resolutions
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(current + skip_channels.pop(), out, temb_dim, groups, drop))
                attns.append(AttentionBlock(out, groups) if use_attn else nn.Identity())
                current = out
            up.append(_Level(blocks, attns, Upsample(current) if level != 0 else nn.Identity()))
        self.up = nn.ModuleList(up)
        if skip_channels:  # pragma: no cover - construction invariant
            raise RuntimeError(f"internal error: unused skip channels {skip_channels}")

        self.norm_out = nn.GroupNorm(groups, current, eps=_GROUPNORM_EPS)
        self.conv_out = nn.Conv2d(current, cfg.image_channels, kernel_size=3, padding=1)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Ho et al. initialisation (see the module docstring), drawn from ``generator``."""
        zero_init: set[nn.Module] = {self.conv_out}
        for module in self.modules():
            if isinstance(module, ResBlock):
                zero_init.add(module.conv2)
            elif isinstance(module, AttentionBlock):
                zero_init.add(module.proj_out)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                if module in zero_init:
                    nn.init.zeros_(module.weight)
                else:
                    nn.init.xavier_uniform_(module.weight, generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predict the noise.

        Args:
            x_t: noisy images, [B, C, H, W] (C = image_channels, H = W = image_size).
            t: 0-indexed integer timesteps, [B].

        Returns:
            eps_hat, [B, C, H, W], in the dtype of the parameters.
        """
        cfg = self.config
        expected = (cfg.image_channels, cfg.image_size, cfg.image_size)
        if x_t.dim() != 4 or tuple(x_t.shape[1:]) != expected:
            raise ValueError(
                f"x_t must have shape [B, {', '.join(map(str, expected))}], got {tuple(x_t.shape)}"
            )
        if t.dim() != 1 or t.shape[0] != x_t.shape[0]:
            raise ValueError(f"t must have shape [B] = [{x_t.shape[0]}], got {tuple(t.shape)}")
        if t.is_floating_point() or t.is_complex():
            raise ValueError(f"t must hold integer timesteps (torch.long), got dtype {t.dtype}")

        temb_act = F.silu(self.time_embed(t, dtype=self.conv_in.weight.dtype))  # [B, D]
        hs = [self.conv_in(x_t)]
        for level in self.down:
            for block, attn in zip(level.blocks, level.attns, strict=True):
                hs.append(attn(block(hs[-1], temb_act)))
            if not isinstance(level.resample, nn.Identity):
                hs.append(level.resample(hs[-1]))

        h = self.mid_block2(self.mid_attn(self.mid_block1(hs[-1], temb_act)), temb_act)

        for level in self.up:
            for block, attn in zip(level.blocks, level.attns, strict=True):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), temb_act))
            h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    """Total number of parameter elements of ``model`` (trainable or not)."""
    return sum(p.numel() for p in model.parameters())
