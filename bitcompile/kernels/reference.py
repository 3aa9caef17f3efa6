"""Pure-PyTorch ternary kernels: the executable form of DESIGN.md §3.

Every faster kernel (C, CANN) is tested against these functions, so they favour being
obviously right over being fast: scales in fp32, integer dot products accumulated exactly
(fp32 is exact for ``K * 127 < 2**24``; beyond that we accumulate in fp64), group partial
sums scaled before they are added.

Shapes: weight ``(N, K)``, activations flattened to ``(M, K)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bitcompile.kernels.groups import EPS, PER_TENSOR, check_group_code, expand_scales

#: backward_precision values ternary_linear_backward honours (kernels.contract.TernaryKernels).
BACKWARD_PRECISIONS: tuple[str, ...] = ("fp32",)

# Largest K for which an fp32 sum of K products of magnitude <= 127 stays an exact integer.
_FP32_EXACT_K = (1 << 24) // 127


def quantize_weight(weight: Tensor, group_code: int) -> tuple[Tensor, Tensor]:
    """Absmean ternary quantization: ``codes`` int8 in {-1, 0, 1} ``(N, K)``, ``scales`` fp32 ``(N, n_groups)``."""
    check_group_code(group_code)
    w = weight.detach().float()
    n, k = w.shape
    absw = w.abs()
    if group_code == PER_TENSOR:
        scales = absw.mean().clamp_min(EPS).expand(n, 1).contiguous()
    elif group_code < 0:
        scales = absw.mean(dim=1, keepdim=True).clamp_min(EPS)
    else:
        full = (k // group_code) * group_code
        parts = []
        if full:
            parts.append(absw[:, :full].reshape(n, full // group_code, group_code).mean(dim=2))
        if full < k:
            parts.append(absw[:, full:].mean(dim=1, keepdim=True))
        scales = torch.cat(parts, dim=1).clamp_min(EPS)
    return ternary_codes(w, scales, group_code), scales


def ternary_codes(weight: Tensor, scales: Tensor, group_code: int) -> Tensor:
    """The ternary codes of ``weight`` ``(N, K)`` under given fp32 ``scales`` ``(N, n_groups)``: int8 in {-1, 0, 1}.

    :func:`quantize_weight` computes the scales from the weight itself; callers whose scale comes
    from elsewhere (a precomputed global absmean) round with this same formula.
    """
    w = weight.detach().float()
    return torch.clamp(torch.round(w / expand_scales(scales, w.shape[1], group_code)), -1, 1).to(torch.int8)


def dequantize_weight(codes: Tensor, scales: Tensor, group_code: int) -> Tensor:
    """``W_q = codes * scales`` as an fp32 ``(N, K)`` matrix."""
    return codes.float() * expand_scales(scales, codes.shape[1], group_code)


def quantize_activations(x2d: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token absmax int8: ``codes`` int8 ``(M, K)``, ``scales`` fp32 ``(M,)``.

    A token holding a NaN or an inf has a NaN or inf scale; its codes are all 0 (``x / s`` is
    NaN or 0 there, and NaN has no int8 value), so every output of that token is NaN
    (``0 * s_w * s_x``), on every kernel and ISA.
    """
    x = x2d.detach().float()
    scales = x.abs().amax(dim=1).clamp_min(EPS) / 127 if x.shape[1] else x.new_full((x.shape[0],), EPS / 127)
    codes = torch.clamp(torch.round(x / scales[:, None]), -128, 127)
    codes = codes.masked_fill_(~torch.isfinite(scales)[:, None], 0).to(torch.int8)
    return codes, scales


