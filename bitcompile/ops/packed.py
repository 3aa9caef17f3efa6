"""The serving op: ``bitcpm::ternary_linear_packed`` on 2-bit packed weights.

It calls the kernel module's ``packed_linear``, so a kernel can fuse the per-token int8
quantization into its matmul. On the C kernels a W1.58A8 call goes through one prepared C
call per weight (:func:`prepared_cpu_call`), shared with the eager ``PackedTernaryLinear``.
Its autograd formula gives the input (and bias) gradient, so adapters can train on a
packed base.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from bitcompile.targets import get_kernel
from bitcompile.kernels.packing import unpack_codes
from bitcompile.ops.checks import check_packed_linear_args


@torch.library.custom_op("bitcpm::ternary_linear_packed", mutates_args=())
def ternary_linear_packed(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    bias: Optional[Tensor],
    in_features: int,
    group_size: int,
    quantize_activations: bool,
    kernel: str,
) -> Tensor:
    """Inference on 2-bit packed ternary weights: ``y = x @ (codes * scales)^T + b``.

    Args:
        x (Tensor): ``(..., K)`` activations.
        packed (Tensor): uint8 codes in the canonical layout (``bitcompile.kernels.packing``).
        scales (Tensor): fp32 ``(N, n_groups)`` multipliers.
        bias (Tensor, optional): ``(N,)``.
        in_features (int): K (the packed rows are padded; K says where they end).
        group_size (int): -1 per row, 0 per tensor, ``g > 0`` groups of ``g``.
        quantize_activations (bool): W1.58A8 when True, weight-only otherwise.
        kernel (str): kernel module name (``"reference"``, ``"cpu"`` ...).
    """
    prepared = prepared_cpu_call(x, packed, scales, bias, in_features, group_size, quantize_activations, kernel)
    if prepared is not None:
        return prepared(x)
    check_packed_linear_args(x, packed, scales, bias, in_features, group_size)
    x2d = x.reshape(-1, in_features)
    # One kernel entry, so a kernel can fuse activation quantization into its matmul.
    y2d = get_kernel(kernel).packed_linear(
        x2d, packed, scales, in_features, group_size, bias, quantize_activations, x.dtype
    )
    return y2d.reshape(*x.shape[:-1], packed.shape[0])


# packed weight tensor (by identity) -> its prepared CPU call; entries go with the weights
_PREPARED_CALLS = WeakIdKeyDictionary()


def prepared_cpu_call(x, packed, scales, bias, in_features, group_size, quantize_activations, kernel):
    """The one-C-call path (``kernels.cpu.PreparedPackedLinear``) that computes this packed layer
    for ``x``, or None where it does not apply (not W1.58A8 on the C kernels). One prepared call
    per weight tensor, shared by the op (compiled graphs) and ``PackedTernaryLinear`` (eager):
    each call would otherwise validate and convert its arguments again, once per layer and token."""
    if kernel != "cpu" or not quantize_activations or not x.is_cpu or x.dtype not in (torch.float32, torch.bfloat16):
        return None
    from bitcompile.kernels import cpu

    if not cpu.available() or not packed.is_cpu or not cpu.can_prepare(packed, scales, bias):
        return None  # e.g. a non-contiguous or fp16 buffer: the general path reads it per call
    buffers = {"packed": packed, "scales": scales, "bias": bias}
    prepared = _PREPARED_CALLS.get(packed)
    if prepared is not None and prepared.in_features == in_features and prepared.group_code == group_size:
        if prepared.serves(x, buffers):
            return prepared
    check_packed_linear_args(x, packed, scales, bias, in_features, group_size)
    prepared = _PREPARED_CALLS[packed] = cpu.PreparedPackedLinear(packed, scales, in_features, group_size, bias)
    return prepared


@ternary_linear_packed.register_fake
def _ternary_linear_packed_fake(x, packed, scales, bias, in_features, group_size, quantize_activations, kernel):
    check_packed_linear_args(x, packed, scales, bias, in_features, group_size)
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _packed_setup_context(ctx, inputs, output):
    x, packed, scales, bias, in_features, group_size, _quantize_activations, _kernel = inputs
    ctx.save_for_backward(packed, scales)
    ctx.in_features, ctx.group_size, ctx.x_dtype = in_features, group_size, x.dtype


def _packed_backward(ctx, grad_out):
    """Gradients for adapters trained on a packed base (LoRA style): the packed weights are
    constants, the activation quantizer is the identity (the STE, DESIGN.md §3), so
    ``grad_x = g @ (codes * scales)`` in fp32 and ``grad_bias = sum g``."""
    packed, scales = ctx.saved_tensors
    g2d = grad_out.reshape(-1, grad_out.shape[-1]).float()
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        weight = get_kernel("reference").dequantize_weight(unpack_codes(packed, ctx.in_features), scales, ctx.group_size)
        grad_x = (g2d @ weight).reshape(*grad_out.shape[:-1], ctx.in_features).to(ctx.x_dtype)
    if ctx.needs_input_grad[3]:
        grad_bias = g2d.sum(dim=0)
    return grad_x, None, None, grad_bias, None, None, None, None


ternary_linear_packed.register_autograd(_packed_backward, setup_context=_packed_setup_context)
