"""Tests of diffusion/unet.py: shapes, layer types, closed-form time embedding, validation,
per-example gradients under vmap against a loop."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from diffusion.unet import AttentionBlock, UNet, UNetConfig, count_parameters, timestep_embedding

SMALL_RGB = UNetConfig(
    image_channels=3,
    image_size=16,
    base_channels=8,
    channel_mults=(1, 2, 2),
    num_res_blocks=1,
    attention_resolutions=(8,),
    num_groups=4,
    dropout=0.0,
)


def _build(config: UNetConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> UNet:
    return UNet(config, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _randomize(model: nn.Module, seed: int, std: float = 0.2) -> None:
    """Overwrite every parameter with N(1 or 0, std^2) noise so no gradient is trivially zero
    (the Ho et al. init zeroes the output layers)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype) * std
            base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
            p.copy_(base + noise)


@pytest.mark.parametrize("config", [UNetConfig.tiny(), SMALL_RGB], ids=["tiny", "small-rgb"])
def test_output_shape_equals_input_shape(config: UNetConfig) -> None:
    model = _build(config)
    _randomize(model, 1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, config.image_channels, config.image_size, config.image_size, generator=gen)
    t = torch.tensor([0, 500, 999])
    out = model(x, t)
    assert out.shape == x.shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_fresh_model_outputs_zero() -> None:
    """Ho et al. init: the output convolution starts at zero."""
    model = _build(SMALL_RGB)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(x, torch.tensor([3, 7])), torch.zeros_like(x))


def _param_holding_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if list(m.parameters(recurse=False))]


@pytest.mark.parametrize(
    "config", [UNetConfig.tiny(), SMALL_RGB, UNetConfig.cifar()], ids=["tiny", "small", "cifar"]
)
def test_only_conv_linear_groupnorm_hold_parameters(config: UNetConfig) -> None:
    model = UNet(config)
    holders = _param_holding_modules(model)
    bad = {type(m).__name__ for m in holders if type(m) not in (nn.Conv2d, nn.Linear, nn.GroupNorm)}
    assert not bad, f"modules other than Conv2d/Linear/GroupNorm hold parameters: {bad}"
    # every parameter is owned by one of those modules (nothing registered elsewhere)
    assert sum(p.numel() for m in holders for p in m.parameters(recurse=False)) == count_parameters(
        model
    )
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in model.modules())


def test_cifar_parameter_count_matches_ho_et_al() -> None:
    """Ho et al. (2020), Sec. 4: the CIFAR-10 model has 35.7M parameters."""
    n = count_parameters(UNet(UNetConfig.cifar()))
    assert round(n / 1e6, 1) == 35.7


def test_tiny_parameter_count_in_range() -> None:
    assert 50_000 <= count_parameters(UNet(UNetConfig.tiny())) <= 80_000


def test_count_parameters_closed_form() -> None:
    layer = nn.Sequential(nn.Linear(3, 5), nn.Conv2d(2, 4, 3))
    assert count_parameters(layer) == (3 * 5 + 5) + (2 * 4 * 9 + 4)


@pytest.mark.parametrize("config", [UNetConfig.tiny(), SMALL_RGB], ids=["tiny", "small-rgb"])
def test_attention_uses_linear_projections_at_configured_resolutions(config: UNetConfig) -> None:
    model = _build(config)
    attns = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    assert attns
    for a in attns:
        for proj in (a.q, a.k, a.v, a.proj_out):
            assert type(proj) is nn.Linear
    seen: list[tuple[int, int]] = []
    handles = [
        a.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape[-2:])))
        for a in attns
    ]
    model(
        torch.zeros(1, config.image_channels, config.image_size, config.image_size),
        torch.tensor([5]),
    )
    for h in handles:
        h.remove()
    lowest = config.resolutions[-1]
    assert {s[0] for s in seen} == set(config.attention_resolutions) | {lowest}
    assert all(s[0] == s[1] for s in seen)
    # per attention level: num_res_blocks (down) + num_res_blocks + 1 (up); plus the middle one
    expected = 1 + len(config.attention_resolutions) * (2 * config.num_res_blocks + 1)
    assert len(seen) == len(attns) == expected


@pytest.mark.parametrize("dim", [16, 7])
def test_timestep_embedding_matches_closed_form(dim: int) -> None:
    ts = [0, 1, 17, 500, 999]
    emb = timestep_embedding(torch.tensor(ts), dim, dtype=torch.float64)
    assert emb.shape == (len(ts), dim)
    half = dim // 2
    for b, t in enumerate(ts):
        for i in range(half):
            freq = math.exp(-math.log(10000.0) * i / (half - 1))
            assert emb[b, i].item() == pytest.approx(math.sin(t * freq), abs=1e-12)
            assert emb[b, half + i].item() == pytest.approx(math.cos(t * freq), abs=1e-12)
        if dim % 2:
            assert emb[b, -1].item() == 0.0


def test_model_depends_on_timestep() -> None:
    model = _build(UNetConfig.tiny())
    _randomize(model, 3)
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    out = model(x, torch.tensor([10, 900]))
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"image_size": 10, "channel_mults": (1, 2, 2)}, "divisible by 2"),
        ({"base_channels": 12, "num_groups": 8}, "not divisible by num_groups"),
        ({"attention_resolutions": (2,)}, "not reachable"),
        ({"dropout": 1.0}, "dropout"),
        ({"channel_mults": ()}, "channel_mults"),
        ({"channel_mults": (1, 0)}, "channel_mults"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"image_channels": 0}, "image_channels"),
        ({"base_channels": 2, "num_groups": 1}, "base_channels"),
        ({"attention_resolutions": 4}, "attention_resolutions"),
    ],
)
def test_invalid_config_raises(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(UNetConfig.tiny(), **changes)


def test_config_accepts_lists_and_stays_hashable() -> None:
    cfg = dataclasses.replace(UNetConfig.tiny(), channel_mults=[1, 1], attention_resolutions=[4])
    assert cfg == UNetConfig.tiny()
    assert hash(cfg) == hash(UNetConfig.tiny())


def test_forward_rejects_bad_inputs() -> None:
    model = _build(UNetConfig.tiny())
    with pytest.raises(ValueError, match="x_t must have shape"):
        model(torch.zeros(2, 3, 8, 8), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="t must have shape"):
        model(torch.zeros(2, 1, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="integer timesteps"):
        model(torch.zeros(2, 1, 8, 8), torch.tensor([1.0, 2.0]))


def test_init_is_a_function_of_the_generator_and_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    a, b, c = (
        _build(UNetConfig.tiny(), 0),
        _build(UNetConfig.tiny(), 0),
        _build(UNetConfig.tiny(), 1),
    )
    assert torch.equal(torch.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_vmap_per_example_gradients_equal_loop() -> None:
    torch.manual_seed(0)  # unused by the code under test; makes any accidental use reproducible
    model = _build(UNetConfig.tiny(), dtype=torch.float64)
    _randomize(model, 4)
    model.eval()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64)  # [3, 1, 8, 8]
    t = torch.tensor([3, 450, 998])  # [3]
    target = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, ti, yi):
        out = torch.func.functional_call(model, p, (xi[None], ti[None]))  # [1, 1, 8, 8]
        return (out - yi[None]).square().mean()

    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0, 0))(
        params, x, t, target
    )
    for i in range(3):
        model.zero_grad()
        ((model(x[i : i + 1], t[i : i + 1]) - target[i : i + 1]).square().mean()).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().max() > 0, f"{name} gets no gradient"
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-9, atol=1e-12, msg=name)
