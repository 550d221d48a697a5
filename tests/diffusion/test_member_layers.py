"""The ensemble's batching rules (diffusion/member_layers.py) against plain layers per member."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from diffusion.member_layers import MemberConv2d, MemberGroupNorm, use_member_layers

K = 3
LAYERS = {
    "conv 3x3 (grouped)": lambda: nn.Conv2d(4, 6, 3, padding=1),
    "conv 3x3 stride 2": lambda: nn.Conv2d(4, 5, 3, stride=2, padding=1),
    "conv 1x1 (einsum)": lambda: nn.Conv2d(4, 6, 1),
    "conv 1x1 without bias": lambda: nn.Conv2d(4, 6, 1, bias=False),
    "conv 2 outputs (per member)": lambda: nn.Conv2d(4, 2, 3, padding=1),
    "conv 1 input (per member)": lambda: nn.Conv2d(1, 8, 3, padding=1),
    "conv 3 inputs stride 2 (per member)": lambda: nn.Conv2d(3, 16, 3, stride=2, padding=1),
    "group norm": lambda: nn.GroupNorm(2, 4),
}
SMALL_INPUT_LAYERS = ["conv 1 input (per member)", "conv 3 inputs stride 2 (per member)"]
"""Convolutions with fewer than 8 input channels per member (the U-Net's input convolution)."""


def _in_channels(layer: nn.Module) -> int:
    return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.num_channels


def _members(name: str) -> list[nn.Module]:
    """K float64 copies of the layer with different random parameters (norm affine included)."""
    torch.manual_seed(0)
    members = []
    for _ in range(K):
        layer = LAYERS[name]().double()
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_()
        members.append(layer)
    return members


def _loss(module, params, x):
    return functional_call(module, params, (x,)).square().sum()


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("shared_input", [False, True])
def test_vmapped_member_layer_equals_each_plain_layer(name, shared_input):
    members = _members(name)
    params, _ = stack_module_state(members)  # name -> [K, ...]
    skeleton = use_member_layers(copy.deepcopy(members[0]).to("meta"))
    assert type(skeleton) in (MemberConv2d, MemberGroupNorm)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(K, 5, _in_channels(members[0]), 6, 6, generator=gen, dtype=torch.float64)
    in_x = None if shared_input else 0
    inputs = [x[0] if shared_input else x[k] for k in range(K)]

    # as train_ensemble uses them: vmapped forward, ordinary backward of the summed losses
    params = {key: value.requires_grad_(True) for key, value in params.items()}
    out = vmap(lambda p, xx: functional_call(skeleton, p, (xx,)), in_dims=(0, in_x))(
        params, x[0] if shared_input else x
    )
    values = torch.autograd.grad(out.square().sum(), list(params.values()))
    grads = dict(zip(params, values, strict=True))
    # and inside torch.func transforms (the layers' own backward)
    func_grads = vmap(grad(lambda p, xx: _loss(skeleton, p, xx)), in_dims=(0, in_x))(
        {key: value.detach() for key, value in params.items()}, x[0] if shared_input else x
    )
    for k, (layer, xk) in enumerate(zip(members, inputs, strict=True)):
        torch.testing.assert_close(out[k], layer(xk), rtol=1e-12, atol=1e-12)
        plain = torch.func.grad(partial(_loss, layer), argnums=0)(
            dict(layer.named_parameters()), xk
        )
        for key, value in plain.items():
            torch.testing.assert_close(grads[key][k], value, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(func_grads[key][k], value, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_member_layers_outside_vmap_are_the_plain_layers(name):
    (layer,) = _members(name)[:1]
    member = use_member_layers(copy.deepcopy(layer))
    x = torch.randn(2, _in_channels(layer), 6, 6, dtype=torch.float64, requires_grad=True)
    out_plain = layer(x)
    out_member = member(x)
    torch.testing.assert_close(out_member, out_plain, rtol=0, atol=0)
    g = torch.randn_like(out_plain)
    plain = torch.autograd.grad(out_plain, [x, *layer.parameters()], g)
    ours = torch.autograd.grad(out_member, [x, *member.parameters()], g)
    for a, b in zip(ours, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_only_covered_layers_are_swapped():
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2),  # dilated: vmap's own rule
        nn.Conv2d(4, 4, 3, padding=1, groups=2),  # grouped: vmap's own rule
        nn.GroupNorm(2, 4),
        nn.GroupNorm(2, 4, affine=False),
        nn.Linear(4, 4),
    )
    use_member_layers(model)
    assert [type(m).__name__ for m in model] == [
        "MemberConv2d",
        "Conv2d",
        "Conv2d",
        "MemberGroupNorm",
        "GroupNorm",
        "Linear",
    ]


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_a_member_does_not_depend_on_how_many_share_the_batch(name):
    """Bitwise in float32: the last 5 members' outputs and gradients are the same whether they
    run in a batch of 8 members or on their own (what resuming a ground truth relies on)."""
    torch.manual_seed(0)
    members = [LAYERS[name]() for _ in range(8)]
    skeleton = use_member_layers(copy.deepcopy(members[0]).to("meta"))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 32, _in_channels(members[0]), 8, 8, generator=gen)

    def run(group: list[nn.Module], xs: torch.Tensor):
        params, _ = stack_module_state(group)
        params = {key: value.requires_grad_(True) for key, value in params.items()}
        out = vmap(lambda p, xx: functional_call(skeleton, p, (xx,)))(params, xs)
        grads = torch.autograd.grad(out.square().sum(), list(params.values()))
        return out, grads

    out8, grads8 = run(members, x)
    out5, grads5 = run(members[3:], x[3:])
    assert torch.equal(out8[3:], out5)
    for g8, g5 in zip(grads8, grads5, strict=True):
        assert torch.equal(g8[3:], g5)


@pytest.mark.parametrize("size", [2, 5, 8, 15])
@pytest.mark.parametrize("name", SMALL_INPUT_LAYERS)
def test_small_input_convolution_does_not_depend_on_the_ensemble_size(name, size):
    """Bitwise in float32: the last ``size`` of 16 members, in an ensemble of their own, get the
    same outputs and weight, bias and input gradients. oneDNN's grouped convolution failed this
    with 1 input channel per member on an AVX2 CPU (its kernel depends on the total input
    channels ``K * C_in``: fewer than 8 and at least 8 summed in different orders); sizes on
    both sides of 8 and of 16 (AVX-512's SIMD width) are compared."""
    torch.manual_seed(0)
    members = [LAYERS[name]() for _ in range(16)]
    skeleton = use_member_layers(copy.deepcopy(members[0]).to("meta"))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 32, _in_channels(members[0]), 8, 8, generator=gen)

    def run(group: list[nn.Module], xs: torch.Tensor):
        params, _ = stack_module_state(group)
        leaves = [xs.clone().requires_grad_(True)]
        leaves += [value.requires_grad_(True) for value in params.values()]
        out = vmap(lambda p, xx: functional_call(skeleton, p, (xx,)))(
            dict(zip(params, leaves[1:], strict=True)), leaves[0]
        )
        gen_out = torch.Generator().manual_seed(2)
        grad_out = torch.randn(16, *out.shape[1:], generator=gen_out)[16 - len(group) :]
        return out, torch.autograd.grad(out, leaves, grad_out)

    out_all, grads_all = run(members, x)
    out_some, grads_some = run(members[16 - size :], x[16 - size :])
    assert torch.equal(out_all[16 - size :], out_some)
    for g_all, g_some in zip(grads_all, grads_some, strict=True):  # input, weight, bias
        assert torch.equal(g_all[16 - size :], g_some)
