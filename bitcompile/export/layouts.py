"""Converters from the canonical packed layout (``bc_i2_planar256_t64`` v2) to ONNX weight layouts.

Both targets store one 2-bit code per weight and one scale per *block* of ``block_size``
consecutive k (DESIGN.md §4, §6; reference/onnx_export.md §1-2 has the measured layouts):

* ``com.microsoft::MatMulNBits`` (``bits=2``, no zero point, so zero point 2): B is uint8
  ``(N, ceil(K/bs), bs/4)`` in the torch ``(out, in)`` order, code ``w + 2``, four codes per
  byte with the lowest k in the lowest bits; scales ``(N, ceil(K/bs))``.
* ``DequantizeLinear`` (opset 25) on ``INT2``: weight ``(K, N)`` (the MatMul's B operand,
  which onnxruntime fuses; ``(N, K)`` + Transpose is never fused), two's-complement codes
  ``w``, blocked along axis 0; scales ``(ceil(K/bs), N)``.

A block never straddles two scale groups: ``block_size`` divides the group size, or the
layer has one scale per row (per-row and per-tensor scales are repeated in every block).
A K that is not a multiple of ``block_size`` ends with a short block; MatMulNBits reads a
whole blob, so its tail is padded with the zero code (``w = 0``), which changes nothing.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from bitcompile.kernels.groups import PER_ROW, PER_TENSOR, ScaleGroups

#: Block sizes MatMulNBits runs fast with ``bits=2, accuracy_level=4`` (measured; 16 and 256
#: fall back to a kernel about 100x slower), best first.
FAST_BLOCK_SIZES = (128, 64, 32)


def block_size_for(group_code: int) -> int | None:
    """The MatMulNBits / DequantizeLinear block size for a layer's scale grouping, or None.

    Per-row and per-tensor scales use 128 (measured fastest for 2-bit); a group size ``g``
    uses the largest of 128, 64, 32 that divides it, so every block lies inside one group.
    None means no fast block size represents the grouping exactly (e.g. ``g = 16`` or 100).
    """
    if group_code in (PER_ROW, PER_TENSOR):
        return FAST_BLOCK_SIZES[0]
    for block_size in FAST_BLOCK_SIZES:
        if group_code % block_size == 0:
            return block_size
    return None


def unsupported_reason(group_code: int) -> str:
    return (
        f"{ScaleGroups.from_code(group_code).label} scales: no MatMulNBits block size in {FAST_BLOCK_SIZES} divides the group "
        "(other block sizes run a kernel about 100x slower than fp32)"
    )


def blocked_scales(scales: Tensor, in_features: int, group_code: int, block_size: int) -> Tensor:
    """``(N, n_groups)`` fp32 multipliers → ``(N, ceil(K / block_size))``, one per block."""
    n_blocks = -(-in_features // block_size)
    if group_code in (PER_ROW, PER_TENSOR):
        return scales[:, :1].expand(scales.shape[0], n_blocks).contiguous()
    if group_code % block_size:
        raise ValueError(f"block_size {block_size} does not divide the group size {group_code}")
    group_of_block = torch.arange(n_blocks) * block_size // group_code
    return scales[:, group_of_block].contiguous()


def to_matmulnbits(
    codes: Tensor, scales: Tensor, group_code: int, block_size: int, dtype: torch.dtype = torch.float32
) -> tuple[np.ndarray, np.ndarray]:
    """Ternary codes (int8 ``(N, K)`` in {-1, 0, 1}) + scales → MatMulNBits ``B`` and ``scales``.

    Returns:
        ``B`` uint8 ``(N, ceil(K/bs), bs/4)`` and ``scales`` ``(N, ceil(K/bs))`` in ``dtype``
        (MatMulNBits requires the scales in the input's dtype).
    """
    if block_size % 4 or block_size < 16:
        raise ValueError(f"block_size must be a multiple of 4 and >= 16, got {block_size}")
    n, k = codes.shape
    n_blocks = -(-k // block_size)
    c = torch.full((n, n_blocks * block_size), 2, dtype=torch.uint8)  # pad with the zero weight (code 2)
    c[:, :k] = (codes.to(torch.int16) + 2).to(torch.uint8)
    c = c.view(n, n_blocks, block_size // 4, 4)  # 4 consecutive k per byte, lowest k in bits 0-1
    blob = c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)
    block_scales = blocked_scales(scales.float(), k, group_code, block_size).to(dtype)
    return blob.contiguous().numpy(), block_scales.numpy()


def to_int2_dequantize_linear(
    codes: Tensor, scales: Tensor, group_code: int, block_size: int, dtype: torch.dtype = torch.float32
) -> tuple[np.ndarray, np.ndarray]:
    """Ternary codes + scales → ``DequantizeLinear`` INT2 weight ``(K, N)`` and blocked scales ``(ceil(K/bs), N)``.

    The weight is an ``ml_dtypes.int2`` array (onnx_ir writes it packed, four per byte, low
    bits first, two's complement).
    """
    import ml_dtypes

    k = codes.shape[1]
    weight = codes.t().contiguous().numpy().astype(ml_dtypes.int2)
    block_scales = blocked_scales(scales.float(), k, group_code, block_size).t().contiguous().to(dtype)
    return weight, block_scales.numpy()
