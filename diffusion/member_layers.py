"""Batching rules for the layers of a vmapped ensemble, replacing torch.func's generic ones.

:func:`diffusion.ensemble.train_ensemble` runs K U-Nets as one ``torch.func.vmap`` over
``functional_call``. For two kinds of layer, torch.func's generic batching rules cost more than
the arithmetic on the CPU (figures: perf/README.md, "Ensemble training"):

- ``nn.GroupNorm`` with per-member affine parameters: vmap normalises without the affine and
  applies the members' weights and biases as broadcast multiplies and adds on a transposed
  layout, plus copies between layouts. Here: one native ``group_norm`` over
  ``[B, K * C, ...]`` with ``K * G`` groups and the members' affine parameters stacked to
  ``[K * C]``: per (row, group) the same computation as one member's.
- ``nn.Conv2d``: vmap makes every convolution one grouped convolution (K groups), which oneDNN
  runs well for 3x3 kernels with many output channels but slower than K separate convolutions
  when each group has very few output channels (the output convolution, 1 channel per member),
  and slower than a batched matrix product for 1x1 kernels (the ResBlock skips).
  Here: ``C_out < _MIN_GROUPED_OUT_CHANNELS`` -> one convolution per member; 1x1 kernels ->
  ``einsum`` (a batched matrix product over members); ``C_in < _MIN_GROUPED_IN_CHANNELS`` (the
  input convolution: 1 or 3 image channels per member) -> one convolution per member, because
  oneDNN's kernel for the grouped convolution depends on the total input channels ``K * C_in``
  when they are fewer than about one SIMD block (measured on an AVX2 CPU, 8 floats: with 1
  input and 8 output channels per member, K < 8 and K >= 8 summed in different orders, the
  member's forward output differing by ~1e-7; AVX-512's block is 16 floats); otherwise the
  grouped convolution, its bias added apart as vmap does (a bias fused into oneDNN's grouped
  convolution gets a gradient whose rounding depends on K).

Every member's output depends only on its own inputs and parameters, computed by kernels that
do not depend on K, so a member's weights stay independent of the other members, bitwise
(tests/diffusion/test_ensemble.py). Both layers go through one ``torch.autograd.Function``
(:class:`_MemberLayer`, given the layer's plain operation and batching rule) whose ``vmap``
staticmethod is torch.func's extension point: under vmap autograd records the ordinary
operations of the rule, so the backward pass is the ordinary one of those operations.
Outside vmap they compute what ``nn.GroupNorm`` / ``nn.Conv2d`` compute, gradients included
(the backward recomputes the layer; only the ensemble's skeleton uses them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MemberConv2d", "MemberGroupNorm", "use_member_layers"]

_MIN_GROUPED_OUT_CHANNELS = 4
"""Convolutions with fewer output channels run as one convolution per member (speed)."""

_MIN_GROUPED_IN_CHANNELS = 8
"""Convolutions (not 1x1) with fewer input channels run as one convolution per member: with at
least 8 per member, any ensemble (K >= 2) gives oneDNN's grouped convolution at least 16 input
channels, one full SIMD block of the widest instruction set (AVX-512), so its kernel choice
does not change with K (K-independence of a member's result, module docstring)."""


def _members_first(t: torch.Tensor, bdim: int | None, k: int) -> torch.Tensor:
    """The member dim of a (physical) tensor moved to 0, expanded if ``t`` is shared."""
    return t.expand(k, *t.shape) if bdim is None else t.movedim(bdim, 0)


def _members_second(t: torch.Tensor, bdim: int | None, k: int) -> torch.Tensor:
    """The member dim moved to 1 (``[B, K, ...]``: a view when vmap already keeps it there)."""
    if bdim is None:
        return t.unsqueeze(1).expand(t.shape[0], k, *t.shape[1:])
    return t.movedim(bdim, 1)


def _recomputed_grads(fn, grad, *inputs):
    """Vector-Jacobian product of ``fn(*inputs)`` with ``grad``, by recomputing ``fn``.

    Uses ``torch.func.vjp``, so it is also valid inside torch.func transforms. The gradient of a
    None input is None.
    """
    present = [t for t in inputs if t is not None]

    def call(*tensors):
        it = iter(tensors)
        return fn(*(None if t is None else next(it) for t in inputs))

    _, vjp_fn = torch.func.vjp(call, *present)
    found = iter(vjp_fn(grad))
    return [None if t is None else next(found) for t in inputs]


class _MemberLayer(torch.autograd.Function):
    """A layer call with its own vmap rule: ``apply(x, weight, bias, plain, batched, options)``.

    Outside vmap it computes ``plain(x, weight, bias, *options)`` (backward by recomputation);
    under vmap its rule is ``batched(k, in_dims, x, weight, bias, *options)``, which returns
    ``(output, out_dim)``.
    """

    generate_vmap_rule = False

    @staticmethod
    def forward(x, weight, bias, plain, batched, options):
        return plain(x, weight, bias, *options)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, plain, _, options = inputs
        ctx.save_for_backward(x, weight, bias)
        ctx.plain, ctx.options = plain, options

    @staticmethod
    def backward(ctx, grad):
        grads = _recomputed_grads(
            lambda x_, w_, b_: ctx.plain(x_, w_, b_, *ctx.options), grad, *ctx.saved_tensors
        )
        return (*grads, None, None, None)

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, plain, batched, options):
        return batched(info.batch_size, in_dims[:3], x, weight, bias, *options)


