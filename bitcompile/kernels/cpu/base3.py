"""Packed GEMMs on the 1.6-bit layout (:mod:`bitcompile.kernels.packing_base3`).

The same contract and numerics as :func:`bitcompile.kernels.cpu.gemm.packed_linear` on the
2-bit layout: the same per-token int8 activations, the same exact int32 sums and the same
order of float roundings, so a layer gives bit-identical outputs in either layout.
W1.58A8 with per-row / per-tensor scales runs the AVX-512 VBMI kernel (``csrc/bc_t5.c``);
groups, weight-only activations and CPUs without VBMI run the portable C kernel.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from bitcompile.kernels import packing, packing_base3, reference
from bitcompile.kernels.cpu import library
from bitcompile.kernels.cpu.library import LAYOUT_T5, GemmArgs, is_degenerate, on_cpu, ptr, threads
from bitcompile.kernels.cpu.passes import out_buffer, prepare_activations
from bitcompile.kernels.groups import check_group_code, num_groups

__all__ = ["check_base3_args", "packed_linear_base3", "plan_base3"]


def check_base3_args(
    where: str, x: Tensor, packed: Tensor, w_scales: Tensor, in_features: int, group_code: int, bias: Tensor | None
) -> None:
    """Validate a 1.6-bit packed call's arguments; raise ValueError/TypeError naming the problem."""
    check_group_code(group_code)
    name = f"{packing_base3.LAYOUT_NAME} v{packing_base3.LAYOUT_VERSION}"
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        got = f"{packed.dtype} of shape {tuple(packed.shape)}" if isinstance(packed, Tensor) else type(packed).__name__
        raise TypeError(f"{where}: packed must be a 2-D uint8 tensor ({name}), got {got}")
    n, row_bytes = packing_base3.packed_shape(packed.shape[0], in_features)
    if packed.shape[1] != row_bytes:
        raise ValueError(
            f"{where}: packed has {packed.shape[1]} bytes per row, in_features={in_features} needs {row_bytes} "
            f"({name} pads K to a multiple of {packing_base3.BLOCK_K})"
        )
    packing.check_operands(where, x, n, w_scales, in_features, group_code, bias)


def plan_base3(isa_id: int, group_code: int, kp: int) -> tuple[int, int]:
    """``(ISA whose 1.6-bit int8 kernel runs, its flush unit in 64-k chunks)``."""
    uc = ctypes.c_int()
    run_isa = library.LIB.bc_plan_t5_i8(isa_id, group_code, kp, ctypes.byref(uc))
    return run_isa, uc.value


def kernel_isa_base3(group_code: int, activations: str = "int8") -> str:
    """ISA of the 1.6-bit kernel that runs for this group mode ("reference" without the C kernels)."""
    if library.LIB is None:
        return "reference"
    if activations != "int8":
        return "scalar"
    return library.ISA_BY_ID[plan_base3(library.isa_id(), group_code, packing_base3.BLOCK_K)[0]]


def packed_linear_base3(
    x2d: Tensor,
    packed: Tensor,
    w_scales: Tensor,
    in_features: int,
    group_code: int,
    bias: Tensor | None,
    quantize_activations: bool,
    out_dtype: torch.dtype,
) -> Tensor:
    """``y = x @ (codes * scales)^T (+ bias)`` from 1.6-bit packed weights, ``(M, N)`` of ``out_dtype``.

    Args:
        x2d (Tensor, M x K): fp32 / bf16 activations (other float dtypes run the reference).
        packed (Tensor[uint8], N x Kp/5): :func:`packing_base3.pack_codes` output.
        w_scales (Tensor[fp32], N x n_groups), group_code: -1 per row, 0 per tensor, g > 0.
        quantize_activations: W1.58A8 (per-token int8) when True, weight-only fp32 otherwise.

    Returns:
        the 2-bit kernels' result for the same codes, bit for bit.
    """
    check_base3_args("packed_linear_base3", x2d, packed, w_scales, in_features, group_code, bias)
    m, n, k = x2d.shape[0], packed.shape[0], in_features
    if (
        library.handle() is None
        or is_degenerate(m, n, k)
        or not on_cpu(x2d, packed)
        or x2d.dtype not in (torch.float32, torch.bfloat16)
    ):
        codes = packing_base3.unpack_codes(packed, in_features)
        if quantize_activations:
            xq, sx = reference.quantize_activations(x2d)
            return reference.int8_ternary_matmul(xq, sx, codes, w_scales.float(), group_code, bias, out_dtype)
        return reference.float_ternary_matmul(x2d, codes, w_scales.float(), group_code, bias, out_dtype)
    x = x2d.detach()
    if x.stride(-1) != 1:
        x = x.contiguous()
    kp = packing_base3.padded_in_features(k)
    sw = w_scales.float().contiguous()
    b = bias.float().contiguous() if bias is not None else None
    y, bf16 = out_buffer(m, n, out_dtype)
    w = packed.contiguous()
    if quantize_activations:
        run_isa, uc = plan_base3(library.isa_id(), group_code, kp)
        xq, sx, corr, n_units = prepare_activations(x, 0 if x.dtype == torch.float32 else 1, k, kp, run_isa, uc if run_isa else None)
        a = GemmArgs(
            m, n, k, kp, group_code, num_groups(k, group_code), ptr(xq), ptr(sx), ptr(corr), uc, n_units,
            None, 0, ptr(w), ptr(sw), ptr(b), ptr(y), n, bf16, 0, LAYOUT_T5,
        )  # fmt: skip
        library.LIB.bc_gemm_i8(ctypes.byref(a), run_isa, threads())
    else:
        xf = x.float()
        a = GemmArgs(
            m, n, k, kp, group_code, num_groups(k, group_code), None, None, None, 1, 0,
            ptr(xf), xf.stride(0), ptr(w), ptr(sw), ptr(b), ptr(y), n, bf16, 0, LAYOUT_T5,
        )  # fmt: skip
        library.LIB.bc_gemm_f32(ctypes.byref(a), 0, threads())
    return y if y.dtype == out_dtype else y.to(out_dtype)
