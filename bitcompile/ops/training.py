"""The training ops: ``bitcpm::ternary_linear`` and its fused backward.

``bitcpm::ternary_linear`` returns the output *and* what the backward needs (int8
activation codes and scales, ternary weight codes and scales), so AOTAutograd saves
exactly those between forward and backward: never a full-precision copy of the weight,
and never the float activations when activations are quantized. Its gradient is one
fused op, ``bitcpm::ternary_linear_backward``, which skips the matmuls autograd does not
need. The ops call into a kernel module chosen by name (``kernel`` argument), which keeps
the op → kernel seam in one place.

:func:`ternary_forward`, :func:`ternary_outputs_like`, :func:`save_for_ternary_backward` and
:func:`ternary_backward` are the pieces every op with these five outputs shares
(``bitcpm::ternary_linear_prescaled`` too); a lowering that computes the same outputs with
other kernels can call :func:`ternary_forward` with its own kernel object.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from bitcompile.targets import get_kernel
from bitcompile.kernels.groups import check_group_code, num_groups
from bitcompile.ops.checks import check_linear_args, check_precision, empty_output

TernaryOutputs = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def ternary_forward(
    impl: Any,
    x: Tensor,
    w_codes: Tensor,
    w_scales: Tensor,
    group_size: int,
    bias: Optional[Tensor],
    quantize_activations: bool,
) -> TernaryOutputs:
    """The training forward on already-quantized weights: ``(y, x_codes, x_scales, w_codes, w_scales)``.

    ``impl`` is anything with the kernel contract's ``quantize_activations``,
    ``int8_ternary_matmul`` and ``float_ternary_matmul`` (a kernel module from ``get_kernel``).
    """
    x2d = x.reshape(-1, x.shape[-1])
    if quantize_activations:
        x_codes, x_scales = impl.quantize_activations(x2d)
        y2d = impl.int8_ternary_matmul(x_codes, x_scales, w_codes, w_scales, group_size, bias, x.dtype)
    else:
        x_codes, x_scales = empty_output(x, torch.int8), empty_output(x, torch.float32)
        y2d = impl.float_ternary_matmul(x2d, w_codes, w_scales, group_size, bias, x.dtype)
    return y2d.reshape(*x.shape[:-1], w_codes.shape[0]), x_codes, x_scales, w_codes, w_scales


def ternary_outputs_like(x: Tensor, weight: Tensor, n_scale_groups: int, quantize_activations: bool) -> TernaryOutputs:
    """Empty tensors shaped like :func:`ternary_forward`'s outputs (the fake impls' result)."""
    n, k = weight.shape
    m = math.prod(x.shape[:-1])
    y = x.new_empty((*x.shape[:-1], n))
    if quantize_activations:
        x_codes, x_scales = x.new_empty((m, k), dtype=torch.int8), x.new_empty((m,), dtype=torch.float32)
    else:
        x_codes, x_scales = empty_output(x, torch.int8), empty_output(x, torch.float32)
    w_codes = weight.new_empty((n, k), dtype=torch.int8)
    w_scales = weight.new_empty((n, n_scale_groups), dtype=torch.float32)
    return y, x_codes, x_scales, w_codes, w_scales


@torch.library.custom_op("bitcpm::ternary_linear", mutates_args=())
def ternary_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    group_size: int,
    quantize_activations: bool,
    kernel: str,
    backward_precision: str = "fp32",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Ternary linear layer ``y = x @ ternary(W)^T + b`` (DESIGN.md §3).

    Args:
        x (Tensor): ``(..., K)`` activations, fp32 or bf16.
        weight (Tensor): ``(N, K)`` latent full-precision weight.
        bias (Tensor, optional): ``(N,)``.
        group_size (int): -1 per output row, 0 per tensor, ``g > 0`` groups of ``g`` along K.
        quantize_activations (bool): per-token absmax int8 activations (W1.58A8) when True.
        kernel (str): kernel module that computes it, e.g. ``"reference"``.
        backward_precision (str): GEMM precision of the backward, ``"fp32"`` | ``"bf16"`` |
            ``"int8"`` (honoured by kernels that list it in ``BACKWARD_PRECISIONS``; others
            compute fp32). Does not change the forward.

    Returns:
        ``(y, x_codes, x_scales, w_codes, w_scales)``: ``y`` has x's dtype and shape
        ``(..., N)``; the others are what the backward uses (``x_codes``/``x_scales`` are
        empty when activations are not quantized).
    """
    check_linear_args(x, weight, bias)
    check_group_code(group_size)
    check_precision(backward_precision)
    impl = get_kernel(kernel)
    w_codes, w_scales = impl.quantize_weight(weight, group_size)
    return ternary_forward(impl, x, w_codes, w_scales, group_size, bias, quantize_activations)


@ternary_linear.register_fake
def _ternary_linear_fake(x, weight, bias, group_size, quantize_activations, kernel, backward_precision="fp32"):
    check_linear_args(x, weight, bias)
    check_precision(backward_precision)
    return ternary_outputs_like(x, weight, num_groups(weight.shape[1], group_size), quantize_activations)


