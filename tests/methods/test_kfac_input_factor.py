"""The convolution input factor of K-FAC expand against a float64 ``F.unfold`` Gram."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods import kfac_curvature
from methods.kfac_curvature import _conv_patch_gram, _input_covariance

CONVS = {
    "3x3 pad 1": dict(kernel_size=3, padding=1),
    "3x3 stride 2": dict(kernel_size=3, padding=1, stride=2),
    "1x1": dict(kernel_size=1),
    "3x2 mixed": dict(kernel_size=(3, 2), padding=(1, 0), stride=(2, 1)),
    "dilated (F.unfold path)": dict(kernel_size=3, padding=2, dilation=2),
}


def _reference(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Gram and sum of the float64 ``F.unfold`` patches, the definition curvlinops uses."""
    patches = F.unfold(
        x.double(), conv.kernel_size, conv.dilation, conv.padding, conv.stride
    )  # [B, d_in, L]
    vectors = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return vectors.T @ vectors, vectors.sum(dim=0), patches.shape[2]


@pytest.mark.parametrize("name", sorted(CONVS))
def test_patch_gram_equals_unfold_gram_in_float64(name, monkeypatch):
    monkeypatch.setattr(kfac_curvature, "_GRAM_GROUP_ROWS", 50)  # several groups per batch
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(3, 4, **CONVS[name]).double()
    x = torch.randn(7, 3, 6, 5, generator=gen, dtype=torch.float64)
    outer, sums, positions = _conv_patch_gram(conv, x)
    ref_outer, ref_sums, ref_positions = _reference(conv, x)
    assert positions == ref_positions
    torch.testing.assert_close(outer, ref_outer, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-12, atol=1e-12)


def test_float32_patch_gram_is_accurate_to_float64():
    """float32 products per group, float64 across groups: ~1e-7 of the largest entry."""
    gen = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(32, 16, 3, padding=1)
    x = F.silu(torch.randn(512, 32, 8, 8, generator=gen))  # 32k patch vectors, 8 groups
    outer, sums, _ = _conv_patch_gram(conv, x)
    ref_outer, ref_sums, _ = _reference(conv, x)
    assert outer.dtype == sums.dtype == torch.float64
    assert (outer - ref_outer).abs().max() <= 2e-7 * ref_outer.abs().max()
    assert (sums - ref_sums).abs().max() <= 2e-7 * ref_sums.abs().max()
    # one float32 product of the whole batch is measurably worse: the grouping matters
    vectors = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 288)
    whole = (vectors.T @ vectors).double()
    assert (whole - ref_outer).abs().max() > (outer - ref_outer).abs().max()


@pytest.mark.parametrize("joint_bias", [True, False])
def test_input_covariance_borders_the_bias_and_scales_by_positions(joint_bias):
    gen = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2).double()
    x = torch.randn(5, 2, 6, 6, generator=gen, dtype=torch.float64)
    factor = _input_covariance(conv, x, "expand", joint_bias)
    patches = F.unfold(x, 3, padding=1, stride=2)  # [5, 18, 9]
    vectors = patches.transpose(1, 2).reshape(-1, 18)
    if joint_bias:
        vectors = torch.cat([vectors, torch.ones(vectors.shape[0], 1, dtype=vectors.dtype)], 1)
    torch.testing.assert_close(factor, vectors.T @ vectors / 9, rtol=1e-12, atol=1e-12)
