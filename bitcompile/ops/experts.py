"""The MoE training op: ``bitcpm::ternary_experts_linear`` and its fused backward.

An MoE layer stores its experts as one 3-D weight ``(E, N, K)``: E independent ``(N, K)``
matrices (DESIGN.md §3, "MoE experts"). Each routed row of ``x`` goes through the expert
``expert_ids[row]`` names. Each expert is quantized exactly like a linear weight (per-row and
per-group scales within the expert; ``"tensor"`` is one scale per expert, never one shared
across experts); activations are quantized per token, so routing a row does not change its
codes.

Like ``bitcpm::ternary_linear`` the op returns what its backward needs (int8 activation codes
and scales, the experts' ternary codes and scales) so AOTAutograd saves those and never a float
copy of the 3-D weight. The backward, ``bitcpm::ternary_experts_linear_backward``, is the
straight-through estimator per expert: ``grad_x[rows_e] = g[rows_e] @ W_q[e]`` and
``grad_W[e] = g[rows_e]^T @ (q_x * s_x)[rows_e]``; an expert no row was routed to gets a zero
gradient. Rows whose id is outside ``[0, E)`` (expert-parallel sentinels, rows past a
grouped_mm's last offset) produce zeros and get zero gradient.

The per-expert matmuls call the kernel module's contract functions (one call per active
expert), so every target that implements :class:`~bitcompile.kernels.contract.TernaryKernels`
runs it with its own numerics.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from bitcompile.kernels.groups import PER_TENSOR, check_group_code, num_groups
from bitcompile.ops.checks import empty_output
from bitcompile.targets import get_kernel

__all__ = ["expert_rows", "quantize_experts", "ternary_experts_linear", "ternary_experts_linear_backward"]


def _check_experts_args(x: Tensor, weight: Tensor, expert_ids: Tensor) -> None:
    if weight.dim() != 3:
        raise ValueError(
            f"bitcpm::ternary_experts_linear: weight must be 3-D (experts, out, in), got shape {tuple(weight.shape)}"
        )
    if x.dim() != 2 or x.shape[1] != weight.shape[2]:
        raise ValueError(
            f"bitcpm::ternary_experts_linear: input must be 2-D (rows, {weight.shape[2]}) to match the experts' "
            f"in_features, got shape {tuple(x.shape)} (weight {tuple(weight.shape)})"
        )
    if expert_ids.dim() != 1 or expert_ids.shape[0] != x.shape[0] or expert_ids.is_floating_point():
        raise ValueError(
            f"bitcpm::ternary_experts_linear: expert_ids must be 1-D integers, one per input row ({x.shape[0]}), "
            f"got {expert_ids.dtype} {tuple(expert_ids.shape)}"
        )


def quantize_experts(impl: Any, weight: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Ternary codes int8 ``(E, N, K)`` and fp32 scales ``(E, N, n_groups)``, each expert on its own.

    Per-row and per-group scales never cross a row, so the ``E * N`` rows are quantized in one
    kernel call; per-tensor scales are one per expert, so each expert is a call of its own.
    """
    n_experts, n, k = weight.shape
    if group_size == PER_TENSOR:
        parts = [impl.quantize_weight(weight[e], group_size) for e in range(n_experts)]
        return torch.stack([c for c, _ in parts]), torch.stack([s for _, s in parts])
    codes, scales = impl.quantize_weight(weight.reshape(n_experts * n, k), group_size)
    return codes.reshape(n_experts, n, k), scales.reshape(n_experts, n, -1)


def expert_rows(expert_ids: Tensor, n_experts: int) -> list[tuple[int, Tensor]]:
    """``(expert, row indices)`` for every expert at least one row is routed to, in expert order.

    One host sync (``tolist``) for the whole layer, as transformers' grouped_mm fallback does.
    """
    ids = expert_ids.long()
    ids = torch.where((ids >= 0) & (ids < n_experts), ids, n_experts)  # sentinels sort last, in no expert
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=n_experts + 1)[:n_experts].tolist()
    active, first = [], 0
    for expert, count in enumerate(counts):
        if count:
            active.append((expert, order[first : first + count]))
        first += count
    return active


