"""The ``bitcpm::`` custom ops the rewrite passes emit, with fake impls and autograd.

``bitcpm::ternary_linear`` returns the output *and* what the backward needs (int8
activation codes and scales, ternary weight codes and scales), so AOTAutograd saves
exactly those between forward and backward: never a full-precision copy of the weight,
and never the float activations when activations are quantized. Its gradient is one
fused op, ``bitcpm::ternary_linear_backward``, which skips the matmuls autograd does not
need. The ops call into a kernel module chosen by name (``kernel`` argument), which keeps
the op → kernel seam in one place.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from bitcompile.kernels import get_kernel
from bitcompile.kernels.groups import check_group_code, num_groups


def _empty(like: Tensor, dtype: torch.dtype) -> Tensor:
    return like.new_empty((0,), dtype=dtype)


BACKWARD_PRECISIONS = ("fp32", "bf16", "int8")


def _check_precision(precision: str) -> None:
    if precision not in BACKWARD_PRECISIONS:
        raise ValueError(f"bitcpm: backward precision {precision!r} is not one of {', '.join(BACKWARD_PRECISIONS)}")


def _check_shapes(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    if weight.dim() != 2:
        raise ValueError(f"bitcpm::ternary_linear: weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"bitcpm::ternary_linear: input's last dim {tuple(x.shape)[-1:]} does not match "
            f"weight in_features {weight.shape[1]} (weight shape {tuple(weight.shape)})"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"bitcpm::ternary_linear: bias shape {tuple(bias.shape)} does not match out_features {weight.shape[0]}"
        )
    if not x.is_floating_point() or not weight.is_floating_point():
        raise TypeError(
            f"bitcpm::ternary_linear: input and weight must be floating point, got {x.dtype} and {weight.dtype}"
        )


def ternary_forward(
    impl, x: Tensor, w_codes: Tensor, w_scales: Tensor, group_size: int, bias: Optional[Tensor], quantize_activations: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The training forward on already-quantized weights: ``(y, x_codes, x_scales, w_codes, w_scales)``."""
    x2d = x.reshape(-1, x.shape[-1])
    if quantize_activations:
        x_codes, x_scales = impl.quantize_activations(x2d)
        y2d = impl.int8_ternary_matmul(x_codes, x_scales, w_codes, w_scales, group_size, bias, x.dtype)
    else:
        x_codes, x_scales = _empty(x, torch.int8), _empty(x, torch.float32)
        y2d = impl.float_ternary_matmul(x2d, w_codes, w_scales, group_size, bias, x.dtype)
    return y2d.reshape(*x.shape[:-1], w_codes.shape[0]), x_codes, x_scales, w_codes, w_scales


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
    _check_shapes(x, weight, bias)
    check_group_code(group_size)
    _check_precision(backward_precision)
    impl = get_kernel(kernel)
    w_codes, w_scales = impl.quantize_weight(weight, group_size)
    return ternary_forward(impl, x, w_codes, w_scales, group_size, bias, quantize_activations)


@ternary_linear.register_fake
def _ternary_linear_fake(x, weight, bias, group_size, quantize_activations, kernel, backward_precision="fp32"):
    _check_shapes(x, weight, bias)
    _check_precision(backward_precision)
    n, k = weight.shape
    m = math.prod(x.shape[:-1])
    y = x.new_empty((*x.shape[:-1], n))
    if quantize_activations:
        x_codes, x_scales = x.new_empty((m, k), dtype=torch.int8), x.new_empty((m,), dtype=torch.float32)
    else:
        x_codes, x_scales = _empty(x, torch.int8), _empty(x, torch.float32)
    w_codes = weight.new_empty((n, k), dtype=torch.int8)
    w_scales = weight.new_empty((n, num_groups(k, group_size)), dtype=torch.float32)
    return y, x_codes, x_scales, w_codes, w_scales


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
    _check_precision(precision)
    impl = get_kernel(kernel)
    args = (grad_out, saved_x, x_scales, w_codes, w_scales, group_size, need_grad_input, need_grad_weight, need_grad_bias)
    if precision != "fp32" and precision in getattr(impl, "BACKWARD_PRECISIONS", ()):
        gi, gw, gb = impl.ternary_linear_backward(*args, precision=precision, grad_input_dtype=input_dtype)
    else:
        gi, gw, gb = impl.ternary_linear_backward(*args)
    return (
        gi.to(input_dtype) if gi is not None else _empty(grad_out, input_dtype),
        gw.to(weight_dtype) if gw is not None else _empty(grad_out, weight_dtype),
        gb.to(grad_out.dtype) if gb is not None else _empty(grad_out, grad_out.dtype),
    )


