"""The packed ternary GEMMs: W1.58A8 and weight-only, from float or int8 activations.

Training (``int8_ternary_matmul``) runs on ``torch._int_mm`` for per-row / per-tensor scales
(exact int32, VNNI inside oneDNN) and on the packed C kernel for groups.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from bitcompile.kernels import reference
from bitcompile.kernels.cpu import library
from bitcompile.kernels.cpu.library import GemmArgs, is_degenerate, on_cpu, ptr, threads
from bitcompile.kernels.cpu.passes import (
    EW_SCALE,
    EW_UNPACK,
    elementwise,
    int_mm,
    out_buffer,
    pack_codes,
    prepare_activations,
    quantize_activations,
    scale_rows,
)
from bitcompile.kernels.groups import PER_TENSOR, check_group_code, num_groups
from bitcompile.kernels.packing import check_packed_float_args, check_packed_int8_args, padded_in_features

# NOTE: from this many tokens on, per-row / per-tensor scales, the packed path decodes the
# 2-bit weights tile by tile into int8 and runs oneDNN's int8 GEMM (torch._int_mm) on each
# tile: our VNNI microkernel reaches ~330 G int8 MAC/s per core where oneDNN reaches ~410, and
# at large M the decode (one pass writing K bytes per weight row) is amortized. Measured
# (docs/kernels.md, VNNI time / this path's, T = 1 and 2, K x N = 4096^2 and 11008 x 4096):
# M = 512 0.91-1.06, M = 1024 1.02-1.18, M = 2048 1.11-1.28; M <= 256 slower.
ONEDNN_MIN_TOKENS = 1024


# weight rows decoded per tile (one int8 buffer, reused): each tile re-reads the activations,
# the whole matrix at once left L3 (M = 2048, K = N = 4096: 1024 rows 73 ms, all 4096 95 ms;
# 256-2048 rows within 10 % of each other at K = 4096 and 11008)
DECODE_TILE_ROWS = 1024


def packed_int8_onednn(x: Tensor, kind: int, x_scales: Tensor | None, packed, w_scales, k, bias, y: Tensor) -> Tensor:
    """Large-M per-row / per-tensor W1.58A8 into ``y`` (M, N) fp32/bf16: decoded weight tiles x
    ``torch._int_mm``, scaled in the kernels' order of roundings (bit-identical with the packed
    C kernel)."""
    xq, sx = (x, x_scales) if kind == 2 else quantize_activations(x)
    n = packed.shape[0]
    rows = min(n, DECODE_TILE_ROWS)
    tile = torch.empty((rows, k), dtype=torch.int8)
    sw = w_scales[:, 0].float().contiguous()
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        w8 = elementwise(EW_UNPACK, packed[n0:n1], tile[: n1 - n0])
        acc = int_mm(xq, w8.t())
        elementwise(EW_SCALE, acc, y[:, n0:n1], row=sx, col=sw[n0:n1], bias=None if bias is None else bias[n0:n1])
    return y


def run_packed_int8(x: Tensor, kind: int, x_scales: Tensor | None, packed, w_scales, k, group_code, bias, out_dtype):
    """W1.58A8 from fp32 (``kind`` 0), bf16 (1) or int8 (2, with ``x_scales``) activations: oneDNN
    tiles at large M (per row / per tensor), else the packed C kernel."""
    if group_code <= PER_TENSOR and x.shape[0] >= ONEDNN_MIN_TOKENS:
        y, _ = out_buffer(x.shape[0], packed.shape[0], out_dtype)
        y = packed_int8_onednn(x, kind, x_scales, packed, w_scales, k, bias, y)
        return y if y.dtype == out_dtype else y.to(out_dtype)
    isa_id = library.isa_id()
    kp = padded_in_features(k)
    uc = ctypes.c_int()
    run_isa = library.LIB.bc_plan_i8(isa_id, group_code, kp, ctypes.byref(uc))
    xq, sx, corr, n_units = prepare_activations(x, kind, k, kp, run_isa, uc.value if run_isa != 0 else None)
    if sx is None:
        sx = x_scales.float().contiguous()
    m, n = x.shape[0], packed.shape[0]
    sw = w_scales.float().contiguous()
    b = bias.float().contiguous() if bias is not None else None
    y, bf16 = out_buffer(m, n, out_dtype)
    a = GemmArgs(
        m, n, k, kp, group_code, num_groups(k, group_code), ptr(xq), ptr(sx), ptr(corr), uc.value, n_units,
        None, 0, ptr(packed), ptr(sw), ptr(b), ptr(y), n, bf16,
    )  # fmt: skip
    library.LIB.bc_gemm_i8(ctypes.byref(a), run_isa, threads())
    return y if y.dtype == out_dtype else y.to(out_dtype)


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
    """W1.58A8 serving: ``(q_x @ q_w^T) * s_x * s_w (+ bias)`` from int8 codes and 2-bit packed weights.

    Args:
        x_codes (Tensor[int8], M x K), x_scales (Tensor[fp32], M): per-token activation codes/scales.
        packed (Tensor[uint8], N x Kp/4): :func:`packing.pack_codes` output.
        w_scales (Tensor[fp32], N x n_groups), group_code: -1 per row, 0 per tensor, g > 0.
        bias (Tensor, N) or None; out_dtype: fp32 or bf16 (others are converted from fp32).

    Returns:
        Tensor (M, N) of ``out_dtype``; integer sums exact, equal to :func:`reference.packed_int8_matmul`
        within fp32 rounding (bit-exact for per-row and per-tensor scales).
    """
    check_packed_int8_args("packed_int8_matmul", x_codes, x_scales, packed, w_scales, in_features, group_code, bias)
    if library.handle() is None or is_degenerate(x_codes.shape[0], packed.shape[0], in_features) or not on_cpu(x_codes, packed):
        return reference.packed_int8_matmul(x_codes, x_scales, packed, w_scales, in_features, group_code, bias, out_dtype)
    x = x_codes if x_codes.stride(-1) == 1 else x_codes.contiguous()
    return run_packed_int8(x, 2, x_scales, packed.contiguous(), w_scales, in_features, group_code, bias, out_dtype)


def packed_float_matmul(
    x2d: Tensor,
    packed: Tensor,
    w_scales: Tensor,
    in_features: int,
    group_code: int,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """Weight-only serving: ``x @ (q_w * s_w)^T (+ bias)`` in fp32 from 2-bit packed weights, ``(M, N)``."""
    check_packed_float_args("packed_float_matmul", x2d, packed, w_scales, in_features, group_code, bias)
    if library.handle() is None or is_degenerate(x2d.shape[0], packed.shape[0], in_features) or not on_cpu(x2d, packed):
        return reference.packed_float_matmul(x2d, packed, w_scales, in_features, group_code, bias, out_dtype)
    isa_id = library.LIB.bc_plan_f32(library.isa_id(), group_code)
    x = x2d.float()
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, n, k = x.shape[0], packed.shape[0], in_features
    sw = w_scales.float().contiguous()
    b = bias.float().contiguous() if bias is not None else None
    y, bf16 = out_buffer(m, n, out_dtype)
    a = GemmArgs(
        m, n, k, padded_in_features(k), group_code, num_groups(k, group_code), None, None, None, 1, 0,
        ptr(x), x.stride(0), ptr(packed.contiguous()), ptr(sw), ptr(b), ptr(y), n, bf16,
    )  # fmt: skip
    library.LIB.bc_gemm_f32(ctypes.byref(a), isa_id, threads())
    return y if y.dtype == out_dtype else y.to(out_dtype)


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
    """Serving forward from float activations; with ``quantize_activations`` the per-token int8
    quantization is fused into the kernel's activation-preparation pass (one read of x)."""
    if not quantize_activations:
        return packed_float_matmul(x2d, packed, w_scales, in_features, group_code, bias, out_dtype)
    check_packed_float_args("packed_linear", x2d, packed, w_scales, in_features, group_code, bias)
    if (
        library.handle() is None
        or is_degenerate(x2d.shape[0], packed.shape[0], in_features)
        or not on_cpu(x2d, packed)
        or x2d.dtype not in (torch.float32, torch.bfloat16)
    ):
        return reference.packed_linear(x2d, packed, w_scales, in_features, group_code, bias, True, out_dtype)
    x = x2d.detach()
    if x.stride(-1) != 1:
        x = x.contiguous()
    kind = 0 if x.dtype == torch.float32 else 1
    return run_packed_int8(x, kind, None, packed.contiguous(), w_scales, in_features, group_code, bias, out_dtype)