@torch.library.custom_op("bitcpm::ternary_linear_backward", mutates_args=())
def ternary_linear_backward(
    grad_out: Tensor,
    saved_x: Tensor,
    x_scales: Optional[Tensor],
    w_codes: Tensor,
    w_scales: Tensor,
    group_size: int,
    input_dtype: torch.dtype,
    weight_dtype: torch.dtype,
    need_grad_input: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    kernel: str,
    precision: str = "fp32",
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused straight-through backward of :func:`ternary_linear` on 2-D ``grad_out (M, N)``.

    ``grad_input = grad_out @ W_q``, ``grad_weight = grad_out^T @ (x_codes * x_scales)`` (or
    ``@ x`` weight-only), ``grad_bias = grad_out.sum(0)``. A gradient that is not needed is
    returned as an empty tensor and its matmul is skipped. ``precision`` (``"fp32"``,
    ``"bf16"``, ``"int8"``) is passed to kernels that implement it (those listing
    ``BACKWARD_PRECISIONS``, which also take ``grad_input_dtype=``, the dtype grad_input may be
    written in directly); every gradient is converted to its parameter's dtype here.
    """
    check_precision(precision)
    impl = get_kernel(kernel)
    args = (grad_out, saved_x, x_scales, w_codes, w_scales, group_size, need_grad_input, need_grad_weight, need_grad_bias)
    if precision != "fp32" and precision in getattr(impl, "BACKWARD_PRECISIONS", ()):
        gi, gw, gb = impl.ternary_linear_backward(*args, precision=precision, grad_input_dtype=input_dtype)
    else:
        gi, gw, gb = impl.ternary_linear_backward(*args)
    return (
        gi.to(input_dtype) if gi is not None else empty_output(grad_out, input_dtype),
        gw.to(weight_dtype) if gw is not None else empty_output(grad_out, weight_dtype),
        gb.to(grad_out.dtype) if gb is not None else empty_output(grad_out, grad_out.dtype),
    )


@ternary_linear_backward.register_fake
def _ternary_linear_backward_fake(
    grad_out, saved_x, x_scales, w_codes, w_scales, group_size, input_dtype, weight_dtype,
    need_grad_input, need_grad_weight, need_grad_bias, kernel, precision="fp32",
):  # fmt: skip
    check_precision(precision)
    m, n = grad_out.shape
    k = w_codes.shape[1]
    gi = grad_out.new_empty((m, k), dtype=input_dtype) if need_grad_input else empty_output(grad_out, input_dtype)
    gw = grad_out.new_empty((n, k), dtype=weight_dtype) if need_grad_weight else empty_output(grad_out, weight_dtype)
    gb = grad_out.new_empty((n,)) if need_grad_bias else empty_output(grad_out, grad_out.dtype)
    return gi, gw, gb


def save_for_ternary_backward(
    ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], quantize_activations: bool, output,
    group_size: int, kernel: str, backward_precision: str = "fp32",
) -> None:  # fmt: skip
    """setup_context shared by the ternary training ops: keep the int8 codes and scales they returned."""
    _, x_codes, x_scales, w_codes, w_scales = output
    if quantize_activations:
        ctx.save_for_backward(x_codes, x_scales, w_codes, w_scales)
    else:
        ctx.save_for_backward(x, None, w_codes, w_scales)
    ctx.x_shape = x.shape
    ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.group_size, ctx.kernel, ctx.backward_precision = group_size, kernel, backward_precision


def ternary_backward(ctx, grad_y: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(grad_input, grad_weight, grad_bias) through the fused op, from what :func:`save_for_ternary_backward` kept."""
    saved_x, x_scales, w_codes, w_scales = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and ctx.bias_dtype is not None
    n, k = w_codes.shape
    gi, gw, gb = torch.ops.bitcpm.ternary_linear_backward(
        grad_y.reshape(-1, n), saved_x.reshape(-1, k), x_scales, w_codes, w_scales, ctx.group_size,
        ctx.x_dtype, ctx.w_dtype, need_x, need_w, need_b, ctx.kernel, ctx.backward_precision,
    )  # fmt: skip
    return (
        gi.reshape(ctx.x_shape) if need_x else None,
        gw if need_w else None,
        gb.to(ctx.bias_dtype) if need_b else None,
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, group_size, quantize_activations, kernel = inputs[:6]
    precision = inputs[6] if len(inputs) > 6 else "fp32"
    save_for_ternary_backward(ctx, x, weight, bias, quantize_activations, output, group_size, kernel, precision)


def _backward(ctx, grad_y, *_grads_of_saved_outputs):
    return (*ternary_backward(ctx, grad_y), None, None, None, None)


ternary_linear.register_autograd(_backward, setup_context=_setup_context)


def ternary_linear_output(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    group_size: int = -1,
    quantize_activations: bool = True,
    kernel: str = "reference",
) -> Tensor:
    """Convenience wrapper: only the output of ``bitcpm::ternary_linear``."""
    return torch.ops.bitcpm.ternary_linear(x, weight, bias, group_size, quantize_activations, kernel)[0]