@torch.library.custom_op("bitcpm::ternary_experts_linear", mutates_args=())
def ternary_experts_linear(
    x: Tensor,
    weight: Tensor,
    expert_ids: Tensor,
    group_size: int,
    quantize_activations: bool,
    kernel: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Routed ternary experts: ``y[r] = x[r] @ ternary(W[expert_ids[r]])^T`` (DESIGN.md §3).

    Args:
        x (Tensor): ``(S, K)`` routed rows (a token once per expert it is routed to), fp32 or bf16.
        weight (Tensor): ``(E, N, K)`` latent full-precision expert weights.
        expert_ids (Tensor): ``(S,)`` integer expert of each row; ids outside ``[0, E)`` give zeros.
        group_size (int): -1 per output row, 0 per tensor (one scale per expert), ``g > 0`` groups along K.
        quantize_activations (bool): per-token absmax int8 activations (W1.58A8) when True.
        kernel (str): kernel module that computes it, e.g. ``"reference"``.

    Returns:
        ``(y (S, N), x_codes (S, K) int8, x_scales (S,) fp32, w_codes (E, N, K) int8,
        w_scales (E, N, n_groups) fp32)``; ``x_codes`` / ``x_scales`` are empty weight-only.

    Example::

        >>> y = torch.ops.bitcpm.ternary_experts_linear(x, w, ids, -1, True, "reference")[0]
    """
    _check_experts_args(x, weight, expert_ids)
    check_group_code(group_size)
    impl = get_kernel(kernel)
    w_codes, w_scales = quantize_experts(impl, weight, group_size)
    y = x.new_zeros((x.shape[0], weight.shape[1]))
    if quantize_activations:
        x_codes, x_scales = impl.quantize_activations(x)
    else:
        x_codes, x_scales = empty_output(x, torch.int8), empty_output(x, torch.float32)
    for expert, rows in expert_rows(expert_ids, weight.shape[0]):
        if quantize_activations:
            y_e = impl.int8_ternary_matmul(
                x_codes[rows], x_scales[rows], w_codes[expert], w_scales[expert], group_size, None, x.dtype
            )
        else:
            y_e = impl.float_ternary_matmul(x[rows], w_codes[expert], w_scales[expert], group_size, None, x.dtype)
        y[rows] = y_e
    return y, x_codes, x_scales, w_codes, w_scales


@ternary_experts_linear.register_fake
def _ternary_experts_linear_fake(x, weight, expert_ids, group_size, quantize_activations, kernel):
    _check_experts_args(x, weight, expert_ids)
    n_experts, n, k = weight.shape
    s = x.shape[0]
    if quantize_activations:
        x_codes, x_scales = x.new_empty((s, k), dtype=torch.int8), x.new_empty((s,), dtype=torch.float32)
    else:
        x_codes, x_scales = empty_output(x, torch.int8), empty_output(x, torch.float32)
    w_codes = weight.new_empty((n_experts, n, k), dtype=torch.int8)
    w_scales = weight.new_empty((n_experts, n, num_groups(k, group_size)), dtype=torch.float32)
    return x.new_empty((s, n)), x_codes, x_scales, w_codes, w_scales


@torch.library.custom_op("bitcpm::ternary_experts_linear_backward", mutates_args=())
def ternary_experts_linear_backward(
    grad_out: Tensor,
    saved_x: Tensor,
    x_scales: Optional[Tensor],
    w_codes: Tensor,
    w_scales: Tensor,
    expert_ids: Tensor,
    group_size: int,
    input_dtype: torch.dtype,
    weight_dtype: torch.dtype,
    need_grad_input: bool,
    need_grad_weight: bool,
    kernel: str,
) -> tuple[Tensor, Tensor]:
    """Fused straight-through backward of :func:`ternary_experts_linear`: ``(grad_input, grad_weight)``.

    Per active expert, one call of the kernel's ``ternary_linear_backward`` on its rows (the
    same STE as a linear layer); ``grad_weight`` is ``(E, N, K)`` with zeros for idle experts.
    A gradient that is not needed is an empty tensor.
    """
    impl = get_kernel(kernel)
    n_experts, n, k = w_codes.shape
    gi = grad_out.new_zeros((grad_out.shape[0], k), dtype=input_dtype) if need_grad_input else None
    gw = grad_out.new_zeros((n_experts, n, k), dtype=weight_dtype) if need_grad_weight else None
    for expert, rows in expert_rows(expert_ids, n_experts):
        gi_e, gw_e, _ = impl.ternary_linear_backward(
            grad_out[rows], saved_x[rows], x_scales[rows] if x_scales is not None else None,
            w_codes[expert], w_scales[expert], group_size, need_grad_input, need_grad_weight, False,
        )  # fmt: skip
        if gi is not None:
            gi[rows] = gi_e.to(input_dtype)
        if gw is not None:
            gw[expert] = gw_e.to(weight_dtype)
    return (
        gi if gi is not None else empty_output(grad_out, input_dtype),
        gw if gw is not None else empty_output(grad_out, weight_dtype),
    )


@ternary_experts_linear_backward.register_fake
def _ternary_experts_linear_backward_fake(
    grad_out, saved_x, x_scales, w_codes, w_scales, expert_ids, group_size, input_dtype, weight_dtype,
    need_grad_input, need_grad_weight, kernel,
):  # fmt: skip
    n_experts, n, k = w_codes.shape
    gi = grad_out.new_empty((grad_out.shape[0], k), dtype=input_dtype) if need_grad_input else empty_output(grad_out, input_dtype)
    gw = grad_out.new_empty((n_experts, n, k), dtype=weight_dtype) if need_grad_weight else empty_output(grad_out, weight_dtype)
    return gi, gw


def _setup_context(ctx, inputs, output) -> None:
    x, weight, expert_ids, group_size, quantize_activations, kernel = inputs
    _, x_codes, x_scales, w_codes, w_scales = output
    if quantize_activations:
        ctx.save_for_backward(x_codes, x_scales, w_codes, w_scales, expert_ids)
    else:
        ctx.save_for_backward(x, None, w_codes, w_scales, expert_ids)
    ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
    ctx.group_size, ctx.kernel = group_size, kernel


def _backward(ctx, grad_y, *_grads_of_saved_outputs):
    saved_x, x_scales, w_codes, w_scales, expert_ids = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[:2]
    gi, gw = torch.ops.bitcpm.ternary_experts_linear_backward(
        grad_y, saved_x, x_scales, w_codes, w_scales, expert_ids, ctx.group_size, ctx.x_dtype, ctx.w_dtype,
        need_x, need_w, ctx.kernel,
    )  # fmt: skip
    return gi if need_x else None, gw if need_w else None, None, None, None, None


ternary_experts_linear.register_autograd(_backward, setup_context=_setup_context)
