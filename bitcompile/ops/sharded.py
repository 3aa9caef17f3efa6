"""The ternary linear for tensor-parallel (DTensor) weights, and the DTensor sharding rules of the bitcpm training ops.

Under ``torch.distributed.tensor.parallel`` a layer's weight reaches the compiled graph as a
DTensor: sharded along N (``ColwiseParallel``, ``Shard(0)``) or along K (``RowwiseParallel``,
``Shard(1)``). DTensor runs an op on each rank's local shard once it knows how the op's
outputs are placed given its inputs' placements: :func:`register_dtensor_rules` tells it for
``bitcpm::ternary_linear_sharded`` and ``bitcpm::ternary_linear_backward``.

A local shard does not always hold what a scale needs:

- column-parallel: a row of W (per-row, per-group scales) and a token's activations are whole
  on every rank: the op quantizes locally, exactly as one process would;
- row-parallel: a row of W and a token's activations are split over K. The per-row absmean
  and the per-token activation absmax therefore come in as *inputs* (``weight_scale``,
  ``x_absmax``), which the graph computes with DTensor reductions before the op:
  ``sum |W|`` over K is a ``Partial(sum)`` and ``max |x|`` a ``Partial(max)``, and the rule
  below asks for them ``Replicate``, so DTensor all-reduces each (one vector all-reduce per
  layer and per forward). Per-group scales are local when no group straddles two shards
  (the graph pass checks it and refuses otherwise);
- per-tensor (either kind): the absmean is a scalar all-reduce of ``sum |W|``.

The op computes the same codes and scales as ``bitcpm::ternary_linear`` on the whole weight
and the whole activation row (the reference formulas of DESIGN.md §3), so a TP run matches a
1-process run up to the order of the fp32 sums.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from torch import Tensor

from bitcompile.kernels import reference
from bitcompile.kernels.groups import EPS, PER_TENSOR, num_groups
from bitcompile.ops.checks import check_linear_args, empty_output
from bitcompile.ops.training import (
    save_for_ternary_backward,
    ternary_backward,
    ternary_outputs_like,
)
from bitcompile.targets import get_kernel


def quantize_activations_with_absmax(x2d: Tensor, absmax: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token int8 codes ``(M, K)`` and scales ``(M,)`` for a given per-token absmax ``(M,)``.

    The formula of ``reference.quantize_activations`` with the absmax taken from outside (the
    max over the whole K when ``x2d`` is one rank's K shard).
    """
    x = x2d.detach().float()
    scales = absmax.detach().float().reshape(-1).clamp_min(EPS) / 127
    codes = torch.clamp(torch.round(x / scales[:, None]), -128, 127)
    codes = codes.masked_fill_(~torch.isfinite(scales)[:, None], 0).to(torch.int8)
    return codes, scales


def _weight_scales(weight: Tensor, weight_scale: Tensor, group_size: int) -> Tensor:
    n = weight.shape[0]
    scale = weight_scale.detach().float().clamp_min(EPS)
    if group_size == PER_TENSOR:
        return scale.reshape(1, 1).expand(n, 1).contiguous()
    return scale.reshape(n, num_groups(weight.shape[1], group_size)).contiguous()


