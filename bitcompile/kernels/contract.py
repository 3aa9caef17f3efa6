"""The kernel contract: what every target's kernels implement (``reference`` defines the numerics).

A kernel set is usually a module (:mod:`~bitcompile.kernels.reference`,
:mod:`bitcompile.kernels.cpu`, :mod:`~bitcompile.kernels.cann`); modules satisfy a
:class:`typing.Protocol` structurally (PEP 544), so nothing inherits from
:class:`TernaryKernels`. ``group_code`` is -1 per row, 0 per tensor, g > 0 groups of g along K
(:mod:`~bitcompile.kernels.groups`). Every implementation is checked against the reference
by tests/test_kernel_conformance.py, parametrized over the target registry.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

#: The functions of the contract, in the order docs/architecture.md lists them.
KERNEL_FUNCTIONS = (
    "quantize_weight", "dequantize_weight", "quantize_activations", "int8_ternary_matmul", "float_ternary_matmul",
    "ternary_linear_backward", "packed_int8_matmul", "packed_float_matmul", "packed_linear",
)  # fmt: skip


@runtime_checkable
class TernaryKernels(Protocol):
    """The functions behind the ``bitcpm`` ops, and what the implementation can do.

    Attributes:
        BACKWARD_PRECISIONS: the ``backward_precision`` values :meth:`ternary_linear_backward`
            honours. ``("fp32",)`` for the reference numerics; a kernel that lists more also
            takes ``precision=`` and ``grad_input_dtype=`` (the dtype grad_input may be
            written in directly). Other precisions run the fp32 backward.
    """

    BACKWARD_PRECISIONS: tuple[str, ...]

    def quantize_weight(self, weight: Tensor, group_code: int) -> tuple[Tensor, Tensor]:
        """Absmean ternary codes int8 ``(N, K)`` in {-1, 0, 1} and fp32 scales ``(N, n_groups)``."""
        ...

    def dequantize_weight(self, codes: Tensor, scales: Tensor, group_code: int) -> Tensor:
        """``codes * scales`` (scales broadcast over their groups), fp32 ``(N, K)``."""
        ...

    def quantize_activations(self, x2d: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token absmax int8 codes ``(M, K)`` and fp32 scales ``(M,)``."""
        ...

    def int8_ternary_matmul(
        self, x_codes: Tensor, x_scales: Tensor, w_codes: Tensor, w_scales: Tensor, group_code: int,
        bias: Tensor | None, out_dtype: torch.dtype,
    ) -> Tensor:  # fmt: skip
        """Training forward W1.58A8: ``(q_x @ q_w^T) * s_x * s_w (+ bias)``, ``(M, N)`` of ``out_dtype``."""
        ...

    def float_ternary_matmul(
        self, x2d: Tensor, w_codes: Tensor, w_scales: Tensor, group_code: int, bias: Tensor | None,
        out_dtype: torch.dtype,
    ) -> Tensor:  # fmt: skip
        """Training forward, weight-only: ``x @ (q_w * s_w)^T (+ bias)``."""
        ...

    def ternary_linear_backward(
        self, grad_out: Tensor, saved_x: Tensor, x_scales: Tensor | None, w_codes: Tensor, w_scales: Tensor,
        group_code: int, need_grad_input: bool, need_grad_weight: bool, need_grad_bias: bool,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
        """Straight-through backward: (grad_input, grad_weight, grad_bias), None where not needed."""
        ...

    def packed_int8_matmul(
        self, x_codes: Tensor, x_scales: Tensor, packed: Tensor, w_scales: Tensor, in_features: int, group_code: int,
        bias: Tensor | None, out_dtype: torch.dtype,
    ) -> Tensor:  # fmt: skip
        """Serving W1.58A8 from int8 activations and 2-bit packed weights (:mod:`~bitcompile.kernels.packing`)."""
        ...

    def packed_float_matmul(
        self, x2d: Tensor, packed: Tensor, w_scales: Tensor, in_features: int, group_code: int, bias: Tensor | None,
        out_dtype: torch.dtype,
    ) -> Tensor:  # fmt: skip
        """Serving weight-only from 2-bit packed weights."""
        ...

    def packed_linear(
        self, x2d: Tensor, packed: Tensor, w_scales: Tensor, in_features: int, group_code: int, bias: Tensor | None,
        quantize_activations: bool, out_dtype: torch.dtype,
    ) -> Tensor:  # fmt: skip
        """Serving from float activations (the per-token quantization may be fused into the GEMM)."""
        ...


def missing_functions(kernels: object) -> list[str]:
    """The contract's members ``kernels`` lacks (empty when it implements :class:`TernaryKernels`)."""
    return [name for name in (*KERNEL_FUNCTIONS, "BACKWARD_PRECISIONS") if not hasattr(kernels, name)]
