"""The straight-through backward in lower precision (DESIGN.md §3: "bf16/fp32 matmul; int8 optional later")."""

from __future__ import annotations

import torch
from torch import Tensor

from bitcompile.kernels import reference
from bitcompile.kernels.cpu.library import is_degenerate, on_cpu
from bitcompile.kernels.cpu.passes import int_mm, quantize_activations, scale_rows
from bitcompile.kernels.groups import PER_TENSOR, check_group_code

BACKWARD_PRECISIONS = ("fp32", "bf16", "int8")


def _bf16(a: Tensor, row: Tensor | None = None, col: Tensor | None = None) -> Tensor:
    """``a`` times the fp32 per-row / per-column scales, rounded once to bf16 (one pass)."""
    if row is None and col is None and a.dtype == torch.bfloat16:
        return a
    return scale_rows(a, row=row, col=col, out_dtype=torch.bfloat16)


def _grad_input_bf16(g: Tensor, w_codes: Tensor, w_scales: Tensor, group_code: int) -> Tensor:
    """``g @ W_q`` as a bf16 GEMM (fp32 accumulation inside oneDNN), fp32 ``(M, K)``.

    Per-row scales are folded into ``g`` (``(g * s_w) @ q_w``) so the ternary codes enter the
    GEMM exactly; per-tensor scales are applied after; groups round ``W_q`` itself to bf16.
    """
    if group_code == PER_TENSOR:
        return (_bf16(g) @ _bf16(w_codes)).float().mul_(w_scales[0, 0].float())
    if group_code < 0:
        return (_bf16(g, col=w_scales[:, 0]) @ _bf16(w_codes)).float()
    wq = reference.dequantize_weight(w_codes, w_scales.float(), group_code).to(torch.bfloat16)
    return (_bf16(g) @ wq).float()


def _grad_input_int8(
    g: Tensor, w_codes: Tensor, w_scales: Tensor, group_code: int, out_dtype: torch.dtype = torch.float32
) -> Tensor:
    """``g @ W_q`` as int8 x ternary: ``g * s_w`` quantized per row (absmax int8, the activation
    quantizer), times the exact int8 codes with ``torch._int_mm`` (exact int32), rescaled.

    Only per-row / per-tensor scales factor out of the sum over N; groups use bf16.
    """
    if group_code > 0:
        return _grad_input_bf16(g, w_codes, w_scales, group_code)
    # the per-row scale folds into the summed dimension (N); per tensor it is applied after
    q_g, s_g = quantize_activations(g, col_scale=w_scales[:, 0] if group_code < 0 else None)
    acc = int_mm(q_g, w_codes.to(torch.int8))  # (M, N) @ (N, K), exact
    scalar = float(w_scales[0, 0]) if group_code == PER_TENSOR else 1.0
    return scale_rows(acc, row=s_g, scalar=scalar, out_dtype=out_dtype)


def ternary_linear_backward(
    grad_out: Tensor,
    saved_x: Tensor,
    x_scales: Tensor | None,
    w_codes: Tensor,
    w_scales: Tensor,
    group_code: int,
    need_grad_input: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    precision: str = "fp32",
    grad_input_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Straight-through backward (contract of :func:`reference.ternary_linear_backward`).

    ``precision`` picks the GEMMs (docs/kernels.md "Training" has the measured speed and error):

    - ``"fp32"``: the reference, fp32 GEMMs.
    - ``"bf16"``: ``grad_input = (g*s_w) @ q_w`` and ``grad_weight = (g*s_x)^T @ q_x`` as bf16
      GEMMs; the int8 / ternary codes are exact in bf16, so only ``g*s`` is rounded (and the
      bf16 GEMM output). Weight-only mode rounds the saved activations too.
    - ``"int8"``: grad_input as int8 x ternary ``torch._int_mm`` on the per-row absmax int8
      quantization of ``g*s_w`` (per-row / per-tensor; groups fall back to bf16), grad_weight
      as in ``"bf16"`` (the SwitchBack split, arXiv:2304.13013: int8 for the forward and the
      input gradient, 16-bit for the weight gradient).

    grad_bias is an fp32 sum. grad_input is fp32, or ``grad_input_dtype`` where ``"int8"`` can
    write that directly (rounded once from the fp32 value); grad_weight is fp32 for ``"fp32"``
    and bf16, the GEMM's output, for ``"bf16"`` / ``"int8"``. The op converts each to its
    parameter's dtype, so bf16 models make no round trip through fp32.
    """
    if precision not in BACKWARD_PRECISIONS:
        raise ValueError(f"backward precision {precision!r} is not one of {BACKWARD_PRECISIONS}")
    m, n = grad_out.shape
    k = w_codes.shape[1]
    if precision == "fp32" or is_degenerate(m, n, k) or not on_cpu(grad_out, saved_x, w_codes):
        return reference.ternary_linear_backward(
            grad_out, saved_x, x_scales, w_codes, w_scales, group_code, need_grad_input, need_grad_weight, need_grad_bias
        )
    check_group_code(group_code)
    g = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    grad_input = grad_weight = None
    if need_grad_input:
        if precision == "int8":
            grad_input = _grad_input_int8(g, w_codes, w_scales, group_code, grad_input_dtype)
        else:
            grad_input = _grad_input_bf16(g, w_codes, w_scales, group_code)
    if need_grad_weight:
        if x_scales is not None:  # W1.58A8: (g * s_x)^T @ q_x, the int8 codes exact in bf16
            gw = _bf16(g, row=x_scales).t() @ _bf16(saved_x)
        else:  # weight-only: the saved activations themselves, rounded to bf16
            gw = _bf16(g).t() @ _bf16(saved_x)
        grad_weight = gw
    grad_bias = g.float().sum(dim=0) if need_grad_bias else None
    return grad_input, grad_weight, grad_bias