@torch.library.custom_op("bitcpm::ternary_linear_sharded", mutates_args=())
def ternary_linear_sharded(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    weight_scale: Optional[Tensor],
    x_absmax: Optional[Tensor],
    group_size: int,
    quantize_activations: bool,
    kernel: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``bitcpm::ternary_linear`` whose weight scales and activation absmax may be given.

    Args:
        weight_scale: ``None`` (quantize from ``weight``, as ``ternary_linear``), a one-element
            per-tensor absmean, or the per-row / per-group absmeans ``(N, n_groups)``.
        x_absmax: ``None`` (per-token absmax of ``x``) or the per-token absmax, ``x.shape[:-1]``.

    Returns the five outputs of ``bitcpm::ternary_linear`` and shares its fused backward.
    """
    check_linear_args(x, weight, bias)
    impl = get_kernel(kernel)
    if weight_scale is None:
        w_codes, w_scales = impl.quantize_weight(weight, group_size)
    else:
        w_scales = _weight_scales(weight, weight_scale, group_size)
        w_codes = reference.ternary_codes(weight, w_scales, group_size)
    x2d = x.reshape(-1, x.shape[-1])
    if not quantize_activations:
        y2d = impl.float_ternary_matmul(x2d, w_codes, w_scales, group_size, bias, x.dtype)
        x_codes, x_scales = empty_output(x, torch.int8), empty_output(x, torch.float32)
    else:
        if x_absmax is None:
            x_codes, x_scales = impl.quantize_activations(x2d)
        else:
            x_codes, x_scales = quantize_activations_with_absmax(x2d, x_absmax)
        y2d = impl.int8_ternary_matmul(x_codes, x_scales, w_codes, w_scales, group_size, bias, x.dtype)
    return y2d.reshape(*x.shape[:-1], w_codes.shape[0]), x_codes, x_scales, w_codes, w_scales


@ternary_linear_sharded.register_fake
def _ternary_linear_sharded_fake(x, weight, bias, weight_scale, x_absmax, group_size, quantize_activations, kernel):
    check_linear_args(x, weight, bias)
    return ternary_outputs_like(x, weight, num_groups(weight.shape[1], group_size), quantize_activations)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, _scale, _absmax, group_size, quantize_activations, kernel = inputs
    save_for_ternary_backward(ctx, x, weight, bias, quantize_activations, output, group_size, kernel)


def _backward(ctx, grad_y, *_grads_of_saved_outputs):
    # Scales and absmax are statistics of the weight and the input: straight-through, no gradient.
    return (*ternary_backward(ctx, grad_y), None, None, None, None, None)


ternary_linear_sharded.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- DTensor rules


def _forward_rules(x, weight, bias, weight_scale, x_absmax, group_size, quantize_activations, kernel) -> list:
    from torch.distributed.tensor import Partial, Replicate, Shard

    R = Replicate()
    last = Shard(x.ndim - 1)
    opt = lambda arg, placement: None if arg is None else placement  # noqa: E731
    statics = [None, None, None]
    per_tensor = group_size == PER_TENSOR
    per_group = group_size > 0
    rules = [([R] * 5, [R, R, opt(bias, R), opt(weight_scale, R), opt(x_absmax, R), *statics])]
    # column-parallel: W rows (N) sharded, x whole; y sharded along its last dim
    rules.append(
        (
            [last, R, R, Shard(0), Shard(0)],
            [R, Shard(0), opt(bias, Shard(0)), opt(weight_scale, R if per_tensor else Shard(0)), opt(x_absmax, R), *statics],
        )
    )
    # row-parallel: K sharded in x and W; y is a partial sum (no bias: the pass adds it after the reduction)
    if bias is None:
        x_codes = Shard(1) if quantize_activations else R
        scales = Shard(1) if per_group else R
        rules.append(
            (
                [Partial(), x_codes, R, Shard(1), scales],
                [last, Shard(1), None, opt(weight_scale, scales), opt(x_absmax, R), *statics],
            )
        )
    return rules


def _backward_rules(
    grad_out, saved_x, x_scales, w_codes, w_scales, group_size, input_dtype, weight_dtype,
    need_grad_input, need_grad_weight, need_grad_bias, kernel, precision="fp32",
) -> list:  # fmt: skip
    from torch.distributed.tensor import Partial, Replicate, Shard

    R = Replicate()
    opt = lambda arg, placement: None if arg is None else placement  # noqa: E731
    statics = [None] * 8
    if_needed = lambda needed, placement: placement if needed else R  # noqa: E731  (an unneeded grad is empty)
    per_group = group_size > 0
    rules = [([R, R, R], [R, R, opt(x_scales, R), R, R, *statics])]
    # column-parallel: grad_out sharded along N; grad_input is a partial sum over the N shards
    rules.append(
        (
            [if_needed(need_grad_input, Partial()), if_needed(need_grad_weight, Shard(0)), if_needed(need_grad_bias, Shard(0))],
            [Shard(1), R, opt(x_scales, R), Shard(0), Shard(0), *statics],
        )
    )
    # row-parallel: K sharded in the saved activations and W; grad_out whole
    if saved_x.ndim == 2:
        rules.append(
            (
                [if_needed(need_grad_input, Shard(1)), if_needed(need_grad_weight, Shard(1)), R],
                [R, Shard(1), opt(x_scales, R), Shard(1), Shard(1) if per_group else R, *statics],
            )
        )
    return rules


@functools.cache
def register_dtensor_rules() -> None:
    """Teach DTensor how ``bitcpm::ternary_linear_sharded`` and its backward shard (idempotent).

    Called by the backend's tensor-parallel pass the first time a graph holds a DTensor
    weight, so ``import bitcompile`` never loads ``torch.distributed.tensor``.
    """
    from torch.distributed.tensor.experimental import register_sharding

    register_sharding(torch.ops.bitcpm.ternary_linear_sharded.default)(_forward_rules)
    register_sharding(torch.ops.bitcpm.ternary_linear_backward.default)(_backward_rules)
