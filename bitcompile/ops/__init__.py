"""Every ``bitcpm::`` custom op, with its fake impl and autograd formula; importing this package registers them all.

================================  ==================================================================
op                                module
================================  ==================================================================
``ternary_linear``                :mod:`bitcompile.ops.training` (the QAT forward, five outputs)
``ternary_linear_backward``       :mod:`bitcompile.ops.training` (fused straight-through backward)
``ternary_linear_prescaled``      :mod:`bitcompile.ops.prescaled` (per-tensor, scale given)
``tensor_scale_marker``           :mod:`bitcompile.ops.prescaled` (ties a weight to its scale buffer)
``ternary_linear_sharded``        :mod:`bitcompile.ops.sharded` (tensor parallelism: scales given, DTensor rules)
``ternary_linear_packed``         :mod:`bitcompile.ops.packed` (serving on 2-bit weights)
``float_gemv_linear``             :mod:`bitcompile.ops.dense` (the fp32 head a packed model keeps)
``int8_dense_linear``             :mod:`bitcompile.ops.dense` (the W8A8 head of ``pack(head="int8")``)
``ternary_experts_linear``        :mod:`bitcompile.ops.experts` (MoE experts ``(E, N, K)``, routed rows;
                                  ``ternary_experts_linear_backward``: its fused straight-through backward)
================================  ==================================================================

The ops hold no numerics of their own: they check arguments (:mod:`bitcompile.ops.checks`)
and call the kernel module named by their ``kernel`` argument (``bitcompile.kernels``).
"""

from __future__ import annotations

from bitcompile.ops.checks import check_linear_args, check_packed_linear_args, check_precision, empty_output
from bitcompile.ops.dense import float_gemv, float_gemv_linear, int8_dense_linear_op, int8_linear
from bitcompile.ops.experts import expert_rows, quantize_experts, ternary_experts_linear
from bitcompile.ops.packed import prepared_cpu_call, ternary_linear_packed
from bitcompile.ops.prescaled import quantize_weight_with_scale, tensor_scale_marker, ternary_linear_prescaled
from bitcompile.ops.sharded import quantize_activations_with_absmax, register_dtensor_rules, ternary_linear_sharded
from bitcompile.ops.training import (
    save_for_ternary_backward,
    ternary_backward,
    ternary_forward,
    ternary_linear,
    ternary_linear_backward,
    ternary_linear_output,
    ternary_outputs_like,
)

__all__ = [
    "check_linear_args",
    "check_packed_linear_args",
    "check_precision",
    "empty_output",
    "expert_rows",
    "float_gemv",
    "float_gemv_linear",
    "int8_dense_linear_op",
    "int8_linear",
    "prepared_cpu_call",
    "quantize_activations_with_absmax",
    "quantize_experts",
    "quantize_weight_with_scale",
    "register_dtensor_rules",
    "save_for_ternary_backward",
    "tensor_scale_marker",
    "ternary_experts_linear",
    "ternary_backward",
    "ternary_forward",
    "ternary_linear",
    "ternary_linear_backward",
    "ternary_linear_output",
    "ternary_linear_packed",
    "ternary_linear_prescaled",
    "ternary_linear_sharded",
    "ternary_outputs_like",
]