def _exact_int_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b.T`` of small integers, exactly, as fp32 (fp64 accumulate when K is huge)."""
    k = a.shape[-1]
    acc_dtype = torch.float32 if k <= _FP32_EXACT_K else torch.float64
    return (a.to(acc_dtype) @ b.to(acc_dtype).transpose(-1, -2)).float()


def _grouped_dot(x_codes: Tensor, w_codes: Tensor, w_scales: Tensor, group_code: int) -> Tensor:
    """``sum_g (x_g @ w_g^T) * s_w[:, g]`` with exact per-group integer partial sums, fp32 ``(M, N)``."""
    m, k = x_codes.shape
    if group_code <= 0:
        return _exact_int_matmul(x_codes, w_codes) * w_scales[:, 0]
    n = w_codes.shape[0]
    out = x_codes.new_zeros((m, n), dtype=torch.float32)
    full = (k // group_code) * group_code
    if full:
        groups = full // group_code
        xg = x_codes[:, :full].reshape(m, groups, group_code).transpose(0, 1)  # (G, M, g)
        wg = w_codes[:, :full].reshape(n, groups, group_code).transpose(0, 1)  # (G, N, g)
        partial = _exact_int_matmul(xg, wg)  # (G, M, N), exact integers
        out += (partial * w_scales[:, :groups].t()[:, None, :]).sum(dim=0)
    if full < k:
        out += _exact_int_matmul(x_codes[:, full:], w_codes[:, full:]) * w_scales[:, -1]
    return out


def int8_ternary_matmul(
    x_codes: Tensor,
    x_scales: Tensor,
    w_codes: Tensor,
    w_scales: Tensor,
    group_code: int,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """W1.58A8 forward: ``y = (q_x @ q_w^T) * s_x[:, None] * s_w (+ bias)`` in ``out_dtype``."""
    y = _grouped_dot(x_codes, w_codes, w_scales, group_code) * x_scales[:, None]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def float_ternary_matmul(
    x2d: Tensor, w_codes: Tensor, w_scales: Tensor, group_code: int, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """Weight-only forward: ``y = x @ W_q^T (+ bias)`` computed in fp32, returned in ``out_dtype``."""
    y = x2d.float() @ dequantize_weight(w_codes, w_scales, group_code).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def ternary_linear_backward(
    grad_out: Tensor,
    saved_x: Tensor,
    x_scales: Tensor | None,
    w_codes: Tensor,
    w_scales: Tensor,
    group_code: int,
    need_grad_input: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Straight-through backward from what the forward saved, all fp32 ``(M, *)``.

    ``saved_x`` is the int8 activation codes (with ``x_scales``) or, weight-only, the
    activations themselves (``x_scales`` is None).
    """
    g = grad_out.float()
    grad_input = g @ dequantize_weight(w_codes, w_scales, group_code) if need_grad_input else None
    grad_weight = None
    if need_grad_weight:
        x = saved_x.float() * x_scales[:, None] if x_scales is not None else saved_x.float()
        grad_weight = g.t() @ x
    grad_bias = g.sum(dim=0) if need_grad_bias else None
    return grad_input, grad_weight, grad_bias


# ---- packed weights (kernels/packing.py layout): unpack, then the functions above ----

_quantize_activations = quantize_activations


def packed_int8_matmul(
    x_codes: Tensor,
    x_scales: Tensor,
    packed: Tensor,
    w_scales: Tensor,
    in_features: int,
    group_code: int,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """W1.58A8 on 2-bit packed weights ``(N, Kp/4) uint8``: :func:`int8_ternary_matmul` of the unpacked codes."""
    from bitcompile.kernels.packing import check_packed_int8_args, unpack_codes

    check_packed_int8_args("packed_int8_matmul", x_codes, x_scales, packed, w_scales, in_features, group_code, bias)
    w_codes = unpack_codes(packed, in_features)
    return int8_ternary_matmul(x_codes, x_scales.float(), w_codes, w_scales.float(), group_code, bias, out_dtype)


def packed_float_matmul(
    x2d: Tensor,
    packed: Tensor,
    w_scales: Tensor,
    in_features: int,
    group_code: int,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """Weight-only forward on 2-bit packed weights: :func:`float_ternary_matmul` of the unpacked codes."""
    from bitcompile.kernels.packing import check_packed_float_args, unpack_codes

    check_packed_float_args("packed_float_matmul", x2d, packed, w_scales, in_features, group_code, bias)
    w_codes = unpack_codes(packed, in_features)
    return float_ternary_matmul(x2d, w_codes, w_scales.float(), group_code, bias, out_dtype)


def packed_linear(
    x2d: Tensor,
    packed: Tensor,
    w_scales: Tensor,
    in_features: int,
    group_code: int,
    bias: Tensor | None,
    quantize_activations: bool,
    out_dtype: torch.dtype,
) -> Tensor:
    """Serving forward from float activations: per-token int8 quantization (when asked) + packed matmul."""
    if quantize_activations:
        x_codes, x_scales = _quantize_activations(x2d)
        return packed_int8_matmul(x_codes, x_scales, packed, w_scales, in_features, group_code, bias, out_dtype)
    return packed_float_matmul(x2d, packed, w_scales, in_features, group_code, bias, out_dtype)


# ---- int8 (W8A8) dense layers: the opt-in int8 lm_head of a packed model ----


def quantize_rows_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row absmax int8: ``codes`` int8 ``(N, K)`` in [-127, 127], ``scales`` fp32 ``(N, 1)``
    with ``weight ~ codes * scales`` (error at most half a step, ``scales / 2``, per element)."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1, keepdim=True) if w.shape[1] else w.new_zeros((w.shape[0], 1))).clamp_min(EPS) / 127
    codes = torch.clamp(torch.round(w / scales), -127, 127).to(torch.int8)
    return codes, scales


def int8_dense_linear(x2d: Tensor, w_codes: Tensor, w_scales: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """W8A8: ``(q_x @ q_w^T) * s_w * s_x (+ bias)`` with the per-token activation quantizer
    (:func:`quantize_activations`); the integer sums are exact (fp64), then rounded to fp32 once."""
    x_codes, x_scales = quantize_activations(x2d)
    dot = (x_codes.double() @ w_codes.double().t()).float()
    y = dot * w_scales[:, 0].float() * x_scales[:, None]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
