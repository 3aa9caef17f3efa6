"""The precomputed-scale ops' old home, kept for BC (planned removal: 0.3).

The ops live in :mod:`bitcompile.ops.prescaled`, their graph pass in
:mod:`bitcompile.passes.precomputed_scales`.
"""

from __future__ import annotations

from bitcompile.ops.prescaled import quantize_weight_with_scale, tensor_scale_marker, ternary_linear_prescaled
from bitcompile.passes.precomputed_scales import emit_prescaled, strip_scale_markers

__all__ = [
    "emit_prescaled",
    "quantize_weight_with_scale",
    "strip_scale_markers",
    "tensor_scale_marker",
    "ternary_linear_prescaled",
]
