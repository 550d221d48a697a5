"""A tiny diffusers ``UNet2DModel`` (and its checkpoint) shared by the diffusers-backend tests.

One down/up level pair (4 and 8 channels) on 8x8 single-channel images with one attention block
(the middle block's: ``to_q``, ``to_k``, ``to_v``, ``to_out.0``), about 11k parameters. Built with
diffusers' own initialisation under a fixed seed (fork_rng: the global RNG is left untouched).
Callers ``pytest.importorskip("diffusers")`` first.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffusion.backends import DiffusersDenoiser, DiffusersUNetConfig
from diffusion.schedule import NoiseSchedule

TINY_UNET2D = DiffusersUNetConfig(
    {
        "sample_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": (4, 8),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 2,
        "attention_head_dim": 4,
        "add_attention": True,
    }
)
TINY_SCHEDULE = NoiseSchedule(num_timesteps=50, beta_start=1e-3, beta_end=0.05)
DIFFUSERS_REASON = "needs Hugging Face diffusers (pip install -e '.[diffusers]')"


def tiny_diffusers_model(seed: int = 0) -> DiffusersDenoiser:
    """The tiny ``UNet2DModel`` wrapper with diffusers' initialisation under ``seed`` (eval)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return DiffusersDenoiser(TINY_UNET2D).eval()


def save_tiny_checkpoint(path: Path, seed: int = 0, schedule: NoiseSchedule = TINY_SCHEDULE):
    """Write ``path/unet`` and ``path/scheduler`` with diffusers' ``save_pretrained``; the model."""
    from diffusers import DDPMScheduler

    model = tiny_diffusers_model(seed)
    model.save_pretrained(path / "unet")
    DDPMScheduler(
        num_train_timesteps=schedule.num_timesteps,
        beta_start=schedule.beta_start,
        beta_end=schedule.beta_end,
        beta_schedule="linear",
    ).save_pretrained(str(path / "scheduler"))
    return model