def int8_ternary_matmul(
    x_codes: Tensor,
    x_scales: Tensor,
    w_codes: Tensor,
    w_scales: Tensor,
    group_code: int,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """Training forward W1.58A8 (same contract as :func:`reference.int8_ternary_matmul`).

    Per-row / per-tensor: ``torch._int_mm(q_x, q_w.t())`` (exact int32; the ``(N, K)`` weight
    passed transposed is oneDNN's fast layout), then the reference's order of scalings, so the
    result is bit-identical. Groups: pack the codes (C, threaded) and run the packed kernel,
    which scales each exact per-group partial sum before adding it.
    """
    check_group_code(group_code)
    m, k = x_codes.shape
    n = w_codes.shape[0]
    if is_degenerate(m, n, k) or not on_cpu(x_codes, w_codes) or x_codes.dtype != torch.int8:
        return reference.int8_ternary_matmul(x_codes, x_scales, w_codes, w_scales, group_code, bias, out_dtype)
    if group_code <= PER_TENSOR:
        acc = int_mm(x_codes.contiguous(), w_codes.to(torch.int8).t())
        # the reference's order of scalings, and the output dtype, in one pass
        return scale_rows(acc, row=x_scales, col=w_scales[:, 0], bias=bias, out_dtype=out_dtype)
    if library.handle() is None:
        return reference.int8_ternary_matmul(x_codes, x_scales, w_codes, w_scales, group_code, bias, out_dtype)
    packed = pack_codes(w_codes.to(torch.int8))
    return packed_int8_matmul(x_codes, x_scales, packed, w_scales, k, group_code, bias, out_dtype)