@ternary_linear_backward.register_fake
def _ternary_linear_backward_fake(
    grad_out, saved_x, x_scales, w_codes, w_scales, group_size, input_dtype, weight_dtype,
    need_grad_input, need_grad_weight, need_grad_bias, kernel, precision="fp32",
):  # fmt: skip
    _check_precision(precision)
    m, n = grad_out.shape
    k = w_codes.shape[1]
    gi = grad_out.new_empty((m, k), dtype=input_dtype) if need_grad_input else _empty(grad_out, input_dtype)
    gw = grad_out.new_empty((n, k), dtype=weight_dtype) if need_grad_weight else _empty(grad_out, weight_dtype)
    gb = grad_out.new_empty((n,)) if need_grad_bias else _empty(grad_out, grad_out.dtype)
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


def _check_packed(x: Tensor, packed: Tensor, scales: Tensor, bias: Optional[Tensor], in_features: int, group_size: int) -> None:
    from bitcompile.kernels.packing import packed_shape

    check_group_code(group_size)
    out_features = packed.shape[0] if packed.dim() == 2 else -1
    if packed.dtype != torch.uint8 or tuple(packed.shape) != packed_shape(out_features, in_features):
        raise ValueError(
            f"bitcpm::ternary_linear_packed: packed weight must be uint8 {packed_shape(max(out_features, 0), in_features)} "
            f"for in_features={in_features}, got {packed.dtype} {tuple(packed.shape)}"
        )
    if scales.dtype != torch.float32 or tuple(scales.shape) != (out_features, num_groups(in_features, group_size)):
        raise ValueError(
            f"bitcpm::ternary_linear_packed: scales must be float32 ({out_features}, "
            f"{num_groups(in_features, group_size)}), got {scales.dtype} {tuple(scales.shape)}"
        )
    if x.shape[-1] != in_features:
        raise ValueError(f"bitcpm::ternary_linear_packed: input's last dim {x.shape[-1]} != in_features {in_features}")
    if not x.is_floating_point():
        raise TypeError(f"bitcpm::ternary_linear_packed: input must be floating point, got {x.dtype}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bitcpm::ternary_linear_packed: bias shape {tuple(bias.shape)} != ({out_features},)")


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
    _check_packed(x, packed, scales, bias, in_features, group_size)
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
    _check_packed(x, packed, scales, bias, in_features, group_size)
    prepared = _PREPARED_CALLS[packed] = cpu.PreparedPackedLinear(packed, scales, in_features, group_size, bias)
    return prepared


@ternary_linear_packed.register_fake
def _ternary_linear_packed_fake(x, packed, scales, bias, in_features, group_size, quantize_activations, kernel):
    _check_packed(x, packed, scales, bias, in_features, group_size)
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _packed_setup_context(ctx, inputs, output):
    x, packed, scales, bias, in_features, group_size, _quantize_activations, _kernel = inputs
    ctx.save_for_backward(packed, scales)
    ctx.in_features, ctx.group_size, ctx.x_dtype = in_features, group_size, x.dtype


def _packed_backward(ctx, grad_out):
    """Gradients for adapters trained on a packed base (LoRA style): the packed weights are
    constants, the activation quantizer is the identity (the STE, DESIGN.md §3), so
    ``grad_x = g @ (codes * scales)`` in fp32 and ``grad_bias = sum g``."""
    from bitcompile.kernels.packing import unpack_codes

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


@torch.library.custom_op("bitcpm::float_gemv_linear", mutates_args=())
def float_gemv_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear`` in fp32 on bitcompile's multi-threaded GEMV for at most ``DENSE_MAX_M``
    tokens (torch's otherwise): the float head a packed model keeps (``FloatGemvLinear``)."""
    return float_gemv(x, weight, bias)


def float_gemv(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The op's computation, callable without the dispatcher (eager ``FloatGemvLinear``)."""
    from bitcompile.kernels import cpu

    if weight.numel() == 0:  # a 0-feature layer: reshape(-1, 0) is ambiguous and there is no GEMV to run
        return torch.nn.functional.linear(x, weight, bias)
    y = cpu.dense_linear(x.reshape(-1, weight.shape[1]), weight, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@float_gemv_linear.register_fake
def _float_gemv_linear_fake(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
