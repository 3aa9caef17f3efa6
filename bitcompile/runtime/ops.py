"""The ``bitcpm::`` ops' old home; they live in :mod:`bitcompile.ops` (importing this still registers them).

Kept for BC (``from bitcompile.runtime.ops import ternary_linear_output`` and the like);
new code imports :mod:`bitcompile.ops`. Planned removal: 0.3.
"""

from __future__ import annotations

from bitcompile.config import BACKWARD_PRECISIONS
from bitcompile.ops import (
    float_gemv,
    float_gemv_linear,
    prepared_cpu_call,
    save_for_ternary_backward,
    ternary_backward,
    ternary_forward,
    ternary_linear,
    ternary_linear_backward,
    ternary_linear_output,
    ternary_linear_packed,
)

__all__ = [
    "BACKWARD_PRECISIONS",
    "float_gemv",
    "float_gemv_linear",
    "prepared_cpu_call",
    "save_for_ternary_backward",
    "ternary_backward",
    "ternary_forward",
    "ternary_linear",
    "ternary_linear_backward",
    "ternary_linear_output",
    "ternary_linear_packed",
]
