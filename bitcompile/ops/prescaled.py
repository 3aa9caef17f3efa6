"""Ops for precomputed (global) per-tensor weight scales (:mod:`bitcompile.distributed`).

``bitcpm::tensor_scale_marker(weight, scale)`` is what a ``TensorScaledLinear`` emits while
it is being compiled: it ties a layer's weight to its scale buffer in the Dynamo graph. The
backend strips it (:mod:`bitcompile.passes.precomputed_scales`) and rewrites the layer into
``bitcpm::ternary_linear_prescaled``, the per-tensor ternary linear that takes its absmean
scale as an input instead of computing it from the weight it receives. Under another
backend the marker is an identity (a copy), so the model still runs.

The op returns the same five tensors as ``bitcpm::ternary_linear`` and shares its fake
outputs and its fused straight-through backward (``bitcpm::ternary_linear_backward``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bitcompile.targets import get_kernel
from bitcompile.kernels import reference
from bitcompile.kernels.groups import EPS, PER_TENSOR, num_groups
from bitcompile.ops.checks import check_linear_args
from bitcompile.ops.training import (
    save_for_ternary_backward,
    ternary_backward,
    ternary_forward,
    ternary_outputs_like,
)


@torch.library.custom_op("bitcpm::tensor_scale_marker", mutates_args=())
def tensor_scale_marker(weight: Tensor, scale: Tensor) -> Tensor:
    """Identity on ``weight`` that names ``scale`` as its precomputed per-tensor scale."""
    return weight.clone()


@tensor_scale_marker.register_fake
def _tensor_scale_marker_fake(weight, scale):
    return torch.empty_like(weight)


def _marker_setup(ctx, inputs, output) -> None:
    pass


def _marker_backward(ctx, grad):
    return grad, None


tensor_scale_marker.register_autograd(_marker_backward, setup_context=_marker_setup)


def _check_scale(weight_scale: Tensor) -> None:
    if weight_scale.numel() != 1 or not weight_scale.is_floating_point():
        raise ValueError(
            "bitcpm::ternary_linear_prescaled: weight_scale must be a floating-point tensor with one element, "
            f"got {weight_scale.dtype} of shape {tuple(weight_scale.shape)}"
        )


def quantize_weight_with_scale(weight: Tensor, weight_scale: Tensor) -> tuple[Tensor, Tensor]:
    """DESIGN.md §3 per-tensor quantization with a given absmean: ``codes (N, K)`` int8, ``scales (N, 1)`` fp32."""
    scales = weight_scale.detach().float().reshape(1, 1).clamp_min(EPS).expand(weight.shape[0], 1).contiguous()
    return reference.ternary_codes(weight, scales, PER_TENSOR), scales


@torch.library.custom_op("bitcpm::ternary_linear_prescaled", mutates_args=())
def ternary_linear_prescaled(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    weight_scale: Tensor,
    quantize_activations: bool,
    kernel: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-tensor ternary linear whose absmean ``weight_scale`` (one element) is given.

    Same outputs as ``bitcpm::ternary_linear`` with ``group_size=0``; only the scale comes
    from outside, e.g. the global absmean of a sharded weight that
    :func:`bitcompile.distributed.precompute_tensor_scales` computed with one all-reduce.
    """
    check_linear_args(x, weight, bias)
    _check_scale(weight_scale)
    w_codes, w_scales = quantize_weight_with_scale(weight, weight_scale)
    return ternary_forward(get_kernel(kernel), x, w_codes, w_scales, PER_TENSOR, bias, quantize_activations)


@ternary_linear_prescaled.register_fake
def _ternary_linear_prescaled_fake(x, weight, bias, weight_scale, quantize_activations, kernel):
    check_linear_args(x, weight, bias)
    _check_scale(weight_scale)
    return ternary_outputs_like(x, weight, num_groups(weight.shape[1], PER_TENSOR), quantize_activations)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, _weight_scale, quantize_activations, kernel = inputs
    save_for_ternary_backward(ctx, x, weight, bias, quantize_activations, output, PER_TENSOR, kernel)


def _backward(ctx, grad_y, *_grads_of_saved_outputs):
    # The scale is a statistic of the weight: straight-through, no gradient.
    return (*ternary_backward(ctx, grad_y), None, None, None)


ternary_linear_prescaled.register_autograd(_backward, setup_context=_setup_context)
