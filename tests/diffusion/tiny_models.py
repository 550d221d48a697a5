"""Small eps-models shared by the diffusion tests (independent of diffusion.unet)."""

from __future__ import annotations

import torch
from torch import nn


class TinyEps(nn.Module):
    """Small eps-model: conv -> + time embedding -> tanh -> conv; deterministic init."""

    def __init__(self, channels: int = 1, num_timesteps: int = 10, hidden: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.emb = nn.Embedding(num_timesteps, hidden)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1)
        gen = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.4 * torch.randn(p.shape, generator=gen))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv1(x) + self.emb(t)[:, :, None, None])
        return self.conv2(h)
