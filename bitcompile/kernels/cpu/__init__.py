"""Fast ternary CPU kernels: C (AVX-512 VNNI / AVX2 / portable), same interface as ``reference``.

Why: ternary weights only pay off when a kernel reads 2 bits per weight and multiplies
them as integers (BitNet b1.58, arXiv:2402.17764; bitnet.cpp, arXiv:2410.16144). The C
code in ``csrc/`` is loaded with ctypes by :mod:`.library`; without it every function here
falls back to :mod:`~bitcompile.kernels.reference` and :func:`available` returns False (a
warning says so once). Threads split the output features; their number is
``torch.get_num_threads()``.

This package is the ``cpu`` target's :class:`~bitcompile.kernels.contract.TernaryKernels`:

- :mod:`.library`: loading, the ABI check of the ctypes structs, the ISA choice;
- :mod:`.passes`: the C passes between the GEMMs (scaling, quantization, 2-bit packing);
- :mod:`.gemm`: the packed GEMMs and the training forward;
- :mod:`.backward`: the backward in ``fp32`` / ``bf16`` / ``int8`` (``backward_precision``);
- :mod:`.serving`: :class:`PreparedPackedLinear` and the small-M dense layers (eager decode).
"""

from __future__ import annotations

from bitcompile.kernels import reference
from bitcompile.kernels.cpu.backward import BACKWARD_PRECISIONS, ternary_linear_backward
from bitcompile.kernels.cpu.gemm import (
    DECODE_TILE_ROWS,
    ONEDNN_MIN_TOKENS,
    int8_ternary_matmul,
    packed_float_matmul,
    packed_int8_matmul,
    packed_linear,
)
from bitcompile.kernels.cpu.library import (
    ISA_NAMES,
    available,
    handle,
    isa,
    isa_supported,
    kernel_isa,
    unavailable_reason,
)
from bitcompile.kernels.cpu.passes import int_mm, pack_codes, quantize_activations, quantize_weight, scale_rows
from bitcompile.kernels.cpu.serving import (
    DENSE_MAX_M,
    PreparedPackedLinear,
    can_prepare,
    dense_linear,
    int8_dense_linear,
    tensor_state,
)

# The training path shares these with the reference (DESIGN.md §3: same numerics).
dequantize_weight = reference.dequantize_weight
float_ternary_matmul = reference.float_ternary_matmul

__all__ = [
    "BACKWARD_PRECISIONS", "DECODE_TILE_ROWS", "DENSE_MAX_M", "ISA_NAMES", "ONEDNN_MIN_TOKENS", "PreparedPackedLinear",
    "available", "can_prepare", "dense_linear", "dequantize_weight", "float_ternary_matmul", "handle",
    "int8_dense_linear", "int8_ternary_matmul", "int_mm", "isa", "isa_supported", "kernel_isa", "pack_codes",
    "packed_float_matmul", "packed_int8_matmul", "packed_linear", "quantize_activations", "quantize_weight",
    "scale_rows", "tensor_state", "ternary_linear_backward", "unavailable_reason",
]  # fmt: skip
