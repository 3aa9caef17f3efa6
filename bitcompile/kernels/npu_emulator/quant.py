"""``npu_dynamic_quant`` and ``npu_quant_matmul``: checks, fake impls and CPU kernels."""

from __future__ import annotations

import torch
from torch import Tensor

from bitcompile.kernels.npu_emulator.model import (
    INT4_PER_INT32,
    MAX_DIM_INT32,
    MAX_LAST_DIM,
    as_dtype,
    check_layout,
    current_model,
    decode_quant_param,
    encode_quant_param,
    is_a2_a3,
    is_transposed,
    pack_int4,
    require_a2_a3,
    storage_format,
    unpack_int4,
    unsupported,
)
from bitcompile.kernels.npu_ops import ACL_FORMAT_FRACTAL_NZ

# --------------------------------------------------------------------------------------------
# npu_dynamic_quant
# --------------------------------------------------------------------------------------------
_DYNAMIC_QUANT = "npu_dynamic_quant"


def _dynamic_quant_check(input, smooth_scales, group_index, dst_type, quant_mode, dst_type_max):
    require_a2_a3(_DYNAMIC_QUANT)
    dst = as_dtype(dst_type, "dst_type") or torch.int8
    torch._check(
        input.dtype in (torch.float16, torch.bfloat16),
        lambda: f"{_DYNAMIC_QUANT}: input dtype must be float16 or bfloat16, got {input.dtype}",
    )
    torch._check(input.dim() >= 2, lambda: f"{_DYNAMIC_QUANT}: input must be at least 2-D, got {input.dim()}-D")
    if group_index is not None:
        raise unsupported(_DYNAMIC_QUANT, "group_index (MoE grouped quantization)")
    if quant_mode != "pertoken":
        raise unsupported(_DYNAMIC_QUANT, f"quant_mode={quant_mode!r} (chip support unverified)")
    if dst_type_max != 0.0:
        raise unsupported(_DYNAMIC_QUANT, "dst_type_max (float8 / hifloat8 outputs)")
    torch._check(
        dst in (torch.int8, torch.quint4x2),
        lambda: f"{_DYNAMIC_QUANT}: dst_type must be int8 or quint4x2, got {dst}",
    )
    k = input.size(-1)
    if dst == torch.quint4x2:
        torch._check(k % 8 == 0, lambda: "If dst_dtype is quint4x2, last dim must be divisible by 8")
    if smooth_scales is not None:
        torch._check(
            smooth_scales.dim() == 1 and smooth_scales.size(0) == k,
            lambda: f"{_DYNAMIC_QUANT}: smooth_scales must have shape ({k},), got {tuple(smooth_scales.shape)}",
        )
        # aclnnDynamicQuant.md: smoothScales "数据类型要和x保持一致" (the kernels read it as x's dtype)
        torch._check(
            smooth_scales.dtype == input.dtype,
            lambda: f"{_DYNAMIC_QUANT}: smooth_scales dtype {smooth_scales.dtype} must equal input dtype {input.dtype}",
        )
    return dst


