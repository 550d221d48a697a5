"""The model backends: the diffusers ``UNet2DModel`` wrapper against diffusers itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusion.backends import (
    BACKENDS,
    Denoiser,
    DiffusersUNetConfig,
    build_denoiser,
    load_pretrained,
    schedule_from_scheduler_config,
)
from diffusion.measurements import per_draw
from diffusion.sampling import sample
from diffusion.unet import UNet, UNetConfig
from methods.gradients import ParameterLayout, draw_examples, per_example_gradients
from tests.tiny_diffusers import (
    DIFFUSERS_REASON,
    TINY_SCHEDULE,
    TINY_UNET2D,
    save_tiny_checkpoint,
    tiny_diffusers_model,
)

diffusers = pytest.importorskip("diffusers", reason=DIFFUSERS_REASON)


def _inputs(n: int = 3):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.tensor([0, 17, 49][:n])


def test_forward_is_the_unet2d_sample():
    model = tiny_diffusers_model()
    x_t, t = _inputs()
    with torch.no_grad():
        expected = model.unet(x_t, t).sample
        out = model(x_t, t)
    assert out.shape == x_t.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert isinstance(model, Denoiser)
    assert (model.config.image_channels, model.config.image_size) == (1, 8)


def test_build_denoiser_picks_the_backend_by_config_type():
    assert set(BACKENDS) == {"unet", "diffusers"}
    assert isinstance(build_denoiser(UNetConfig.tiny()), UNet)
    with torch.random.fork_rng():
        model = build_denoiser(TINY_UNET2D)
    assert isinstance(model.unet, diffusers.UNet2DModel)
    with pytest.raises(TypeError, match="no backend"):
        build_denoiser({"sample_size": 8})


@pytest.mark.parametrize(
    ("unet", "match"),
    [
        ({"in_channels": 1, "out_channels": 1}, "sample_size"),
        ({"sample_size": (8, 8), "in_channels": 1, "out_channels": 1}, "sample_size"),
        ({"sample_size": 8, "in_channels": 3, "out_channels": 6}, "in_channels == out_channels"),
    ],
)
def test_config_validation(unet, match):
    with pytest.raises(ValueError, match=match):
        DiffusersUNetConfig(unet)


def test_linear_scheduler_is_the_noise_schedule():
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=50, beta_start=1e-3, beta_end=0.05)
    schedule = schedule_from_scheduler_config(scheduler.config)
    assert schedule == TINY_SCHEDULE
    torch.testing.assert_close(schedule.betas, scheduler.betas.double(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(
        schedule.alpha_bars, scheduler.alphas_cumprod.double(), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"beta_schedule": "scaled_linear"}, "beta_schedule='scaled_linear'"),
        ({"beta_schedule": "squaredcos_cap_v2"}, "linear beta schedule only"),
        ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
        ({"prediction_type": "v_prediction"}, "prediction_type"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ],
)
def test_unsupported_scheduler_settings_are_refused(overrides, match):
    config = dict(diffusers.DDPMScheduler(num_train_timesteps=10).config) | overrides
    with pytest.raises(ValueError, match=match):
        schedule_from_scheduler_config(config)


def test_checkpoint_round_trip(tmp_path):
    saved = save_tiny_checkpoint(tmp_path, seed=3)
    model, schedule = load_pretrained(tmp_path)
    assert schedule == TINY_SCHEDULE
    assert not model.training
    theirs, ours = saved.state_dict(), model.state_dict()
    assert theirs.keys() == ours.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    x_t, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x_t, t), saved(x_t, t), rtol=0, atol=0)


def test_pipeline_folder_loads(tmp_path):
    model = tiny_diffusers_model()
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=50, beta_start=1e-3, beta_end=0.05)
    diffusers.DDPMPipeline(unet=model.unet, scheduler=scheduler).save_pretrained(str(tmp_path))
    loaded, schedule = load_pretrained(tmp_path)
    assert schedule == TINY_SCHEDULE
    x_t, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_t, t), model(x_t, t), rtol=0, atol=0)


def test_missing_scheduler_names_the_folder(tmp_path):
    tiny_diffusers_model().save_pretrained(tmp_path / "unet")
    with pytest.raises(FileNotFoundError, match="scheduler/scheduler_config.json"):
        load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="unet/config.json"):
        load_pretrained(tmp_path / "unet")


def test_attributed_layers_include_the_attention_projections():
    model = tiny_diffusers_model()
    layout = ParameterLayout.from_model(model)
    expected = [
        name for name, module in model.named_modules() if isinstance(module, nn.Linear | nn.Conv2d)
    ]
    assert [block.module for block in layout.blocks] == expected
    attention = "unet.mid_block.attentions.0."
    for projection in ("to_q", "to_k", "to_v", "to_out.0"):
        assert attention + projection in expected


@pytest.mark.parametrize("backend", ["hooks", "vmap"])
def test_per_example_gradients_equal_autograd(backend):
    """The gradient engine on the wrapper against one plain backward pass per example."""
    model = tiny_diffusers_model().double()
    layout = ParameterLayout.from_model(model)
    images = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 2 - 1
    draws = draw_examples(range(2), 2, (1, 8, 8), 50, seed=0, stream="test")
    grads = per_example_gradients(
        model, TINY_SCHEDULE, images, draws, layout=layout, backend=backend
    )
    params = dict(model.named_parameters())
    for n in range(2):
        model.zero_grad()
        value = per_draw(
            "loss",
            model,
            TINY_SCHEDULE,
            images[n : n + 1],
            draws.t[n : n + 1],
            draws.eps[n : n + 1].double(),
        )
        value.mean().backward()
        expected = layout.flatten({k: params[k].grad[None] for k in layout.param_names()})[0]
        assert expected.abs().max() > 0
        torch.testing.assert_close(grads[n].double(), expected, rtol=1e-8, atol=1e-12)


def test_sampling_infers_the_image_shape():
    model = tiny_diffusers_model()
    schedule = TINY_SCHEDULE
    a = sample(model, schedule, 2, generator=torch.Generator().manual_seed(0))
    b = sample(model, schedule, 2, generator=torch.Generator().manual_seed(0), batch_size=1)
    assert a.images.shape == (2, 1, 8, 8)
    torch.testing.assert_close(a.images, b.images)
