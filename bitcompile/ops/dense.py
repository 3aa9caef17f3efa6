"""The dense (not ternary) layers a packed model keeps: ``bitcpm::float_gemv_linear`` and
``bitcpm::int8_dense_linear``.

Each op has an eager twin (:func:`float_gemv`, :func:`int8_linear`) that the layer classes
call directly: at decode sizes the dispatcher costs about as much as the GEMV itself.
Compiled graphs and export see the ops.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bitcompile.kernels import cpu as cpu_kernels
from bitcompile.kernels import reference
from bitcompile.kernels.groups import PER_ROW


@torch.library.custom_op("bitcpm::float_gemv_linear", mutates_args=())
def float_gemv_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear`` in fp32 on bitcompile's multi-threaded GEMV for at most ``DENSE_MAX_M``
    tokens (torch's otherwise): the float head a packed model keeps (``FloatGemvLinear``)."""
    return float_gemv(x, weight, bias)


def float_gemv(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The op's computation, callable without the dispatcher (eager ``FloatGemvLinear``)."""
    if weight.numel() == 0:  # a 0-feature layer: reshape(-1, 0) is ambiguous and there is no GEMV to run
        return torch.nn.functional.linear(x, weight, bias)
    y = cpu_kernels.dense_linear(x.reshape(-1, weight.shape[1]), weight, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@float_gemv_linear.register_fake
def _float_gemv_linear_fake(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("bitcpm::int8_dense_linear", mutates_args=())
def int8_dense_linear_op(x: Tensor, codes: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    """W8A8 ``y = (q_x @ q_w^T) * s_w * s_x (+ bias)`` for ``x`` of shape ``(..., K)``, fp32 out."""
    return int8_linear(x, codes, scales, bias)


def int8_linear(x: Tensor, codes: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    """The op's computation, callable without the dispatcher (eager ``Int8Linear``)."""
    y = cpu_kernels.int8_dense_linear(x.reshape(-1, codes.shape[1]), codes, scales, bias, torch.float32)
    return y.reshape(*x.shape[:-1], codes.shape[0])


@int8_dense_linear_op.register_fake
def _int8_dense_linear_fake(x, codes, scales, bias):
    return x.new_empty((*x.shape[:-1], codes.shape[0]), dtype=torch.float32)


def _int8_setup_context(ctx, inputs, output):
    x, codes, scales, _bias = inputs
    ctx.save_for_backward(codes, scales)
    ctx.x_dtype = x.dtype


def _int8_backward(ctx, grad_out):
    """Gradients for layers trained in front of the int8 head: the activation quantizer is the
    identity (STE), the int8 weights are constants: ``grad_x = g @ (codes * scales)``."""
    codes, scales = ctx.saved_tensors
    g2d = grad_out.reshape(-1, grad_out.shape[-1]).float()
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        weight = reference.dequantize_weight(codes, scales, PER_ROW)  # per-row int8 codes * (N, 1) scales
        grad_x = (g2d @ weight).reshape(*grad_out.shape[:-1], codes.shape[1]).to(ctx.x_dtype)
    if ctx.needs_input_grad[3]:
        grad_bias = g2d.sum(dim=0)
    return grad_x, None, None, grad_bias


int8_dense_linear_op.register_autograd(_int8_backward, setup_context=_int8_setup_context)