def _dynamic_quant_fake(input, *, smooth_scales=None, group_index=None, dst_type=None, quant_mode="pertoken",
                        dst_type_max=0.0):  # fmt: skip
    dst = _dynamic_quant_check(input, smooth_scales, group_index, dst_type, quant_mode, dst_type_max)
    scale = input.new_empty(input.shape[:-1], dtype=torch.float32)
    if dst == torch.quint4x2:
        return input.new_empty((*input.shape[:-1], input.size(-1) // 8), dtype=torch.int32), scale
    return input.new_empty(input.shape, dtype=torch.int8), scale


def dynamic_quant_rows(x: Tensor, qmax: float, scale_form: str) -> tuple[Tensor, Tensor]:
    """The ops-nn kernels' per-row symmetric quantization of fp32 ``x``: ``(codes fp32, scale fp32)``.

    ``q = 127 / rowmax`` (fp32 division), ``codes = rint(x * q)`` (fp32 product, round half to
    even: CAST_RINT); the division ``x / (rowmax / 127)`` of the documented formula "was changed
    to a multiplication" (dynamic_quant_single_row.h), which moves a code by one where
    ``x * q`` and ``x / scale`` round to different sides of a .5. The returned scale is
    ``rowmax * (1/127)`` or ``1 / q`` (:data:`DYNAMIC_QUANT_SCALE_FORMS`). An all-zero row gets
    scale 0 and codes 0 (``q`` is inf there; the 310P kernels set it to 0 explicitly).
    """
    qmax_f = torch.tensor(qmax, dtype=torch.float32)
    rowmax = x.abs().amax(dim=-1)
    q = qmax_f / rowmax
    y = x * q[..., None]
    codes = torch.clamp(torch.round(torch.nan_to_num(y, nan=0.0)), -qmax - 1, qmax)
    if scale_form == "reciprocal":
        scale = 1.0 / q
    else:
        scale = rowmax * (1.0 / qmax_f)
    return codes, scale


def _dynamic_quant_cpu(input, *, smooth_scales=None, group_index=None, dst_type=None, quant_mode="pertoken",
                       dst_type_max=0.0):  # fmt: skip
    """The hardware formula of :func:`dynamic_quant_rows` (not the documented ``x / scale``)."""
    dst = _dynamic_quant_check(input, smooth_scales, group_index, dst_type, quant_mode, dst_type_max)
    x = input.float()
    if smooth_scales is not None:
        x = x * smooth_scales.float()
    qmax = 7.0 if dst == torch.quint4x2 else 127.0
    q, scale = dynamic_quant_rows(x, qmax, current_model().dynamic_quant_scale)
    if dst == torch.quint4x2:
        return pack_int4(q), scale
    return q.to(torch.int8), scale


# --------------------------------------------------------------------------------------------
# npu_quant_matmul
# --------------------------------------------------------------------------------------------
_QUANT_MATMUL = "npu_quant_matmul"
_F32, _BF16, _F16, _I8, _I32, _I64 = torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.int32, torch.int64

# Atlas A2/A3 dtype combinations (op-plugin torch_npu-npu_quant_matmul.md, table 2):
# (x dtype, output, scale dtypes, bias dtypes (None = absent), pertoken: "no"/"opt"/"req", offset allowed)
_QMM_TABLE = (
    (_I8, _F16, {_I64, _F32}, {_I32, None}, "no", False),
    (_I8, _I8, {_I64, _F32}, {_I32, None}, "no", True),
    (_I8, _BF16, {_F32, _BF16}, {_I32, _BF16, _F32, None}, "opt", False),
    (_I8, _F16, {_F32}, {_I32, _F16, _F32, None}, "req", False),
    (_I8, _I32, {_F32, _BF16}, {_I32, None}, "no", False),
    (_I32, _F16, {_I64, _F32}, {_I32, None}, "no", False),
    (_I32, _F16, {_F32}, {_I32, _F16, _F32, None}, "req", False),
    (_I32, _BF16, {_F32, _BF16}, {_I32, _BF16, _F32, None}, "req", False),
)


def dtype_name(dtype) -> str:
    return "None" if dtype is None else str(dtype).removeprefix("torch.")


def _qmm_dtype_check(x1, x2, scale, offset, pertoken_scale, bias, out) -> None:
    torch._check(
        x1.dtype == x2.dtype,
        lambda: f"x1's type and x2's type should be same, but x1.dtype is {x1.dtype} and x2.dtype is {x2.dtype}",
    )
    torch._check(x1.dtype in (_I8, _I32), lambda: f"input's type supported for int8 and int32, but now is {x1.dtype}")
    torch._check(
        scale.dtype in (_F32, _I64, _BF16),
        lambda: f"scale's type supported for float32, int64 and bfloat16, but scale.dtype is {scale.dtype}",
    )
    if pertoken_scale is not None:
        torch._check(
            pertoken_scale.dtype == _F32,
            lambda: f"pertoken_scale's type supported for float32, but pertoken_scale.dtype is {pertoken_scale.dtype}",
        )
    if offset is not None:
        torch._check(offset.dtype == _F32, lambda: f"offset's type supported for float32, but is {offset.dtype}")
    bias_dtype = None if bias is None else bias.dtype
    for x_dtype, out_dtype, scales, biases, pertoken, offset_ok in _QMM_TABLE:
        if (x1.dtype, out) != (x_dtype, out_dtype) or scale.dtype not in scales or bias_dtype not in biases:
            continue
        if (pertoken == "no" and pertoken_scale is not None) or (pertoken == "req" and pertoken_scale is None):
            continue
        if offset is not None and not offset_ok:
            continue
        return
    combo = (
        f"x1={dtype_name(x1.dtype)}, x2={dtype_name(x2.dtype)}, scale={dtype_name(scale.dtype)}, "
        f"offset={dtype_name(None if offset is None else offset.dtype)}, bias={dtype_name(bias_dtype)}, "
        f"pertoken_scale={dtype_name(None if pertoken_scale is None else pertoken_scale.dtype)}, output_dtype={dtype_name(out)}"
    )
    raise RuntimeError(f"{_QUANT_MATMUL}: unsupported dtype combination on Atlas A2/A3 ({combo}); see docs/cann.md")


def _qmm_geometry(x1, x2, scale, offset, pertoken_scale, bias, output_dtype, x1_dtype, x2_dtype,
                  pertoken_scale_dtype, scale_dtype, group_sizes, y_scale):  # fmt: skip
    """Check everything torch_npu checks; return (batch shape, m, k, n, x2 transposed, output dtype)."""
    for arg, value in (("x1_dtype", x1_dtype), ("x2_dtype", x2_dtype), ("pertoken_scale_dtype", pertoken_scale_dtype),
                       ("scale_dtype", scale_dtype)):  # fmt: skip
        if value is not None:
            raise unsupported(_QUANT_MATMUL, f"{arg} (float8 / float4 / hifloat8 inputs, Ascend 950 only)")
    if group_sizes is not None or y_scale is not None:
        raise unsupported(_QUANT_MATMUL, "group_sizes / y_scale (block and mx quantization)")
    out = as_dtype(output_dtype, "output_dtype") or _I8
    if x1.dtype == _I8 and x2.dtype == _I32:
        raise unsupported(_QUANT_MATMUL, "A8W4 (int8 x1 with int32-packed int4 x2)")
    torch._check(2 <= x1.dim() <= 6, lambda: "x1 dim num should be 2 ~ 6, please check x1 dim num")
    torch._check(2 <= x2.dim() <= 6, lambda: "x2 dim num should be 2 ~ 6, please check x2 dim num")
    _qmm_dtype_check(x1, x2, scale, offset, pertoken_scale, bias, out)
    is_a4w4 = x1.dtype == _I32
    if is_a4w4:
        torch._check(x2.dim() == 2, lambda: "x2 dim num should be 2 when x1's dtype is int32, please check x2 dim num")
    check_layout(x1, "x1", _QUANT_MATMUL)
    check_layout(x2, "x2", _QUANT_MATMUL)
    transposed = is_transposed(x2)
    m = x1.size(-2)
    if is_a4w4 and not transposed:  # x1 (m, k/8), x2 (k, n/8)
        k, n = x1.size(-1) * INT4_PER_INT32, x2.size(-1) * INT4_PER_INT32
        torch._check(x2.size(-2) == k, lambda: "k dim of x2 should be 8 multiple of k dim of x1")
    else:  # int8, or int4 with x2 = (n, k/8).t()
        k, n = x1.size(-1), x2.size(-1)
        torch._check(
            x2.size(-2) == k,
            lambda: f"k dim of x1 and x2 need be same, got x1 {tuple(x1.shape)} and x2 {tuple(x2.shape)}",
        )
        if is_a4w4:
            k *= INT4_PER_INT32
    limit = quant_matmul_dim_limit(x1.dtype, scale, pertoken_scale)
    torch._check(
        k <= limit and n <= limit,
        lambda: f"{_QUANT_MATMUL}: k={k} and n={n} must not exceed {limit} (last-dim limit of x1 and x2 on "
        f"{current_model().chip} for this input combination)",
    )
    if not is_a2_a3():
        torch._check(
            pertoken_scale is None and out != _BF16,
            lambda: f"{_QUANT_MATMUL}: {current_model().chip} supports neither pertoken_scale nor bfloat16 output",
        )
    check_nz_operand(x2, k, n, _QUANT_MATMUL, "x2")
    batch = torch.broadcast_shapes(tuple(x1.shape[:-2]), tuple(x2.shape[:-2])) if max(x1.dim(), x2.dim()) > 2 else ()
    torch._check(scale.dim() == 1, lambda: "the scale dim num must be 1, please check scale dim num")
    torch._check(
        scale.size(0) in (1, n),
        lambda: "the scale 1st dim value must be 1 or x2 n dim value, please check scale 1st dim value",
    )
    if offset is not None:
        torch._check(offset.dim() == 1, lambda: "the offset dim num must be 1, please check offset dim num")
        torch._check(offset.size(0) in (1, n), lambda: "the offset 1st dim value must be 1 or x2 n dim value")
    if pertoken_scale is not None:
        torch._check(
            pertoken_scale.dim() == 1,
            lambda: "the pertoken_scale dim num must be 1, please check scale dim num "
            f"(got shape {tuple(pertoken_scale.shape)}; flatten x1 to 2-D first)",
        )
        torch._check(
            pertoken_scale.size(0) == m,
            lambda: "the pertoken_scale 1st dim value must be x1 m dim value, please check scale 1st dim value",
        )
    if bias is not None:
        torch._check(
            bias.dim() in (1, 3) if not is_a4w4 else bias.dim() == 1,
            lambda: f"bias_dim_num should be 1 or 3, please check bias dim num (got {bias.dim()})",
        )
        torch._check(bias.size(-1) == n, lambda: "bias last dim should be equal to x2 n dim, please check bias shape")
        if bias.dim() == 3:
            bsz = 1
            for d in batch:
                bsz *= d
            torch._check(
                len(batch) == 1 and bias.size(0) == bsz and bias.size(1) == 1,
                lambda: "when bias dim is 3, it must be (batch, 1, n) and out dim need to be 3",
            )
    return tuple(batch), m, k, n, transposed, out


def quant_matmul_dim_limit(x_dtype: torch.dtype, scale: Tensor, pertoken_scale: Tensor | None) -> int:
    """The last-dim limit the quant_batch_matmul_v3 tiling applies (CheckShapeInBoundary).

    On A2/A3 (DAV_2201) int8 inputs with a 1-D fp32/bf16 ``scale`` and a 1-D ``pertoken_scale``
    are exempt from the 65535 limit (only [1, 2**31-1] remains); everything else keeps it.
    """
    exempt = (
        is_a2_a3() and x_dtype == _I8 and scale.dtype in (_F32, _BF16) and scale.dim() == 1
        and pertoken_scale is not None and pertoken_scale.dim() == 1
    )  # fmt: skip
    return MAX_DIM_INT32 if exempt else MAX_LAST_DIM


def check_nz_operand(w: Tensor, k: int, n: int, op: str, name: str) -> None:
    """FRACTAL_NZ right operands cannot have K or N equal to 1 (aclnn_quant_matmul_v4.cpp, aclnnQuantMatmulV4.md)."""
    if storage_format(w)[0] == ACL_FORMAT_FRACTAL_NZ:
        torch._check(
            k != 1 and n != 1,
            lambda: f"{op}: when the format of {name} is FRACTAL_NZ, its k ({k}) and n ({n}) dimensions can not be 1",
        )


def _quant_matmul_fake(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None,
                       x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None,
                       group_sizes=None, y_scale=None):  # fmt: skip
    batch, m, _, n, _, out = _qmm_geometry(x1, x2, scale, offset, pertoken_scale, bias, output_dtype, x1_dtype,
                                           x2_dtype, pertoken_scale_dtype, scale_dtype, group_sizes, y_scale)  # fmt: skip
    return x1.new_empty((*batch, m, n), dtype=out)


def int_operand(t: Tensor, packed_along_last: bool) -> Tensor:
    """int8 values, or int32 words unpacked to int4 values along the dim they were packed on."""
    if t.dtype != _I32:
        return t
    if packed_along_last:
        return unpack_int4(t)
    return unpack_int4(t.transpose(-1, -2)).transpose(-1, -2)


def _quant_matmul_cpu(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None,
                      x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None,
                      group_sizes=None, y_scale=None):  # fmt: skip
    """``out = (x1 @ x2 [+ int32 bias]) * scale [* pertoken_scale] [+ float bias | + offset]`` (aclnnQuantMatmulV4).

    The integer product is exact (fp64 holds any int32 sum exactly); dequantization is fp32,
    ``(acc * scale) * pertoken`` or, with ``emulate(dequant_order="pertoken_opt")``,
    ``acc * (pertoken * scale)`` as the pertoken-opt kernel does; the result is cast to
    ``output_dtype``.
    """
    _, _, _, _, transposed, out = _qmm_geometry(x1, x2, scale, offset, pertoken_scale, bias, output_dtype, x1_dtype,
                                                x2_dtype, pertoken_scale_dtype, scale_dtype, group_sizes, y_scale)  # fmt: skip
    a = int_operand(x1, True)
    b = int_operand(x2, not transposed)
    acc = torch.matmul(a.double(), b.double())  # exact: |sum| < 2**31 << 2**53
    if bias is not None and bias.dtype == _I32:
        acc = acc + bias.double()
    if out == _I32:
        return acc.to(_I32)
    off = offset
    if scale.dtype == _I64:
        s, decoded_offset = decode_quant_param(scale)
        off = decoded_offset if offset is None else offset
    elif scale.dtype == _F32 and pertoken_scale is None and out not in (_BF16, _I32):
        # Eager torch_npu converts an fp32 scale with npu_trans_quant_param itself here
        # (op-plugin QuantMatmulKernelNpuOpApi.cpp), so the scale loses its low 13 mantissa bits.
        s, _ = decode_quant_param(encode_quant_param(scale))
    else:
        s = scale.float()
    if pertoken_scale is not None and current_model().dequant_order == "pertoken_opt":
        y = acc.float() * (pertoken_scale.float()[:, None] * s)
    else:
        y = acc.float() * s
        if pertoken_scale is not None:
            y = y * pertoken_scale.float()[:, None]
    if bias is not None and bias.dtype != _I32:
        y = y + bias.float()
    if out == _I8:
        if off is not None:
            y = y + off.float()
        return torch.clamp(torch.round(y), -128, 127).to(_I8)
    return y.to(out)


#: op name -> (CPU kernel, fake impl), registered by npu_ops.ensure_npu_ops
IMPLS = {
    "npu_dynamic_quant": (_dynamic_quant_cpu, _dynamic_quant_fake),
    "npu_quant_matmul": (_quant_matmul_cpu, _quant_matmul_fake),
}
