"""DDPM noise schedule (Ho et al. 2020) and its closed-form quantities.

Timesteps in code are 0-indexed: ``t`` in ``[0, T)`` stands for the paper's ``t + 1`` in
``[1, T]``. All tensors are float64 on the CPU; callers cast/move what they index.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class NoiseSchedule:
    """Linear beta schedule.

    Attributes:
        num_timesteps: T, the number of diffusion steps (paper: 1000).
        beta_start: beta_1 of the linear schedule (paper: 1e-4).
        beta_end: beta_T of the linear schedule (paper: 0.02).
    """

    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        if not isinstance(self.num_timesteps, int) or self.num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {self.num_timesteps}")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(
                "need 0 < beta_start <= beta_end < 1, got "
                f"beta_start={self.beta_start}, beta_end={self.beta_end}"
            )

    @cached_property
    def betas(self) -> torch.Tensor:
        """beta_t, shape [T]."""
        return torch.linspace(
            self.beta_start, self.beta_end, self.num_timesteps, dtype=torch.float64
        )

    @cached_property
    def alphas(self) -> torch.Tensor:
        """alpha_t = 1 - beta_t, shape [T]."""
        return 1.0 - self.betas

    @cached_property
    def alpha_bars(self) -> torch.Tensor:
        """abar_t = prod_{s<=t} alpha_s, shape [T]."""
        return torch.cumprod(self.alphas, dim=0)

    @cached_property
    def alpha_bars_prev(self) -> torch.Tensor:
        """abar_{t-1} with abar_0 = 1, shape [T]."""
        return torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bars[:-1]])

    @cached_property
    def posterior_variance(self) -> torch.Tensor:
        """The "small" sampling variance sigma_t^2 = (1 - abar_{t-1}) / (1 - abar_t) beta_t, [T].

        At the first step (paper t = 1) it is exactly 0: the last sampling step is deterministic.
        """
        return (1.0 - self.alpha_bars_prev) / (1.0 - self.alpha_bars) * self.betas

    @cached_property
    def elbo_weights(self) -> torch.Tensor:
        """Weight of ||eps - eps_theta(x_t, t)||^2 in the ELBO's KL term L_{t-1}, shape [T].

        Ho et al. (2020) Eq. 12: beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)). The first step
        (sigma^2 = 0, the reconstruction term) is set to 0, as the paper ignores it.
        """
        sigma2 = self.posterior_variance
        weights = self.betas**2 / (
            2.0 * sigma2.clamp_min(1e-300) * self.alphas * (1.0 - self.alpha_bars)
        )
        weights[0] = 0.0
        return weights

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.

        Args:
            x0: clean images, [B, C, H, W].
            t: 0-indexed timesteps, [B] (long).
            eps: standard normal noise, [B, C, H, W].

        Returns:
            noisy images x_t, [B, C, H, W], in the dtype of ``x0``.
        """
        abar = self.alpha_bars.to(device=x0.device)[t].to(x0.dtype)
        abar = abar.view(-1, *([1] * (x0.dim() - 1)))
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * eps
