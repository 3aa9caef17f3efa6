"""Argument checks and empty outputs shared by the ``bitcpm::`` ops and their fake impls.

A real op and its fake impl must reject the same arguments with the same message, or a
mistake would surface differently compiled and eager; both call these.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bitcompile.config import BACKWARD_PRECISIONS
from bitcompile.kernels.groups import check_group_code, num_groups
from bitcompile.kernels.packing import packed_shape


def empty_output(like: Tensor, dtype: torch.dtype) -> Tensor:
    """A 0-element tensor on ``like``'s device: the placeholder for an output an op does not compute."""
    return like.new_empty((0,), dtype=dtype)


def check_precision(precision: str) -> None:
    """Raise ``ValueError`` unless ``precision`` is one of :data:`BACKWARD_PRECISIONS`."""
    if precision not in BACKWARD_PRECISIONS:
        raise ValueError(f"bitcpm: backward precision {precision!r} is not one of {', '.join(BACKWARD_PRECISIONS)}")


def check_linear_args(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    """Shapes and dtypes of a training op's ``(x (..., K), weight (N, K), bias (N,))``."""
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


def check_packed_linear_args(
    x: Tensor, packed: Tensor, scales: Tensor, bias: Optional[Tensor], in_features: int, group_size: int
) -> None:
    """Shapes and dtypes of ``bitcpm::ternary_linear_packed``'s arguments (canonical 2-bit layout)."""
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