def _group_norm(x, weight, bias, num_groups, eps):
    return F.group_norm(x, num_groups, weight, bias, eps)


def _batched_group_norm(k, in_dims, x, weight, bias, num_groups, eps):
    """K members' group norms as one with ``K * G`` groups over ``[B, K * C, ...]``."""
    x = _members_second(x, in_dims[0], k)  # [B, K, C, *spatial]
    b, _, c = x.shape[:3]
    weight = _members_first(weight, in_dims[1], k).reshape(k * c)
    bias = _members_first(bias, in_dims[2], k).reshape(k * c)
    out = F.group_norm(x.reshape(b, k * c, *x.shape[3:]), k * num_groups, weight, bias, eps)
    return out.view(b, k, c, *x.shape[3:]), 1


def _conv(x, weight, bias, stride, padding):
    return F.conv2d(x, weight, bias, stride, padding)


def _per_member_conv(x, weight, bias, stride, padding):
    """One ordinary convolution per member.

    Shapes: x [K, B, C_in, H, W], weight [K, C_out, C_in, kh, kw], bias [K, C_out] or None
    -> [K, B, C_out, H', W'].
    """
    # unbind, not indexing: the backward of k selects would zero-fill k full gradients
    biases = [None] * x.shape[0] if bias is None else bias.unbind(0)
    outs = [
        F.conv2d(xm, wm, bm, stride, padding)
        for xm, wm, bm in zip(x.unbind(0), weight.unbind(0), biases, strict=True)
    ]
    return torch.stack(outs)


def _batched_conv(k, in_dims, x, weight, bias, stride, padding):
    """K members' convolutions: per member, as ``einsum`` (1x1) or grouped (module docstring)."""
    weight = _members_first(weight, in_dims[1], k)  # [K, C_out, C_in, kh, kw]
    bias = None if bias is None else _members_first(bias, in_dims[2], k)  # [K, C_out]
    c_out, c_in = weight.shape[1], weight.shape[2]
    if c_out < _MIN_GROUPED_OUT_CHANNELS:
        return _per_member_conv(_members_first(x, in_dims[0], k), weight, bias, stride, padding), 0
    if weight.shape[3:] == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0):
        x = _members_second(x, in_dims[0], k)  # [B, K, C_in, H, W]
        out = torch.einsum("koc,bkchw->bkohw", weight.flatten(2), x)
        if bias is not None:
            out = out + bias[None, :, :, None, None]
        return out, 1
    if c_in < _MIN_GROUPED_IN_CHANNELS:
        return _per_member_conv(_members_first(x, in_dims[0], k), weight, bias, stride, padding), 0
    x = _members_second(x, in_dims[0], k)  # [B, K, C_in, H, W]
    b = x.shape[0]
    out = F.conv2d(
        x.reshape(b, k * c_in, *x.shape[3:]),
        weight.reshape(k * c_out, *weight.shape[2:]),
        None,  # oneDNN's bias gradient of a grouped convolution depends on K: add it apart
        stride,
        padding,
        groups=k,
    )
    if bias is not None:
        out = out + bias.reshape(1, k * c_out, 1, 1)
    return out.view(b, k, c_out, *out.shape[2:]), 1


class MemberGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with the ensemble batching rule above (same parameters and names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Group-normalise ``x`` as ``nn.GroupNorm`` does, batching per member under vmap."""
        options = (self.num_groups, self.eps)
        return _MemberLayer.apply(
            x, self.weight, self.bias, _group_norm, _batched_group_norm, options
        )


class MemberConv2d(nn.Conv2d):
    """``nn.Conv2d`` (zero padding, no dilation or groups) with the ensemble batching rule."""

    def _conv_forward(self, x, weight, bias):
        options = (self.stride, self.padding)
        return _MemberLayer.apply(x, weight, bias, _conv, _batched_conv, options)


def use_member_layers(module: nn.Module) -> nn.Module:
    """Swap, in place, every GroupNorm and Conv2d the rules cover for its member version.

    Covered are affine GroupNorms and plain Conv2ds (zero padding, no dilation or groups). The
    member versions have the same parameters and the same forward outside vmap.

    Returns:
        ``module``, modified in place.
    """
    for layer in module.modules():
        if type(layer) is nn.GroupNorm and layer.affine:
            layer.__class__ = MemberGroupNorm
        elif (
            type(layer) is nn.Conv2d
            and layer.groups == 1
            and tuple(layer.dilation) == (1, 1)
            and layer.padding_mode == "zeros"
            and not isinstance(layer.padding, str)
        ):
            layer.__class__ = MemberConv2d
    return module
